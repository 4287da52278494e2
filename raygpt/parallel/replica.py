"""Replica groups for `run.fault_tolerance: replica` (issue 30): each worker is one
data-parallel replica in a torchft quorum instead of one rank of a fixed process group.

A replica that dies or freezes drops out of the quorum; the others go on at the next
step with the gradient averaged over the replicas that committed it; a replacement
fetches model, optimizer and trainer state from a live peer (torchft's PGTransport over
the reconfigured group: no checkpoint read) and is counted in again. torchft's Manager
does the quorum, the fault-tolerant all-reduce and the healing; this module is the one
place raygpt touches it (the model wrapper lives here, as every wrapper does in
raygpt/parallel).

The quorum is synchronous (start_quorum waits and heals before the step's forward), so a
healed replica knows its step before it reads its batch: the step's samples stay a
function of (step, replica index). torchft is optional: `pip install 'raygpt[ft]'`.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable

import torch

# The Lighthouse drops a replica whose heartbeat is this old (torchft's default: 5 s).
# Heartbeats come from a Rust thread every 100 ms, so a live but busy replica never
# misses one; a killed or frozen process does at once.
HEARTBEAT_TIMEOUT_MS = 2000


def torchft_missing() -> str | None:
    """None when torchft imports; else the one line that says how to get it."""
    try:
        import torchft  # noqa: F401
    except Exception as e:  # ImportError, or a broken optional dependency of it
        return (f"run.fault_tolerance=replica needs torchft ({type(e).__name__}: {e}); "
                "install it with: pip install 'raygpt[ft]'")
    return None


# A new quorum waits this long at most for a replica that heartbeats but has not asked
# (one between its manager's start and its first quorum: a second or two).
JOIN_TIMEOUT_MS = 5000


def lighthouse_kwargs() -> dict:
    """The Lighthouse's quorum rules: any one replica may step; a lost one is dropped
    after HEARTBEAT_TIMEOUT_MS."""
    return {"min_replicas": 1, "heartbeat_timeout_ms": HEARTBEAT_TIMEOUT_MS, "join_timeout_ms": JOIN_TIMEOUT_MS}


class ReplicaGroup:
    """This worker's place in the quorum: replica `index` of `count`.

    timeout_s bounds a collective with a lost peer (the step is then not committed and
    redone with the replicas that are left); quorum_timeout_s bounds the wait for a
    quorum (above the slowest replacement start)."""

    def __init__(self, index: int, count: int, device: torch.device, timeout_s: float,
                 quorum_timeout_s: float):
        import logging

        # torchft logs every quorum and commit at INFO (its Rust side reads RUST_LOG once)
        os.environ.setdefault("RUST_LOG", "warn")
        logging.getLogger("torchft").setLevel(logging.WARNING)
        from torchft import Manager
        from torchft.checkpointing.pg_transport import PGTransport

        self.index, self.count, self.device = index, count, device
        t = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            from torchft import ProcessGroupNCCL as PG
        else:
            from torchft import ProcessGroupGloo as PG
        self.pg = PG(timeout=t)
        self._state: dict[str, tuple[Callable, Callable]] = {}
        self.heals = 0
        transport = PGTransport(self.pg, timeout=t, device=device)
        # One worker per replica group: the group's TCPStore is the one Ray set up for its
        # (size-1) torch.distributed group (MASTER_ADDR/PORT); TORCHFT_LIGHTHOUSE from Ray.
        self.manager = Manager(
            pg=self.pg, min_replica_size=1, load_state_dict=None, state_dict=None,
            use_async_quorum=False, timeout=t, quorum_timeout=timedelta(seconds=quorum_timeout_s),
            rank=0, world_size=1, replica_id=f"raygpt_{index}", checkpoint_transport=transport,
            # every replica builds the same weights from the seed (or restores the same
            # checkpoint): nothing to copy at step 0, so a heal always means "behind"
            init_sync=False)
        self.manager.register_state_dict_fn("raygpt", self._load, self._dump)

    # ------------------------------------------------------------ state for healing
    def register_state(self, name: str, dump: Callable[[], object], load: Callable[[object], None]) -> None:
        """What a replacement copies from a live peer, under `name` (model, optimizer,
        the trainer's counters)."""
        self._state[name] = (dump, load)

    def _dump(self) -> dict:
        return {k: dump() for k, (dump, _) in self._state.items()}

    def _load(self, sd: dict) -> None:
        for k, (_, load) in self._state.items():
            load(sd[k])
        self.heals += 1

    # ------------------------------------------------------------ the model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP whose gradient all-reduce goes through the quorum (mean over the replicas
        in it); a failed one marks the step as not to be committed."""
        from torchft import DistributedDataParallel

        return DistributedDataParallel(self.manager, model)

    def gated(self, optimizer: torch.optim.Optimizer) -> "CommitGatedOptimizer":
        return CommitGatedOptimizer(self, optimizer)

    # ------------------------------------------------------------ steps
    def set_step(self, step: int) -> None:
        """The step a group that started together restored (the quorum compares steps)."""
        self.manager.load_state_dict({"step": step, "batches_committed": 0})

    def begin_step(self) -> int:
        """A quorum for the next step (a replica that fell behind heals inside). -> the
        step to compute."""
        self.manager.start_quorum()
        return self.manager.current_step()

    def commit(self) -> bool:
        """After backward: did every replica in the quorum all-reduce this step?"""
        return self.manager.should_commit()

    @property
    def step(self) -> int:
        return self.manager.current_step()

    def participants(self) -> int:
        return self.manager.num_participants()

    # ------------------------------------------------------------ small collectives
    def gather(self, row: list[int]) -> list[list[int] | None] | None:
        """Every replica's `row` (None for one not in the quorum), through one SUM
        all-reduce of a count x (1 + len(row)) matrix; None if the all-reduce failed (a
        peer went away mid-step: nobody knows who is left until the next quorum)."""
        from torch.distributed import ReduceOp

        m = torch.zeros(self.count, 1 + len(row), dtype=torch.float64)
        m[self.index, 0] = 1.0
        m[self.index, 1:] = torch.tensor(row, dtype=torch.float64)
        if not self._allreduce(m, ReduceOp.SUM):
            return None
        return [[int(round(v)) for v in r[1:].tolist()] if r[0] >= 0.5 else None for r in m]

    def mean(self, t: torch.Tensor) -> float:
        """Mean of a scalar over the replicas in the quorum (this one's own if that fails)."""
        from torch.distributed import ReduceOp

        x = t.detach().double().reshape(1).clone()
        return float(x) if self._allreduce(x, ReduceOp.AVG) else float(t)

    def _allreduce(self, x: torch.Tensor, op) -> bool:
        """In place over the quorum; False when a peer was lost (x is then garbage)."""
        return bool(self.manager.allreduce(x, reduce_op=op).wait()) and self.manager.errored() is None

    def shutdown(self) -> None:
        try:
            self.manager.shutdown(wait=False)
        except Exception:  # a manager torn down with its process: nothing to keep
            pass


class CommitGatedOptimizer:
    """The optimizer step only when the quorum commits the step (torchft's rule: a step
    some replica could not all-reduce is thrown away on every replica and redone)."""

    def __init__(self, group: ReplicaGroup, optimizer: torch.optim.Optimizer):
        self.group, self.optimizer = group, optimizer
        self.committed = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self) -> None:
        self.committed = self.group.commit()
        if self.committed:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


