"""The only code that wraps the model (after torchtitan's parallelize step).

Order matters, as in torchtitan: tensor parallel first (turns weights into DTensors on
the tp mesh), then activation checkpointing and compile per block, then FSDP2 per block
and at the root (or DDP for pure replication).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from raygpt.parallel.plan import ParallelPlan


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Megatron-style: q/k/v and MLP up-projection column-wise (by heads / hidden units),
    output projections row-wise (one all-reduce per sub-layer). Embeddings, norms and the
    tied head stay replicated."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    for block in model.blocks.values():
        block.attn.fuse_qkv = False  # the sharded q/k/v weights must stay separate
        parallelize_module(block, tp_mesh, plan)


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in backward (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.blocks.items()):
        model.blocks[name] = checkpoint_wrapper(block, preserve_rng_state=True)


# parallel.attention -> torch's SDPBackend name.
ATTENTION_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                      "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_attention_ctx = None  # the sdpa_kernel context this process keeps entered


def set_attention_backend(name: str) -> None:
    """Try SDPA backend `name` first in this process, every other one after it.

    A process-wide choice (torch keeps it in global flags), made before the first forward:
    torch.compile picks the kernel when it traces. Entering torch's own sdpa_kernel context
    and leaving it entered keeps to its public API; a later call restores the previous
    order first. "auto" restores torch's order."""
    global _attention_ctx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _attention_ctx is not None:
        _attention_ctx.__exit__(None, None, None)
        _attention_ctx = None
    if name == "auto":
        return
    first = getattr(SDPBackend, ATTENTION_BACKENDS[name])
    rest = [getattr(SDPBackend, b) for b in ATTENTION_BACKENDS.values() if getattr(SDPBackend, b) != first]
    _attention_ctx = sdpa_kernel([first, *rest], set_priority=True)
    _attention_ctx.__enter__()


def apply_compile(model: nn.Module, whole: bool = False, mode: str = "default") -> None:
    """Compile in place (module.compile keeps parameter names unchanged, so checkpoints
    stay loadable by an uncompiled model).

    whole=True: the whole model with its loss as one graph (embeddings, blocks, head,
    fp32 cast and cross-entropy fused; the fastest on one device).
    Otherwise each block, plus the head with its loss as a second graph (DDP/FSDP/TP/
    pipeline stages: their gradient hooks fire per block, so communication overlaps the
    rest of backward), so the fp32 logits and the cross-entropy never run eagerly."""
    kw = {} if mode == "default" else {"mode": mode}
    if whole:
        model.compile(**kw)
        return
    for block in model.blocks.values():
        block.compile(**kw)
    if getattr(model, "lm_head", None) is not None and hasattr(model, "head_loss"):
        model.head_loss = torch.compile(model.head_loss, **kw)


def compile_whole(plan: ParallelPlan, pcfg) -> bool:
    """parallel.compile_mode: 'model', 'blocks', or 'auto' (the whole model on one rank;
    with several, a one-graph backward would hand DDP/FSDP every gradient at its end and
    leave no communication to overlap)."""
    mode = getattr(pcfg, "compile_mode", "auto")
    if mode != "auto":
        return mode == "model"
    return plan.world_size == 1


def apply_fsdp(model: nn.Module, dp_mesh, mp_dtype: torch.dtype | None, reshard_after_forward=True):
    """FSDP2: shard each block, then the root (embeddings, final norm, tied head).
    A 2-D dp mesh (replicate, shard) gives HSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else None
    kw = {"mesh": dp_mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # The last block's params are needed again at once by backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # Bucket view: grads alias the all-reduce buckets (one copy fewer per step).
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def parallelize(model: nn.Module, plan: ParallelPlan, mesh, pcfg, device: torch.device,
                mp_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Move `model` to `device` and wrap it for `plan`. Returns the module to train.

    reshard_after_forward=False keeps FSDP's gathered weights from forward to backward
    (pipeline stages: otherwise every microbatch gathers them twice)."""
    model.to(device)
    set_attention_backend(getattr(pcfg, "attention", "auto"))
    for block in model.blocks.values():
        block.attn.fuse_qkv = getattr(pcfg, "fuse_qkv", True)
    if plan.tp > 1:
        apply_tp(model, mesh["tp"])
    if pcfg.activation_checkpointing:
        apply_ac(model)
    if pcfg.compile:
        apply_compile(model, whole=compile_whole(plan, pcfg), mode=getattr(pcfg, "inductor_mode", "default"))
    if plan.strategy == "ddp":
        return apply_ddp(model, device)
    if plan.shard > 1:  # fsdp, hsdp, tp+fsdp, pp+fsdp/hsdp (mesh here has no pp dim)
        if plan.replicate > 1:
            dp_mesh = mesh["dp_replicate", "dp_shard"]
        else:
            dp_mesh = mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, mp_dtype, reshard_after_forward=reshard_after_forward)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a DDP wrapper (FSDP2/TP modify the module in place)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "blocks") else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps that are
    not the last one (the last one reduces the accumulated sum once)."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield
