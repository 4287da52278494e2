"""Storage faults through real Ray Train (issue: storage faults): the run directory made
read-only mid-run for real (a read-only bind mount, raygpt.train.storage_faults), and a
latest checkpoint that cannot be read. Single node, 2 workers, a tiny model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from raygpt.train.checkpoint.discovery import is_complete, latest_checkpoint
from raygpt.train.chaos import Action, run_with_chaos
from raygpt.train.launch import run_training
from raygpt.train.metrics import read_metrics
from test_hangs import _cfg  # the same tiny 2-worker run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a read-only or unreadable storage fault needs "
                                                          "root (mount; chmod does not stop root)")




def test_read_only_storage_mid_run_fails_a_save_and_a_later_one_succeeds(ray_session, char_data, tmp_path):
    """The run directory read-only from step 5 for 20 steps (a window holding the saves
    at 10 and 20, whatever the follower's lag): those saves are checkpoint_failed events,
    training steps through the window, the save after it succeeds, the run ends at 40
    with a complete checkpoint there, and a resumed run starts from it."""
    cfg = _cfg(char_data, tmp_path, "ro")
    summary, chaos, err = run_with_chaos(cfg, [Action("storage-fault", 5, for_steps=20)])
    assert err is None, err
    assert summary["steps"] == 40
    names = [e["event"] for e in chaos.timeline.events]
    ro = chaos.timeline.events[names.index("failure injected: storage made read-only")]
    rw = chaos.timeline.events[names.index("storage writable again")]
    assert names.index("checkpoint failed") < names.index("storage writable again") < \
        names.index("checkpoint saved after the failure"), names
    recs = read_metrics(tmp_path / "ro")
    failed = [r["step"] for r in recs if r.get("event") == "checkpoint_failed"]
    assert failed and all(ro["step"] <= s <= rw["step"] for s in failed), (failed, ro, rw)
    assert all("EROFS" in r["error"] for r in recs if r.get("event") == "checkpoint_failed")
    steps = {r["step"] for r in recs if "loss" in r and "event" not in r}
    assert set(range(ro["step"], rw["step"] + 1)) <= steps  # training went on through the window
    assert [r["step"] for r in recs if r.get("event") == "start"] == [0]  # no restart
    latest = latest_checkpoint(tmp_path / "ro")
    assert latest.name == "checkpoint_0000040" and is_complete(latest)
    for s in failed:
        assert not (tmp_path / "ro" / f"checkpoint_{s:07d}").exists()
    print(f"read-only at step {ro['step']}, writable at step {rw['step']} ({rw['read_only_s']:.1f} s): "
          f"saves failed at {failed}, later saves {[r['step'] for r in recs if r.get('event') == 'checkpoint' and r['step'] > rw['step']]}")
    resumed = run_training(_cfg(char_data, tmp_path, "ro", "train.max_steps=42"), progress=False)
    assert resumed["steps"] == 42
    starts = [r for r in read_metrics(tmp_path / "ro") if r.get("event") == "start"]
    assert starts[-1]["step"] == 40 and starts[-1]["restored"]


def _digest(d: Path) -> dict[str, str]:
    import hashlib

    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


def test_unreadable_latest_checkpoint_resumes_from_the_previous_one_and_deletes_nothing(
        ray_session, char_data, tmp_path, caplog):
    """Checkpoints at 10 and 20; the latest's .metadata then fails to read (a directory in
    its place: EISDIR, for root too). Resuming restores step 10, says so in one line,
    deletes nothing; with the file back, checkpoint 20 is complete and unchanged. (Ray's
    registered checkpoint is 20: the workers restored it, failed, and spent the restart
    budget, before they inspected it.)"""
    sets = ("checkpoint.keep=5",)  # Ray's retention out of the way: only read errors are judged
    run_dir = tmp_path / "unreadable"
    assert run_training(_cfg(char_data, tmp_path, "unreadable", "train.max_steps=20", *sets),
                        progress=False)["steps"] == 20
    twenty = run_dir / "checkpoint_0000020"
    before = _digest(twenty)
    meta = twenty / ".metadata"
    meta.rename(tmp_path / "metadata.aside")
    meta.mkdir()
    caplog.set_level("WARNING", logger="raygpt.train.checkpoint.discovery")
    try:
        summary = run_training(_cfg(char_data, tmp_path, "unreadable", "train.max_steps=15", *sets),
                               progress=False)
        assert summary["steps"] == 15
        start = [r for r in read_metrics(run_dir) if r.get("event") == "start"][-1]
        assert start["step"] == 10 and start["restored"]
        kept = [r for r in read_metrics(run_dir) if r.get("event") == "checkpoint_unreadable"]
        assert [r["step"] for r in kept] == [20] and "EISDIR" in kept[0]["error"], kept
        # the driver's line before it starts workers (then "resuming from step 10")
        lines = [r.getMessage() for r in caplog.records if "checkpoint_0000020 skipped: it cannot be read" in r.getMessage()]
        assert len(lines) == 1 and "EISDIR" in lines[0], caplog.text
        print(lines[0])
        assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == \
            ["checkpoint_0000010", "checkpoint_0000015", "checkpoint_0000020"]
    finally:
        meta.rmdir()
        (tmp_path / "metadata.aside").rename(meta)
    assert is_complete(twenty) and _digest(twenty) == before


def test_a_final_save_the_storage_refuses_is_tried_again_until_it_is_writable(ray_session, char_data, tmp_path):
    """Read-only from step 17 for 6 s: the saves due in the window fail, including the
    final one at step 20, which has no next interval; it is tried again (2, 4 s ...) and
    lands once the storage is writable: the run ends with a complete checkpoint at 20."""
    cfg = _cfg(char_data, tmp_path, "final", "train.max_steps=20", "optim.decay_steps=20")
    summary, chaos, err = run_with_chaos(cfg, [Action("storage-fault", 17, for_s=6.0)])
    assert err is None, err
    assert summary["steps"] == 20
    recs = read_metrics(tmp_path / "final")
    assert 20 in [r["step"] for r in recs if r.get("event") == "checkpoint_failed"]
    latest = latest_checkpoint(tmp_path / "final")
    assert latest.name == "checkpoint_0000020" and is_complete(latest)
