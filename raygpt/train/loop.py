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


def build_optimizer(model: nn.Module, ocfg, device_type: str, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices of Linear layers (not on norms, biases or
    embeddings, the tied head included). Fused kernel wherever torch has one (CUDA, CPU:
    on CPU the per-tensor loop took ~10% of a shakespeare-char-cpu step).

    The fused (and foreach) kernels take one kind of tensor per group: under tensor
    parallelism without FSDP a group would mix DTensor weights with plain norms and
    biases, which they refuse. So each decay group is split by tensor kind, and a group
    is fused only when every tensor in it can be (floating point, on a device with the
    fused kernel). fused=None: fused where the device has the kernel."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # lm_head.weight shows up only as a pipeline stage's copy of the tied embedding.
        is_embedding = name.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = []
    for params, wd in ((decay, ocfg.weight_decay), (no_decay, 0.0)):
        for kind in (True, False):
            same = [p for p in params if _is_dtensor(p) == kind]
            if same:
                want = True if fused is None else fused  # _fusable: where the kernel exists
                groups.append({"params": same, "weight_decay": wd,
                               "fused": bool(want) and all(_fusable(p) for p in same)})
    if not groups:
        groups = [{"params": [], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2))


def _fusable(p: torch.Tensor) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices()


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


def _local_and_shards(g):
    """(local tensor to take the norm of, number of shards it is one of)."""
    if not _is_dtensor(g):
        return g, 1
    if any(p.is_partial() for p in g.placements):  # not seen after backward; be exact anyway
        from torch.distributed.tensor import Replicate

        g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
    n = 1
    for size, pl in zip(g.device_mesh.shape, g.placements):
        if pl.is_shard():
            n *= size
    return g.to_local(), n


def _sum_of_squares(tensors: list, device) -> torch.Tensor:
    """sum ||t||^2 over tensors, in fp32, with one foreach norm per (device, dtype)."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32)  # bf16 grads: fp32 norms
        total = total + torch.stack(norms).pow(2).sum().to(device)
    return total


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, pp_group=None, skip: set | None = None,
                   device=None) -> torch.Tensor:
    """Global L2 norm of the gradients, then clip them like torch's clip_grad_norm_.
    Returns the norm before clipping (a 0-d tensor; nothing here waits for the GPU).

    Grads may be plain tensors (replicated: DDP, or norms/biases under TP), DTensor
    shards (FSDP/HSDP/TP) or live on other pipeline stages. Each rank sums the squares
    of what it holds, weighting a tensor by 1 / (ranks holding the same values), so that
    ONE all-reduce (SUM) over all ranks gives the global sum, each element counted once.
    Nothing is reduced when every grad is replicated on every rank (DDP, one rank).
    Parameters in `skip` (ids; a pipeline's second copy of the tied matrix) count zero
    times; pp_group (the ranks across stages) tells how many stages there are."""
    import torch.distributed as dist

    skip = skip or set()
    with_grad = [p for p in params if p.grad is not None]
    if device is None:
        device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    pp = dist.get_world_size(pp_group) if pp_group is not None else 1
    by_shards: dict[int, list] = {}
    for p in with_grad:
        if id(p) not in skip:
            local, n = _local_and_shards(p.grad)
            by_shards.setdefault(n, []).append(local)
    reduce = world > 1 and (pp > 1 or any(n > 1 for n in by_shards))
    copies = world // pp  # ranks running one pipeline stage, each holding all its params
    total = torch.zeros((), device=device, dtype=torch.float32)
    for n, tensors in by_shards.items():
        sq = _sum_of_squares(tensors, device)
        total = total + (sq * (n / copies) if reduce else sq)
    if reduce:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = total.sqrt()
    if max_norm > 0 and with_grad:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_dev: dict = {}
        for p in with_grad:
            g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
            by_dev.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), grads in by_dev.items():
            torch._foreach_mul_(grads, coef.to(dev))
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
    """One optimizer step through the pipeline schedule (microbatching happens inside;
    autocast, when on, is the stages' own: Pipeline(amp_dtype=...)). The grad norm is
    one all-reduce over all ranks (clip_grad_norm)."""
    loss = pipe.forward_backward(x, y, device)
    norm = clip_grad_norm(list(pipe.parameters()), grad_clip, pp_group=pipe.pp_group,
                          skip=pipe.tied_duplicate(), device=device)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss, norm


def train_step(model, optimizer, micro_batches, device, amp_dtype, grad_clip: float,
               teacher=None, distill=None, clock=None):
    """One optimizer step over this rank's micro-batches.

    Loss of each micro-batch is divided by the number of micro-batches, so the gradient
    is the mean over this rank's sequences; the dp wrapper then averages ranks, giving
    the mean over the global batch whatever the world size.
    Returns (mean loss on this rank as a 0-d tensor, grad norm tensor).
    clock: times the forward passes (this rank's own work, before DDP's all-reduce in
    backward waits on the others; raygpt.train.stragglers).
    """
    span = clock.span if clock is not None else contextlib.nullcontext
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with grad_sync(model, enabled=(i == n - 1)):
            with autocast_ctx(device, amp_dtype), span():
                if teacher is None:
                    _, loss = model(x, y, return_logits=False)
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
                _, loss = model(x.to(device), y.to(device), return_logits=False)
            total += loss.float()
            count += 1
    model.train()
    return total / max(1, count)
