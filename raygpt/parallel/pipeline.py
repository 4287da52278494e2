"""Pipeline parallelism with torch.distributed.pipelining (after torchtitan).

The GPT's blocks are split into consecutive, balanced stages; the first stage also owns
the embeddings, the last one the final norm, the head and the loss. A rank owns one
stage (gpipe, 1f1b) or two (interleaved: stages r and r + pp). Every rank builds the
whole model from the same seed and deletes what its stages do not own, so parameter
names (and so checkpoints) are those of the unsplit model.

The head is tied to the token embedding. Across stages that tie is kept as in Megatron:
the last stage gets its own copy of the embedding matrix, and after backward the first
and last stage sum their gradients of it, so both copies stay identical.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from raygpt.parallel.apply import parallelize
from raygpt.parallel.plan import ParallelPlan, PlanError


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Balanced consecutive block ranges; earlier stages take the remainder (the last
    stage also runs the head and the loss)."""
    if n_stages > n_layer:
        raise PlanError(f"{n_stages} pipeline stages for {n_layer} blocks: every stage needs a block")
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """The part of `model` that stage `stage` runs (model is consumed or copied)."""
    layers = stage_layers(len(model.blocks), n_stages)[stage]
    first, last = stage == 0, stage == n_stages - 1
    if last and not first:
        # Untie: the head gets its own copy of the embedding matrix (kept equal by
        # summing gradients with the first stage, see sync_tied_grads).
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    for name in list(model.blocks.keys()):
        if int(name) not in layers:
            del model.blocks[name]
    if not first:
        model.wte = None
        model.wpe = None
    if not last:
        model.ln_f = None
        model.lm_head = None
    return model


class Pipeline:
    """This rank's stages, their schedule, and the glue the training loop needs."""

    def __init__(self, model: nn.Module, plan: ParallelPlan, mesh, pcfg, device: torch.device,
                 n_microbatches: int, mp_dtype=None, amp_dtype=None):
        """mp_dtype: FSDP's parameter dtype (stages sharded with FSDP); amp_dtype: the
        autocast dtype for stages that are not (bf16 on GPU), as train_step uses."""
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        self.plan = plan
        self.pp_group = mesh["pp"].get_group()
        pp_rank = mesh["pp"].get_local_rank()
        v = 2 if pcfg.pp_schedule == "interleaved" else 1
        self.n_stages = plan.pp * v
        stage_ids = [pp_rank + k * plan.pp for k in range(v)]
        inner_mesh = _inner_mesh(mesh, plan)
        self.parts, self.stages = [], []
        for i, sid in enumerate(stage_ids):
            base = model if i == len(stage_ids) - 1 else copy.deepcopy(model)
            part = split_stage(base, sid, self.n_stages)
            # FSDP under a pipeline: keep the gathered weights for the whole step (the
            # schedule reshards after the last microbatch's backward) instead of gathering
            # them again for every microbatch's forward and backward.
            part = parallelize(part, plan, inner_mesh, pcfg, device, mp_dtype=mp_dtype,
                               reshard_after_forward=False)
            if amp_dtype is not None and amp_dtype != torch.float32:
                _autocast_forward(part, device, amp_dtype)
            self.parts.append(part)
            self.stages.append(PipelineStage(part, sid, self.n_stages, device, group=self.pp_group))
        self.has_first = 0 in stage_ids
        self.has_last = (self.n_stages - 1) in stage_ids
        self.tied_group = _tied_group(plan) if plan.pp > 1 else None

        def loss_fn(logits, targets):
            return nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

        if pcfg.pp_schedule == "gpipe":
            self.schedule = ScheduleGPipe(self.stages[0], n_microbatches, loss_fn=loss_fn)
        elif pcfg.pp_schedule == "1f1b":
            self.schedule = Schedule1F1B(self.stages[0], n_microbatches, loss_fn=loss_fn)
        else:
            if n_microbatches % plan.pp:
                raise PlanError(f"train.pp_microbatches={n_microbatches} must be a multiple of "
                                f"parallel.pp_degree={plan.pp} for the interleaved schedule")
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=loss_fn)

    # ------------------------------------------------------------ steps
    def _run(self, fn, x, y, device):
        losses: list[torch.Tensor] = []
        kwargs = {}
        if self.has_last:
            kwargs = {"target": y.to(device), "losses": losses}
        if self.has_first:
            fn(x.to(device), **kwargs)
        else:
            fn(**kwargs)
        if self.has_last:
            return torch.stack([loss.detach().float() for loss in losses]).mean()
        return torch.zeros((), device=device)

    def forward_backward(self, x, y, device) -> torch.Tensor:
        """One pipelined forward+backward over this rank's batch; grads are the mean over
        microbatches. Returns the mean loss on the last stage (0 elsewhere)."""
        loss = self._run(self.schedule.step, x, y, device)
        self.sync_tied_grads()
        return loss

    @torch.no_grad()
    def eval_loss(self, x, y, device) -> torch.Tensor:
        for p in self.parts:
            p.eval()
        loss = self._run(self.schedule.eval, x, y, device)
        for p in self.parts:
            p.train()
        return loss

    def sync_tied_grads(self) -> None:
        """Sum the embedding gradient of the first stage and the head gradient of the last
        stage (one matrix, untied across stages), so the two copies stay identical."""
        import torch.distributed as dist

        if self.tied_group is None:
            return
        grads = []
        for p in self.parts:
            if getattr(p, "wte", None) is not None and p.wte.weight.grad is not None:
                grads.append(_local(p.wte.weight.grad))
            if getattr(p, "lm_head", None) is not None and p.lm_head.weight.grad is not None:
                grads.append(_local(p.lm_head.weight.grad))
        if not grads:
            return
        buf = grads[0].clone()
        for g in grads[1:]:
            buf += g
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.tied_group)
        for g in grads:
            g.copy_(buf)

    def parameters(self):
        for p in self.parts:
            yield from (q for q in p.parameters() if q.requires_grad)

    def tied_duplicate(self):
        """Parameters to leave out of the global grad norm: the last stage's copy of the
        tied matrix (the first stage counts it)."""
        if self.plan.pp == 1:
            return set()
        return {id(p.lm_head.weight) for p in self.parts if getattr(p, "lm_head", None) is not None
                and getattr(p, "wte", None) is None}


def _autocast_forward(part: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Run this stage's forward under autocast (the schedule calls the module itself, so
    there is no training-loop `with` to put it in). Backward follows the forward's
    dtypes; the loss function casts the logits to fp32."""
    part.forward = torch.autocast(device_type=device.type, dtype=dtype)(part.forward)


def _tied_group(plan: ParallelPlan):
    """For each (dp, tp) coordinate, a group of its first- and last-stage ranks. Every
    rank creates every group (new_group is collective), keeping the one it is in."""
    import torch.distributed as dist

    inner = plan.dp * plan.tp
    mine = None
    me = dist.get_rank()
    for c in range(inner):
        ranks = [c, (plan.pp - 1) * inner + c]
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    return mine


def _local(t):
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _inner_mesh(mesh, plan: ParallelPlan):
    """The mesh without the pp dimension (for tp / fsdp inside a stage)."""
    names = [n for n in mesh.mesh_dim_names if n != "pp"]
    if not names:
        return None
    return mesh[tuple(names)] if len(names) > 1 else mesh[names[0]]
