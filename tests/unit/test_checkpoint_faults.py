"""Storage faults around checkpoints, as real clusters see them, with no Ray: storage
that turns read-only or fills up mid-run (training goes on, the save is dropped on every
rank and the next one succeeds), and checkpoints that cannot be read for a moment (kept,
never pruned, skipped when choosing the latest) versus ones that are provably incomplete.

The faults are real ones, not mocks: a tmpfs remounted read-only or filled to the brim
(needs root: chmod does not stop root), a `.metadata` that is a directory
(IsADirectoryError), a file that is a symlink to itself (ELOOP)."""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port as _free_port  # outside the ephemeral range
from raygpt.config import load_config
from raygpt.train.checkpoint.discovery import checkpoint_status, is_complete, latest_checkpoint, list_checkpoints, resolve_checkpoint
from raygpt.train.checkpoint.io import STATE_FILE, CheckpointError, read_state
from raygpt.train.checkpoint.manager import CheckpointManager
from raygpt.train.checkpoint.rng import RNG_DIR
from raygpt.train.trainer import STOP_NONE, Hooks, Trainer


def _cfg(data, *sets):
    return load_config("debug", overrides=[
        f"data.path={data}", "train.log_every=1", "train.eval_every=100", "train.eval_steps=1",
        "train.max_steps=12", "optim.decay_steps=12", "checkpoint.every=3", "run.cpus_per_worker=1",
        "run.collective_timeout_s=60", *sets])


def _run(data, root: Path, *sets, run_dir=None, rank=0, world=1, use_async=False, after_step=None):
    """Build a Trainer on `root`, resume from its latest checkpoint, train. -> trainer,
    with .reported: the steps of the checkpoints it reported."""
    reported = []
    hooks = Hooks(report_checkpoint=lambda path, step, metrics, mode: reported.append(step),
                  stop_code=lambda: STOP_NONE)
    if after_step is not None:
        hooks.after_step = after_step
    tr = Trainer(_cfg(data, *sets), data, rank=rank, world=world, run_dir=run_dir, ckpt_root=root,
                 hooks=hooks, use_async=use_async)
    choice = tr.ckpt.choose_restore(None)
    if choice is not None:
        tr.restore(choice)
    tr.summary = tr.train()
    tr.reported = reported
    return tr


def _events(run_dir: Path, name: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == name]


def _steps(root: Path) -> list[int]:
    return [read_state(c)["step"] for c in list_checkpoints(root)]


def _digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


def _manager(root: Path, events: list):
    return CheckpointManager(load_config("debug").checkpoint, rank=0, world=1, ckpt_root=root,
                                      report=lambda *a: None, use_async=False,
                                      on_event=lambda name, **kw: events.append((name, kw)))


# ------------------------------------------------------------------ storage that refuses writes


class Storage:
    """A tmpfs of its own: `break_("read_only")` remounts it read-only (EROFS, root
    included), `break_("full")` fills it (ENOSPC, a few KiB left so small files may still
    fit and a save fails half-way); `repair` undoes either."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def _mount(self, *args: str) -> None:
        r = subprocess.run(["mount", *args, str(self.path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def break_(self, fault: str) -> None:
        if fault == "read_only":
            self._mount("-o", "remount,ro")
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)
        os.truncate(self.filler, max(0, self.filler.stat().st_size - 24 * 1024))

    def repair(self, fault: str) -> None:
        if fault == "read_only":
            self._mount("-o", "remount,rw")
        else:
            self.filler.unlink()


@pytest.fixture
def storage(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making storage read-only or full needs root (mount a tmpfs)")
    path = tmp_path / "ckpt"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield Storage(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("mode", ["sync", "thread", "process"])
@pytest.mark.parametrize("fault,errname", [("read_only", "EROFS"), ("full", "ENOSPC")])
def test_training_goes_on_when_checkpoint_storage_refuses_writes(one_rank, char_data, tmp_path, storage,
                                                                 fault, errname, mode):
    """Saves at 3, 6, 9, 12; the storage breaks after 3 and is repaired after 7: the save
    at 6 fails (an event, not reported, no directory left), 9 and 12 succeed."""
    seen = {}

    def toggle(tr, step):
        if tr.ckpt.pending is not None:  # async: the write in flight ends first (a busy mount
            import concurrent.futures    # stays rw; 6 must fail before the repair at 8)

            concurrent.futures.wait([tr.ckpt.pending[0]])
        if step == 4:
            storage.break_(fault)
        if step == 8:
            seen["failed_saves"] = tr.ckpt.failed_saves
            storage.repair(fault)

    run_dir = tmp_path / "run"
    tr = _run(char_data, storage.path, f"checkpoint.async_mode={'process' if mode == 'process' else 'thread'}",
              run_dir=run_dir, use_async=mode != "sync", after_step=toggle)
    assert tr.summary["steps"] == 12
    six = [e for e in _events(run_dir, "checkpoint") if e["step"] == 6]  # sync: none (the save raised)
    assert [e["asynchronous"] for e in six] == ([] if mode == "sync" else [True])
    failed = _events(run_dir, "checkpoint_failed")
    assert [e["step"] for e in failed] == [6], failed
    assert errname in failed[0]["error"] and "\n" not in failed[0]["error"], failed
    assert seen["failed_saves"] == 1 and tr.ckpt.failed_saves == 0
    assert tr.reported == [3, 9, 12]
    assert _steps(storage.path) == [3, 9, 12]
    assert not (storage.path / "checkpoint_0000006").exists()  # the partial save was removed


# ------------------------------------------------------------------ two ranks: no hang, no half checkpoint


def _two_rank_main(rank: int, port: int, data: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    root = Path(out) / "ckpt"

    def faults(tr, step):
        # After the start-up prune, before any save (DDP's all-reduce keeps rank 1 at step
        # 2 until rank 0 is past this): rank 0 alone fails its trainer-state write at 3,
        # before DCP's collectives; rank 1 alone fails its RNG write at 6.
        if step == 1 and rank == 0:
            (root / "checkpoint_0000003" / ".raygpt_state.json.tmp").mkdir(parents=True)
            (root / "checkpoint_0000006" / RNG_DIR / ".rank1.tmp").mkdir(parents=True)

    try:
        tr = _run(Path(data), root, "parallel.strategy=ddp", "train.max_steps=9", rank=rank, world=2,
                  run_dir=Path(out) / "run" if rank == 0 else None, after_step=faults)
        torch.save({"reported": tr.reported, "steps": tr.summary["steps"], "failed_saves": tr.ckpt.failed_saves},
                   Path(out) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_when_one_rank_cannot_write(char_data, tmp_path):
    """World 2: a write that fails on one rank only, before DCP's collectives (rank 0's
    trainer state, rank 1's RNG file), fails that save on both ranks: nobody hangs,
    nobody reports it, training goes on and the next save is reported by both."""
    mp.spawn(_two_rank_main, args=(_free_port(), str(char_data), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"result{rank}.pt")
        assert r == {"reported": [9], "steps": 9, "failed_saves": 0}, (rank, r)
    failed = _events(tmp_path / "run", "checkpoint_failed")
    assert [e["step"] for e in failed] == [3, 6], failed
    assert "EISDIR" in failed[0]["error"] and "rank 0" in failed[0]["error"], failed
    assert "EISDIR" in failed[1]["error"] and "rank 1" in failed[1]["error"], failed
    assert _steps(tmp_path / "ckpt") == [9]


# ------------------------------------------------------------------ reading: unreadable is not incomplete


def _loop(path: Path) -> None:
    """`path` becomes a symlink to itself: opening or stat-ing it raises ELOOP."""
    os.symlink(path.name, path)


@pytest.mark.parametrize("fault", ["metadata_is_a_directory", "state_file_is_a_symlink_loop"])
def test_unreadable_latest_checkpoint_is_kept_and_skipped(one_rank, char_data, tmp_path, fault):
    root = tmp_path / "ckpt"
    _run(char_data, root, "train.max_steps=10", "checkpoint.every=5")
    five, ten = root / "checkpoint_0000005", root / "checkpoint_0000010"
    before = _digest(ten)
    target = ten / (".metadata" if fault == "metadata_is_a_directory" else STATE_FILE)
    aside = tmp_path / "aside"
    target.rename(aside)
    if fault == "metadata_is_a_directory":
        target.mkdir()
    else:
        _loop(target)
    events: list = []
    try:
        _manager(root, events).prune_unfinished(5)
        assert ten.is_dir() and (target.is_symlink() or target.is_dir())  # a read error deletes nothing
        assert [n for n, _ in events] == ["checkpoint_unreadable"] and events[0][1]["step"] == 10, events
        assert latest_checkpoint(root) == five  # the newest one that reads
        assert list_checkpoints(root) == [five]
        assert resolve_checkpoint(root) == five
        assert checkpoint_status(ten) == "unreadable" and not is_complete(ten)
    finally:
        target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
        aside.rename(target)
    assert checkpoint_status(ten) == "complete"
    assert latest_checkpoint(root) == ten and _digest(ten) == before


def test_truncated_shard_is_pruned_and_unreadable_shard_is_kept(one_rank, char_data, tmp_path):
    root = tmp_path / "ckpt"
    _run(char_data, root, "train.max_steps=15", "checkpoint.every=5")
    five, ten, fifteen = (root / f"checkpoint_{s:07d}" for s in (5, 10, 15))
    shard = "__0_0.distcp"
    os.truncate(ten / shard, (ten / shard).stat().st_size // 2)  # a write cut short
    before = _digest(fifteen)
    (fifteen / shard).rename(tmp_path / "aside")
    _loop(fifteen / shard)  # there, but stat fails (ELOOP): not provably short
    events: list = []
    try:
        assert checkpoint_status(ten) == "incomplete"
        assert checkpoint_status(fifteen) == "unreadable"
        _manager(root, events).prune_unfinished(5)
        assert not ten.exists() and fifteen.is_dir()
        assert latest_checkpoint(root) == five
    finally:
        (fifteen / shard).unlink()
        (tmp_path / "aside").rename(fifteen / shard)
    assert is_complete(fifteen) and _digest(fifteen) == before
    assert list_checkpoints(root) == [five, fifteen]


def test_state_file_that_does_not_parse(tmp_path):
    d = tmp_path / "checkpoint_0000003"
    d.mkdir()
    (d / STATE_FILE).write_text('{"step": 3, "wor')
    with pytest.raises(CheckpointError) as e:
        read_state(d)
    assert "\n" not in str(e.value) and STATE_FILE in str(e.value)
    assert checkpoint_status(d) == "unreadable"
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_a_save_that_fails_for_another_reason_still_raises(one_rank, char_data, tmp_path):
    """Only storage errors are survived: a bug (here a trainer state JSON cannot hold)
    raises, and counts as no failed save."""
    tr = Trainer(_cfg(char_data), char_data, run_dir=None, ckpt_root=tmp_path / "ckpt", use_async=False)
    with pytest.raises(BaseException, match="not JSON serializable"):
        tr.ckpt.save(1, tr.parts, tr.optimizers, {"step": 1, "bad": object()}, {}, tr._rng_meta())
    assert tr.ckpt.failed_saves == 0
