"""Training math in plain torch, given already-built (and wrapped) objects.

Nothing here knows about Ray. The only distributed calls are the all-reduces that turn
per-rank figures (loss, eval loss) into global ones; the gradient reduction itself is
done by the wrappers from raygpt.parallel.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from raygpt.errors import UserError
from raygpt.parallel.apply import grad_sync


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then flat."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return min_lr + coeff * (lr - min_lr)


def build_optimizer(model: nn.Module, ocfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices of Linear layers (not on norms, biases or
    embeddings, the tied head included). Fused kernel on GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # lm_head.weight shows up only as a pipeline stage's copy of the tied embedding.
        is_embedding = name.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": ocfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), **kw)


def pick_micro_batch(per_rank: int, micro_max: int) -> int:
    """Largest divisor of the per-rank batch that is <= micro_max: a world-size change
    never makes the global batch unreachable."""
    for m in range(min(per_rank, micro_max), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


def batch_geometry(global_batch: int, dp: int, micro_max: int) -> tuple[int, int, int]:
    """-> (per-rank sequences, micro batch, accumulation steps)."""
    if global_batch % dp:
        raise UserError(
            f"train.global_batch={global_batch} is not divisible by the data-parallel size {dp}"
        )
    per_rank = global_batch // dp
    micro = pick_micro_batch(per_rank, micro_max)
    return per_rank, micro, per_rank // micro


def pp_microbatches(requested: int, per_rank: int, pp: int) -> int:
    """Pipeline microbatches per step: the requested count (must divide the per-rank
    batch), or by default the largest divisor of it up to 2 x pp."""
    if requested:
        if per_rank % requested:
            raise UserError(
                f"train.pp_microbatches={requested} does not divide the per-rank batch {per_rank} "
                f"(train.global_batch / data-parallel size)"
            )
        return requested
    return pick_micro_batch(per_rank, 2 * pp)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, pp_group=None, skip: set | None = None,
                   device=None) -> torch.Tensor:
    """Global L2 norm over plain and DTensor grads (FSDP/TP shards are reduced over their
    mesh by DTensor; pipeline stages are summed over pp_group, counting parameters in
    `skip` (ids) zero times), then clip. Returns the norm before clipping."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    skip = skip or set()
    total_sq = torch.zeros((), device=device or (grads[0].device if grads else "cpu"))
    for p in params:
        if p.grad is None or id(p) in skip:
            continue
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32) ** 2
        if _is_dtensor(sq):
            sq = sq.full_tensor()
        total_sq = total_sq + sq.to(total_sq.device)
    if pp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_group)
    if not grads:
        return total_sq.sqrt()
    norm = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            if _is_dtensor(g):
                g.mul_(coef.item())  # DTensor * plain tensor is not allowed: use a scalar
            else:
                g.mul_(coef.to(g.device))
    return norm


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def distill_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, data).
    Returns (total, ce) so the logged loss stays comparable to plain training."""
    import torch.nn.functional as F

    V = student_logits.size(-1)
    s = student_logits.float().view(-1, V)
    t = teacher_logits.float().view(-1, teacher_logits.size(-1))[:, :V]
    ce = F.cross_entropy(s, targets.view(-1))
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * ce, ce


def pp_train_step(pipe, optimizers, x, y, device, grad_clip: float):
    """One optimizer step through the pipeline schedule (microbatching happens inside)."""
    loss = pipe.forward_backward(x, y, device)
    norm = clip_grad_norm(list(pipe.parameters()), grad_clip, pp_group=pipe.pp_group,
                          skip=pipe.tied_duplicate(), device=device)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss, norm


def train_step(model, optimizer, micro_batches, device, amp_dtype, grad_clip: float,
               teacher=None, distill=None):
    """One optimizer step over this rank's micro-batches.

    Loss of each micro-batch is divided by the number of micro-batches, so the gradient
    is the mean over this rank's sequences; the dp wrapper then averages ranks, giving
    the mean over the global batch whatever the world size.
    Returns (mean loss on this rank as a 0-d tensor, grad norm tensor).
    """
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with grad_sync(model, enabled=(i == n - 1)):
            with autocast_ctx(device, amp_dtype):
                if teacher is None:
                    _, loss = model(x, y)
                    report = loss
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss, report = distill_loss(model(x), t_logits, y, distill.temperature, distill.alpha)
            (loss / n).backward()
        total += report.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip_grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n, norm


@torch.no_grad()
def evaluate(model, loader, eval_steps: int, micro: int, device, amp_dtype) -> torch.Tensor:
    """Mean loss over the fixed val batches 0..eval_steps-1 (this rank's slices)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    for k in range(eval_steps):
        for x, y in loader.get_micro(k, micro):
            with autocast_ctx(device, amp_dtype):
                _, loss = model(x.to(device), y.to(device))
            total += loss.float()
            count += 1
    model.train()
    return total / max(1, count)
