"""ParallelPlan: how a world of N ranks splits into replicate x shard x tensor.

Mesh layout is row-major over (dp_replicate, dp_shard, tp): ranks that share a tensor-
parallel group are adjacent (they exchange the most data, so they belong on one node).
Ranks in one tp group see the same data; the data-parallel rank is rank // tp.
"""
from __future__ import annotations

from dataclasses import dataclass

from raygpt.errors import UserError

STRATEGIES = ("auto", "none", "ddp", "fsdp", "hsdp", "tp")


class PlanError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ParallelPlan:
    world_size: int
    strategy: str  # resolved: none | ddp | fsdp | hsdp | tp (tp may be combined with fsdp)
    replicate: int = 1
    shard: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        prod = self.pp * self.replicate * self.shard * self.tp
        if prod != self.world_size:
            raise PlanError(
                f"parallel plan '{self.strategy}': pp={self.pp} x replicate={self.replicate} x "
                f"shard={self.shard} x tp={self.tp} = {prod}, but the world size is {self.world_size}"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct slices of the global batch."""
        return self.replicate * self.shard

    def dp_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.dp

    def pp_rank(self, rank: int) -> int:
        return rank // (self.dp * self.tp)

    def describe(self) -> str:
        parts = [f"{self.strategy}", f"world={self.world_size}"]
        if self.pp > 1:
            parts.append(f"pp={self.pp}")
        if self.replicate > 1:
            parts.append(f"replicate={self.replicate}")
        if self.shard > 1:
            parts.append(f"shard={self.shard}")
        if self.tp > 1:
            parts.append(f"tp={self.tp}")
        return " ".join(parts)

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        dims = [("pp", self.pp), ("dp_replicate", self.replicate), ("dp_shard", self.shard), ("tp", self.tp)]
        dims = [(n, s) for n, s in dims if s > 1] or [("dp_replicate", 1)]
        return tuple(s for _, s in dims), tuple(n for n, _ in dims)

    def build_mesh(self, device_type: str):
        """DeviceMesh over the current process group (None for a single rank)."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.mesh_shape()
        return init_device_mesh(device_type, shape, mesh_dim_names=names)


def _divisors_msg(world: int) -> str:
    return ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)


def resolve_plan(pcfg, world_size: int, n_heads: int | None = None, n_params: int | None = None,
                 device_memory: int | None = None, on_gpu: bool = False) -> ParallelPlan:
    """pp x (replicate x shard x tp): the pipeline degree splits the world first; the
    rest is resolved as below for world_size / pp ranks per stage."""
    import dataclasses

    pp = getattr(pcfg, "pp_degree", 1)
    if pp == 1:
        return _resolve_inner(pcfg, world_size, n_heads, n_params, device_memory, on_gpu)
    if world_size % pp:
        raise PlanError(
            f"parallel.pp_degree={pp} does not divide the world size {world_size} "
            f"(divisors: {_divisors_msg(world_size)})"
        )
    if pcfg.strategy == "ddp":
        raise PlanError("parallel.strategy=ddp cannot be combined with parallel.pp_degree>1: "
                        "use fsdp, hsdp or tp (with pipeline stages)")
    inner_cfg = pcfg.model_copy(update={"strategy": "fsdp" if pcfg.strategy in ("auto", "none") else pcfg.strategy})
    inner_world = world_size // pp
    inner = _resolve_inner(inner_cfg, inner_world, n_heads, n_params, device_memory, on_gpu)
    if inner.strategy == "ddp":  # hsdp with groups of one: shard instead (no DDP under pp)
        inner = ParallelPlan(inner_world, "fsdp", shard=inner.replicate)
    name = "pp" if inner.world_size == 1 else f"pp+{inner.strategy}"
    return dataclasses.replace(inner, world_size=world_size, strategy=name, pp=pp)


def _resolve_inner(pcfg, world_size: int, n_heads: int | None = None, n_params: int | None = None,
                   device_memory: int | None = None, on_gpu: bool = False) -> ParallelPlan:
    """Turn a ParallelConfig into a concrete plan for `world_size` ranks.

    Elastic restarts call this again with the new world size. ddp/fsdp/hsdp on one rank
    degrade to `none` (no wrapper at all: FSDP2 on one GPU measured 2.4x slower).
    """
    s = pcfg.strategy
    tp = pcfg.tp_degree
    if s == "tp" and tp == 1:
        tp = world_size  # all ranks in one tensor-parallel group
    if world_size % tp:
        raise PlanError(
            f"parallel.tp_degree={tp} does not divide the world size {world_size} "
            f"(divisors: {_divisors_msg(world_size)})"
        )
    if n_heads is not None and n_heads % tp:
        raise PlanError(f"model.n_head={n_heads} is not divisible by tensor-parallel degree {tp}")
    dp = world_size // tp

    if s == "auto":
        if tp > 1:
            s = "tp"
        elif world_size == 1:
            s = "none"
        elif on_gpu and n_params and device_memory and n_params * 16 > 0.5 * device_memory:
            # Params + grads + Adam moments (16 B/param in fp32) would not leave room for
            # activations on each device: shard them.
            s = "fsdp"
        else:
            s = "ddp"

    if s == "none":
        if world_size != 1:
            raise PlanError(
                f"parallel.strategy=none runs on exactly 1 worker, but the world size is "
                f"{world_size}: use ddp, fsdp, hsdp or tp"
            )
        return ParallelPlan(1, "none")
    if tp > 1 and s in ("ddp", "hsdp"):
        raise PlanError(
            f"parallel.strategy={s} cannot be combined with parallel.tp_degree={tp}: use "
            f"strategy tp (tensor parallel, with fsdp over the remaining ranks)"
        )
    if world_size == 1:
        return ParallelPlan(1, "none")
    if s == "ddp":
        return ParallelPlan(world_size, "ddp", replicate=world_size)
    if s == "fsdp":
        if pcfg.shard_degree not in (0, dp):
            raise PlanError(
                f"parallel.strategy=fsdp shards over all {dp} data-parallel ranks, but "
                f"parallel.shard_degree={pcfg.shard_degree}: set strategy hsdp to shard in groups"
            )
        return ParallelPlan(world_size, "fsdp", shard=dp)
    if s == "hsdp":
        shard = pcfg.shard_degree
        if shard < 1:
            raise PlanError("parallel.strategy=hsdp needs parallel.shard_degree (ranks per shard group)")
        if dp % shard:
            raise PlanError(
                f"parallel.shard_degree={shard} does not divide the data-parallel size {dp} "
                f"(world size {world_size}; divisors: {_divisors_msg(dp)})"
            )
        if shard == dp or shard == 1:
            # One group (= fsdp) or groups of one (= ddp): say so rather than pretend.
            return ParallelPlan(world_size, "fsdp" if shard == dp else "ddp",
                                replicate=dp // shard if shard == 1 else 1,
                                shard=shard if shard == dp else 1)
        return ParallelPlan(world_size, "hsdp", replicate=dp // shard, shard=shard)
    if s == "tp":
        return ParallelPlan(world_size, "tp", shard=dp, tp=tp)
    raise PlanError(f"unknown parallel.strategy={s!r}; known: {', '.join(STRATEGIES)}")
