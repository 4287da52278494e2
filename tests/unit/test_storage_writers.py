"""Every writer in the run directory keeps training going when the storage refuses
writes (issue: storage faults), with real faults: the run directory bind-mounted
read-only (raygpt.train.storage_faults.ReadOnly, EROFS for root too) or a tmpfs filled
to the brim (ENOSPC). Nothing they were given is lost once the storage takes writes
again. Needs root (mount)."""
from __future__ import annotations

import json
import os

import pytest

from raygpt.train import metrics as M
from raygpt.train.storage_faults import ReadOnly
from raygpt.train.trainer import STOP_NONE, Hooks, Trainer
from raygpt.train.worker import _register_worker
from test_checkpoint_faults import _cfg, storage  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="read-only or full storage needs root (mount)")


@pytest.fixture
def read_only(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fault = ReadOnly(run_dir)
    yield fault
    fault.undo()


def _lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_opened_on_read_only_storage_are_kept_and_written_later(read_only, capsys):
    """A worker group restarted while the storage is read-only: the writer does not raise
    (it did: EROFS at open), and its records land, in order, once it is writable."""
    read_only.apply()
    w = M.RunWriter(read_only.path, enabled=True)
    for s in range(3):
        w.log({"step": s, "loss": 1.0})
    assert not (read_only.path / "metrics.jsonl").exists()
    read_only.undo()
    w.event("checkpoint", step=3)
    w.close()
    assert [r["step"] for r in _lines(read_only.path)] == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "refuses writes (EROFS" in out and "takes writes again" in out
    assert out.count("refuses writes") == 1  # one warning, not one per record


def test_metrics_on_full_storage_lose_no_record_and_no_line_is_cut(storage, capsys):
    """ENOSPC mid-run (the file held open): no raise (there was one), every record is
    written once space is back, each line whole."""
    w = M.RunWriter(storage.path, enabled=True)
    w.log({"step": 0})
    storage.break_("full")
    big = "x" * 4096  # the few KiB left fill up part-way through a line
    for s in range(1, 30):
        w.log({"step": s, "pad": big})
    assert len(w._unwritten) > 0
    storage.repair("full")
    w.log({"step": 30})
    w.close()
    assert [r["step"] for r in _lines(storage.path)] == list(range(31))  # every line parses, in order
    assert "refuses writes (ENOSPC" in capsys.readouterr().out


def test_tensorboard_failing_on_read_only_storage_does_not_stop_logging(read_only, capsys):
    """TensorBoard's writer thread reopens its event file per write: on read-only storage
    it fails and raised into the training thread at the next record (the run crashed at
    the step after the fault). Now it is switched off with one line; metrics.jsonl goes on."""
    w = M.RunWriter(read_only.path, enabled=True)
    assert w._tb is not None
    w.log({"step": 0, "loss": 1.0})
    w._tb.flush()
    read_only.apply()
    for s in range(1, 25):  # more than TensorBoard's queue: its thread writes (and fails)
        w.log({"step": s, "loss": 1.0})
    w.close()  # its flush raises the thread's error if logging did not
    read_only.undo()
    assert [r["step"] for r in _lines(read_only.path)] == list(range(25))
    assert "tensorboard logging off" in capsys.readouterr().out


def test_driver_events_on_read_only_storage_are_written_later(read_only):
    (read_only.path / "metrics.jsonl").write_text("")
    read_only.apply()
    assert M.append_event(read_only.path, "hang", step=7) is False  # it raised EROFS
    read_only.undo()
    assert M.flush_events(read_only.path) is True
    assert [(r["event"], r["step"]) for r in _lines(read_only.path)] == [("hang", 7)]


def test_worker_registration_on_read_only_storage_warns(read_only, capsys):
    read_only.apply()
    _register_worker(read_only.path, 1, 2, "node")  # raised EROFS: the worker failed to start
    assert "worker registration not written (EROFS" in capsys.readouterr().out
    read_only.undo()
    _register_worker(read_only.path, 1, 2, "node")
    assert json.loads((read_only.path / ".workers" / "rank1.json").read_text())["node_id"] == "node"


def test_atomic_write_on_full_storage_leaves_no_temp_file(storage):
    storage.break_("full")
    with pytest.raises(OSError):
        M.write_text_atomic(storage.path / "summary.json", "x" * 65536)
    assert sorted(p.name for p in storage.path.iterdir()) == ["filler"]


def test_training_ends_when_the_run_directory_turns_read_only(one_rank, char_data, tmp_path, read_only):  # noqa: F811
    """Read-only from step 7 of 12 to the end: the save at 9 fails (an event), training
    goes on; the final save at 12 fails too and, once checkpoint.final_retry_s is spent,
    the run says so (CheckpointUnwritable naming step 12) instead of ending as if its
    last steps were saved; every record is kept."""
    from raygpt.train.trainer import CheckpointUnwritable

    def fault(tr, step):
        if step == 7:
            read_only.apply()

    hooks = Hooks(stop_code=lambda: STOP_NONE, after_step=fault)
    tr = Trainer(_cfg(char_data, "checkpoint.final_retry_s=0"), char_data, run_dir=read_only.path,
                 ckpt_root=read_only.path, hooks=hooks, use_async=False)
    with pytest.raises(CheckpointUnwritable, match="step 12"):
        tr.train()
    read_only.undo()
    tr.writer.close()  # the records held back while read-only go out now
    recs = _lines(read_only.path)
    assert [r["step"] for r in recs if r.get("event") == "checkpoint_failed"] == [9, 12]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert sorted(p.name for p in read_only.path.glob("checkpoint_*")) == ["checkpoint_0000003", "checkpoint_0000006"]


def test_a_summary_the_storage_refuses_does_not_end_the_run_with_an_error(one_rank, char_data, tmp_path,  # noqa: F811
                                                                         read_only):
    """Read-only right after the final save: summary.json cannot be written (that raised),
    train() returns the summary, every record is kept."""
    def fault(tr, step):
        if step == 12:
            read_only.apply()

    hooks = Hooks(stop_code=lambda: STOP_NONE, after_step=fault)
    tr = Trainer(_cfg(char_data), char_data, run_dir=read_only.path, ckpt_root=read_only.path, hooks=hooks,
                 use_async=False)
    summary = tr.train()
    read_only.undo()
    assert summary["steps"] == 12
    recs = _lines(read_only.path)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert recs[-1]["event"] == "end"
    assert not (read_only.path / "summary.json").exists()
    assert not [r for r in recs if r.get("event") == "checkpoint_failed"]
