"""The Ray-free Trainer and CheckpointManager on real gloo process groups (one rank in
this process; two ranks in spawned processes), no Ray: exact resume with dropout,
stop-and-resume at the step reached, the schedule horizon kept, async saves reported
when they finish."""
from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port as _free_port  # outside the ephemeral range
from raygpt.config import load_config
from raygpt.parallel.plan import ParallelPlan
from raygpt.train.checkpoint.discovery import is_complete, latest_checkpoint, list_checkpoints
from raygpt.train.checkpoint.io import read_state
from raygpt.train.checkpoint.rng import RNG_DIR
from raygpt.train.metrics import read_metrics
from raygpt.train.trainer import STOP, STOP_INTERRUPT, STOP_NONE, STOP_PREEMPT, Hooks, Trainer, dropout_seed


def _cfg(data, *sets):
    return load_config("debug", overrides=[
        f"data.path={data}", "model.dropout=0.1", "train.log_every=1", "train.eval_every=10",
        "train.max_steps=20", "optim.decay_steps=20", "checkpoint.every=10", "run.cpus_per_worker=1", *sets])


class _Reports:
    def __init__(self):
        self.ckpts: list[tuple[int, int]] = []  # (checkpoint step, trainer step when reported)
        self.trainer = None

    def checkpoint(self, path, step, metrics, mode):
        self.ckpts.append((step, self.trainer.step if self.trainer else -1))


def _run(data, root: Path, *sets, rank=0, world=1, restore=True, stop_at=None, use_async=False,
         after_step=None, run_dir=None):
    """One segment: build, restore the latest checkpoint in `root`, train. -> trainer."""
    rep = _Reports()
    state = {"trainer": None}
    hooks = Hooks(report_checkpoint=rep.checkpoint,
                  stop_code=lambda: STOP_INTERRUPT if stop_at is not None and state["trainer"].step >= stop_at
                  else STOP_NONE)
    if after_step is not None:
        hooks.after_step = after_step
    tr = Trainer(_cfg(data, *sets), data, rank=rank, world=world, run_dir=run_dir, ckpt_root=root, hooks=hooks,
                 use_async=use_async)
    state["trainer"] = rep.trainer = tr
    choice = tr.ckpt.choose_restore(None)
    if restore and choice is not None:
        tr.restore(choice)
    tr.summary = tr.train()
    tr.reports = rep
    return tr


def _params(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for p in tr.parts:
        for k, v in p.state_dict().items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = v.detach().clone()
    return out


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_dropout_resume_is_exact_and_stop_resumes_where_it_stopped(one_rank, char_data, tmp_path):
    straight = _run(char_data, tmp_path / "straight")
    assert straight.summary["steps"] == 20 and straight.summary["final_val_loss"] is not None
    # Stopped at step 7 (a Ctrl-C): a checkpoint at 7, not at the periodic 10; resume to 20.
    first = _run(char_data, tmp_path / "stopped", stop_at=7)
    assert first.summary["steps"] == 7 and first.summary["stopped"] == "interrupt"
    assert read_state(latest_checkpoint(tmp_path / "stopped"))["step"] == 7
    resumed = _run(char_data, tmp_path / "stopped")
    assert resumed.start_step == 7 and resumed.summary["steps"] == 20
    diff = _max_diff(_params(straight), _params(resumed))
    assert diff < 1e-5, f"dropout 0.1: resumed parameters differ from the straight run by {diff:.2e}"
    # The same resume without the saved RNG state (fresh dropout streams) does differ:
    # the check above would see a missing RNG restore.
    for f in (latest_checkpoint(tmp_path / "stopped") / RNG_DIR).glob("*.pt"):
        f.unlink()
    ck7 = tmp_path / "stopped" / "checkpoint_0000007"
    for d in (tmp_path / "stopped").glob("checkpoint_*"):
        if d != ck7:
            import shutil

            shutil.rmtree(d)
    for f in (ck7 / RNG_DIR).glob("*.pt"):
        f.unlink()
    reseeded = _run(char_data, tmp_path / "stopped")
    assert _max_diff(_params(straight), _params(reseeded)) > 1e-4


def test_a_time_limit_checkpoints_and_ends_the_run(one_rank, char_data, tmp_path):
    tr = _run(char_data, tmp_path / "ck", "train.max_steps=100000", "run.time_limit_s=2",
              "checkpoint.every=0", run_dir=tmp_path / "run")
    assert tr.summary["stopped"] == "time_limit" and 0 < tr.summary["steps"] < 100000
    assert [s for s, _ in tr.reports.ckpts] == [tr.summary["steps"]]  # the stop's checkpoint, reported
    assert read_state(latest_checkpoint(tmp_path / "ck"))["step"] == tr.summary["steps"]
    recs = read_metrics(tmp_path / "run")
    start, stop = recs[0]["time"], next(r for r in recs if r.get("event") == "stop")
    assert stop["reason"] == "time_limit" and stop["time"] - start >= 2 - 0.1  # the limit counts from the start


def test_a_preemption_another_rank_saw_first_is_recorded_with_its_notice(one_rank, char_data, tmp_path):
    """The ranks agree on a stop code, but each polls for the drain notice on its own:
    rank 0 can stop for a preemption that only rank 1's poll has seen. Its `preemption`
    event then still names the nodes, ranks and deadline (CI once saw nodes=None)."""
    import time

    notice = {"gen": "g", "nodes": ["n1"], "ranks": [1], "deadline": time.time() + 60, "posted": time.time()}
    state = {}
    hooks = Hooks(stop_code=lambda: STOP_PREEMPT if state["t"].step >= 5 else STOP_NONE,
                  drain_notice=lambda: notice)
    STOP.notice = None  # this rank's own watcher has not seen it
    try:
        tr = state["t"] = Trainer(_cfg(char_data), char_data, run_dir=tmp_path / "run", ckpt_root=tmp_path / "ck",
                                  hooks=hooks)
        assert tr.train()["stopped"] == "preemption"
    finally:
        STOP.notice = None
    recs = read_metrics(tmp_path / "run")
    (ev,) = [r for r in recs if r.get("event") == "preemption"]
    assert ev["nodes"] == ["n1"] and ev["ranks"] == [1] and 50 < ev["deadline_left_s"] <= 60, ev
    (ck,) = [r for r in recs if r.get("event") == "preemption_checkpoint"]
    assert ck["step"] == ev["step"] and ck["deadline_left_s"] > 50


def test_checkpoint_every_auto_saves_at_youngs_interval(one_rank, char_data, tmp_path):
    """run.mtbf_s=1: nothing measured yet, so a save at the first agreed step (its cost
    is C), then every sqrt(2 x C x 1 s), well under a second here."""
    tr = _run(char_data, tmp_path / "ck", "train.max_steps=100000", "run.time_limit_s=4",
              "checkpoint.every=auto", "run.mtbf_s=1", "train.eval_every=100000", run_dir=tmp_path / "run")
    recs = read_metrics(tmp_path / "run")
    choices = [r for r in recs if r.get("event") == "checkpoint_interval"]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    assert choices[0]["save_from"].startswith("assumed"), choices[0]
    assert choices[0]["mtbf_from"] == "run.mtbf_s" and choices[0]["mtbf_s"] == 1.0
    assert saves[0]["step"] == 2  # step 1's agreement asked for it
    measured = choices[1]
    assert measured["save_from"] == "median of 1 save(s)", choices
    assert measured["interval_s"] == pytest.approx(math.sqrt(2 * saves[0]["blocked_s"]), abs=0.01)
    # each later save at least the interval in force (the last logged, within 10 %) after the one before
    timed = [r for r in saves if r["step"] != tr.summary["steps"]]  # not the time limit's stop save
    for a, b in zip(timed[1:], timed[2:]):
        logged = [c["interval_s"] for c in choices if c["time"] <= b["time"]][-1]
        assert b["time"] - a["time"] >= 0.9 * logged - 0.02, (a, b, logged)
    assert len(timed) >= 3, saves
    s = tr.summary["checkpoint_interval"]
    assert s["every"] == "auto" and s["interval_s"] == pytest.approx(
        math.sqrt(2 * s["save_s"] * 1.0), abs=0.01)
    # With a long MTBF the same run saves to measure, then only when the limit stops it.
    tr = _run(char_data, tmp_path / "ck2", "train.max_steps=100000", "run.time_limit_s=2",
              "checkpoint.every=auto", "run.mtbf_s=1e9", "train.eval_every=100000", run_dir=tmp_path / "run2")
    assert [s for s, _ in tr.reports.ckpts] == [2, tr.summary["steps"]]


def test_schedule_horizon_is_kept_from_the_first_start(one_rank, char_data, tmp_path):
    _run(char_data, tmp_path, "train.max_steps=10", "optim.decay_steps=null")
    assert read_state(latest_checkpoint(tmp_path))["decay_steps"] == 10
    longer = Trainer(_cfg(char_data, "train.max_steps=30", "optim.decay_steps=null"), char_data,
                     run_dir=None, ckpt_root=tmp_path)
    longer.restore(latest_checkpoint(tmp_path))
    assert longer.horizon == 10  # not the new max_steps: the walked schedule stays
    assert longer.lr(15) == pytest.approx(longer.cfg.optim.min_lr)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_save_is_reported_when_it_finishes(one_rank, char_data, tmp_path, mode):
    """A finished async save is reported at the next step (not at the next save), and is
    on disk, complete, where the restore choice looks. The test waits for each write
    to finish at the step after the save, which bounds the step of the report."""

    allocations = []

    def wait_for_write(tr, step):
        if step % 5 == 1 and tr.ckpt.pending is not None:
            tr.ckpt.pending[0].result()
            assert latest_checkpoint(tmp_path).name == f"checkpoint_{step - 1:07d}"
        if step in (6, 11):  # staging is done when save() returns, reported or not
            allocations.append(tr.ckpt._stager.allocations)

    tr = _run(char_data, tmp_path, "train.max_steps=15", "checkpoint.every=5", f"checkpoint.async_mode={mode}",
              use_async=True, after_step=wait_for_write)
    # Reported at the save's own step or the next (write already done) or, at the latest,
    # at the step after the wait above; the last save is synchronous.
    assert [s for s, _ in tr.reports.ckpts] == [5, 10, 15]
    assert all(saved <= when <= saved + 2 for saved, when in tr.reports.ckpts), tr.reports.ckpts
    assert [read_state(c)["step"] for c in list_checkpoints(tmp_path)] == [5, 10, 15]
    # One stager for every async save: the second staged into the first's buffers.
    assert len(allocations) == 2 and allocations[0] == allocations[1] > 0, allocations


def test_dropout_streams_differ_across_dp_and_agree_across_tp():
    plan = ParallelPlan(world_size=4, strategy="tp", replicate=2, tp=2)
    seeds = [dropout_seed(1337, plan.dp_rank(r)) for r in range(4)]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3]  # TP ranks of one replica
    assert seeds[0] != seeds[2]  # two data-parallel replicas


# ------------------------------------------------------------------ two ranks, no Ray


def _two_rank_main(rank: int, port: int, data: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    try:
        res = {}
        for strategy in ("ddp", "tp"):
            root = Path(out) / strategy
            sets = (f"parallel.strategy={strategy}",)
            straight = _run(Path(data), root / "straight", *sets, rank=rank, world=2)
            _run(Path(data), root / "resumed", *sets, "train.max_steps=10", rank=rank, world=2)
            resumed = _run(Path(data), root / "resumed", *sets, rank=rank, world=2)
            res[strategy] = {"diff": _max_diff(_params(straight), _params(resumed)), "start": resumed.start_step}
        if rank == 0:
            torch.save(res, Path(out) / "result.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_dropout_resume_is_exact(char_data, tmp_path):
    """World 2, data parallel (DDP) and tensor parallel, dropout 0.1: 10 steps, stop,
    resume to 20 equals the straight 20 (one spawn of two processes for both plans)."""
    mp.spawn(_two_rank_main, args=(_free_port(), str(char_data), str(tmp_path)), nprocs=2)
    res = torch.load(tmp_path / "result.pt")
    for strategy, r in res.items():
        assert r["start"] == 10
        assert r["diff"] < 1e-5, f"{strategy}, dropout 0.1: resume differs from the straight run by {r['diff']:.2e}"


def _two_rank_process_saves(rank: int, port: int, data: str, out: str) -> None:
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"  # as Ray Train's env:// setup leaves it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    try:
        sets = ("parallel.strategy=fsdp", "checkpoint.async_mode=process", "train.max_steps=10",
                "checkpoint.every=5", "model.dropout=0.0")
        root = Path(out)
        straight = _run(Path(data), root, *sets, rank=rank, world=2, use_async=True)
        saves = [(c.name, is_complete(c)) for c in list_checkpoints(root)]
        dist.barrier()
        if rank == 0:  # resume from the step-5 save, the one the checkpoint processes wrote
            import shutil

            shutil.rmtree(root / "checkpoint_0000010")
        dist.barrier()
        resumed = _run(Path(data), root, *sets, rank=rank, world=2, use_async=True)
        from torch.distributed.checkpoint._async_process_executor import _CHECKPOINT_PROCESS

        res = {"saves": saves, "start": resumed.start_step, "writer_process": _CHECKPOINT_PROCESS is not None,
               "diff": _max_diff(_params(straight), _params(resumed))}
        torch.save(res, Path(out) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_fsdp_async_saves_written_by_checkpoint_processes_resume_exactly(char_data, tmp_path):
    """checkpoint.async_mode=process at world 2 under FSDP: each rank's checkpoint process
    (its own gloo group) writes the sharded step-5 save; resuming from it reaches the
    straight run's parameters."""
    mp.spawn(_two_rank_process_saves, args=(_free_port(), str(char_data), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"result{rank}.pt")
        assert r["saves"] == [("checkpoint_0000005", True), ("checkpoint_0000010", True)], r
        assert r["writer_process"] and r["start"] == 5, r
        assert r["diff"] < 1e-5, f"rank {rank}: resume differs from the straight run by {r['diff']:.2e}"
