"""The Trainer's side of `run.fault_tolerance: replica` (issue 30; the quorum itself is
raygpt.parallel.replica).

Each worker is one data-parallel replica: torch.distributed is a group of one, the data
slice is (replica index, replicas), and the per-step collectives go through the quorum.
What changes for the Trainer:

- start: the first quorum decides between healing and restoring. A replacement that
  meets live replicas ahead of it copies their state (model, optimizer, counters) from a
  peer and reads no checkpoint; a group that starts together restores the newest
  checkpoint, as in restart mode.
- steps: a step is computed at the quorum's step and counts only if every replica in the
  quorum all-reduced it (else it is redone: no committed step is ever lost or repeated).
- the per-step agreement is a SUM all-reduce of every replica's row (zeros for the
  missing): who is in the quorum, stop requests, saves in flight, straggler timings.
- the leader (the lowest replica in the quorum) writes metrics, checkpoints and the
  summary; the others write nothing, so a lost replica 0 loses no record. A change of
  the quorum is a `replica_quorum` event (the steps' samples are a function of step and
  replica index, so the event says exactly which samples each step consumed); a
  replacement that healed writes `replica_joined`.
"""
from __future__ import annotations

import time

import torch


# A quorum this slow waited on something (a normal one takes a few ms on one machine).
STALL_QUORUM_S = 0.5


class ReplicaMember:
    def __init__(self, trainer, group):
        self.t, self.group = trainer, group
        self.present: list[int] = list(range(group.count))
        self.leader = 0
        self.healed_step: int | None = None   # the step a replacement healed to
        self.committed_with = group.count     # replicas in the quorum of the last committed step
        self._quorum_ready = False
        self._quorum_stall = 0.0
        self.gated = group.gated(trainer.optimizers[0])
        m, opt = trainer.parts[0], trainer.optimizers[0]
        group.register_state("model", m.state_dict, m.load_state_dict)
        group.register_state("optim", opt.state_dict, opt.load_state_dict)
        group.register_state("trainer", self._dump, self._load)

    # ------------------------------------------------------------ healing
    def _dump(self) -> dict:
        t = self.t
        return {"best_val": t.best_val, "last_val": t.last_val, "horizon": t.horizon,
                "train_seconds": t.train_seconds_prev + t.train_time}

    def _load(self, sd: dict) -> None:
        t = self.t
        t.best_val, t.last_val, t.horizon = sd["best_val"], sd["last_val"], sd["horizon"]
        t.train_seconds_prev, t.train_time = sd["train_seconds"], 0.0
        t.reseed_dropout(self.group.step)  # its own stream: the peer's is another replica index's

    def join(self) -> bool:
        """The first quorum. -> True when this replica healed from a live peer (nothing to
        restore); False when the group starts together (restore the checkpoint, then
        set_step)."""
        t0 = time.perf_counter()
        step = self.group.begin_step()
        self._quorum_ready = True
        if self.group.heals == 0:
            return False
        t = self.t
        t.step = t.start_step = step
        t._saved_at = step
        self.healed_step = step
        # Who is in the quorum is unknown to a replacement: its first one is a change to
        # record. When it is the lowest replica it leads from then on, and the old leader,
        # which saw the change too, no longer writes.
        self.present = []
        self.heal_s = time.perf_counter() - t0
        return True

    def set_step(self, step: int) -> None:
        self.group.set_step(step)

    # ------------------------------------------------------------ steps
    def begin(self) -> int:
        """The step to compute: the first quorum's, or a new quorum's (a replica that fell
        behind heals inside it)."""
        if self._quorum_ready:
            self._quorum_ready = False
            return self.group.step
        t0 = time.perf_counter()
        step = self.group.begin_step()
        wait = time.perf_counter() - t0
        if wait >= STALL_QUORUM_S:
            self._quorum_stall += wait
        return step

    def take_quorum_stall(self) -> float:
        """Seconds the last step's quorum waited (a lost peer's heartbeat ageing out, a
        replacement joining): the ledger's `detection`, not step time."""
        wait, self._quorum_stall = self._quorum_stall, 0.0
        return wait

    @property
    def committed(self) -> bool:
        return self.gated.committed

    @property
    def is_leader(self) -> bool:
        return self.t.rank == self.leader

    # ------------------------------------------------------------ the per-step agreement
    def rows(self, mine: list[int]) -> list[list[int]]:
        """Every replica's agreement row (zeros for one not in the quorum); updates who
        leads and records a change of the quorum. After a failed all-reduce only this
        replica's own row, and who leads stays as it was (each survivor alone would
        otherwise think itself the leader: two writers of the same step)."""
        got = self.group.gather(mine)
        if got is None:
            return [mine]
        present = [i for i, r in enumerate(got) if r is not None]
        self.leader = min(present)
        t = self.t
        if t.run_dir is not None:
            t.writer.enabled = self.is_leader
        if present != self.present:
            t.writer.event("replica_quorum", step=t.step, replicas=present,
                           missing=[i for i in range(self.group.count) if i not in present])
            self.present = present
        return [r if r is not None else [0] * len(mine) for r in got]

    def mean(self, x: torch.Tensor) -> float:
        return self.group.mean(x)

    def start_event(self) -> None:
        """`replica_joined` from a replacement that healed (written by itself: it is not
        the leader yet); a group that started together writes the usual `start`."""
        w = self.t.writer
        was, w.enabled = w.enabled, self.t.run_dir is not None
        w.event("replica_joined", step=self.healed_step, replica=self.group.index,
                heal_s=round(self.heal_s, 4), replicas=self.group.participants())
        w.enabled = was

    def close(self) -> None:
        self.group.shutdown()


def keep_newest(root, keep: int):
    """The checkpoint `report` of replica mode: no Ray report (a barrier across every
    worker: with a replica missing it would block the others), so the run keeps its own
    `checkpoint.keep` newest complete checkpoints. -> a report function (path, step,
    metrics, mode)."""
    import shutil

    from raygpt.train.checkpoint.discovery import complete_checkpoints

    def report(path, step, metrics, mode) -> None:
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    return report
