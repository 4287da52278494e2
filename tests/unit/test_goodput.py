"""The goodput ledger on metrics.jsonl sequences written the way a run writes them
(launch, start, step records, checkpoint/eval/failure events). A small simulator lays
the records on a clock and keeps, apart from the ledger, what each second was spent on;
the ledger must find the same split from the records alone."""
from __future__ import annotations

import json

import pytest

from raygpt.train.goodput import BADPUT, CATEGORIES, ledger


class Sim:
    """A run's records on a clock, with the truth of where the time went."""

    def __init__(self, t: float = 1000.0):
        self.t, self.recs = t, []
        self.truth = dict.fromkeys(CATEGORIES, 0.0)
        self.train_seconds, self.step, self.reached = 0.0, 0, 0
        self.launch_start = None

    def spend(self, cat: str, s: float) -> None:
        self.t += s
        self.truth[cat] += s

    def rec(self, **r) -> dict:
        r = {"time": round(self.t, 6), **r}
        self.recs.append(r)
        return r

    def launch(self, driver_s: float = 3.0) -> None:
        self.launch_start = self.t
        self.spend("startup", driver_s)  # Ray start, preflight, placement
        self.rec(event="launch", started=self.launch_start, resume_step=None)

    def group(self, *, first: bool, restored_step: int | None = None, prepare_s=1.0, build_s=2.0, restore_s=0.0,
              process_s=4.0):
        before = "startup" if first else "restart"
        self.spend(before, process_s)  # worker processes, torch import
        t0 = self.t
        self.spend("data", prepare_s)
        self.spend(before, build_s)
        self.spend("checkpoint_restore", restore_s)
        if restored_step is not None:
            self.step = restored_step
            self.train_seconds = self.saved_ts[restored_step]
        self.rec(event="start", step=self.step, world_size=2, restored=restored_step is not None,
                 train_seconds=self.train_seconds, t0=t0, prepare_s=prepare_s, restore_s=restore_s)
        self.first = True

    def steps(self, n: int, step_s=0.5, data_s=0.1, compile_s=2.0, overhead_s=0.02, eval_at=(), eval_s=1.0,
              ckpt_at=(), blocked_s=0.3):
        for _ in range(n):
            self.step += 1
            dt = step_s + (compile_s if self.first else 0.0)
            redo = self.step <= self.reached
            if self.first:
                self.spend("compile", compile_s)
            self.spend("recomputed" if redo else "data", step_s if redo else data_s)
            if not redo:
                self.spend("productive", step_s - data_s)
            self.train_seconds += dt
            r = {"step": self.step, "loss": 2.0, "step_ms": 1000 * dt, "rank_data_ms": [50.0, 1000 * data_s],
                 "train_seconds": self.train_seconds}
            if self.first:
                r["first_step_ms"], self.first = 1000 * dt, False
            if self.step in eval_at:
                self.spend("eval", eval_s)
                r.update(val_loss=2.0, eval_s=eval_s)
            self.rec(**r)
            if self.step in ckpt_at:
                self.spend("checkpoint_save", blocked_s)
                self.rec(event="checkpoint", step=self.step, blocked_s=blocked_s, asynchronous=False)
                self.saved_ts = {**getattr(self, "saved_ts", {}), self.step: self.train_seconds}
            self.spend("other", overhead_s)
            self.overhead_s = overhead_s
            self.reached = max(self.reached, self.step)

    def end(self, tail_s=0.5, **kw) -> None:
        self.rec(event="end", step=self.step, **kw)
        self.spend("other", tail_s)

    def fail(self, detect_s: float, marks=("group_failed",)) -> None:
        """The group dies after its last record; the run knows detect_s later. The time
        since that record (its logging tail) counts as detection: nothing shows it."""
        self.vanish("detection", detect_s)
        for i, m in enumerate(marks):
            self.rec(event=m, decision="retry") if m == "group_failed" else self.rec(event=m, idle_s=detect_s)
            if i < len(marks) - 1:
                self.spend("restart", 1.0)

    def vanish(self, cat: str, s: float) -> None:
        self.truth["other"] -= self.overhead_s
        self.truth[cat] += self.overhead_s
        self.spend(cat, s)

    def launch_end(self, status="finished") -> None:
        self.rec(event="launch_end", status=status)

    def pause(self, s: float) -> None:
        self.t += s  # between launches: not the run's wall time


def check(sim: Sim, **sizes):
    led = ledger(json.loads(json.dumps(sim.recs)))  # as read back from metrics.jsonl
    wall = sum(sim.truth.values())
    assert led.wall_s == pytest.approx(wall, rel=1e-6)
    assert sum(led.seconds.values()) == pytest.approx(led.wall_s, rel=0.01)  # the parts add up
    for c in CATEGORIES:
        assert led.seconds[c] == pytest.approx(sim.truth[c], abs=0.02), (c, led.seconds, sim.truth)
    for c, v in sizes.items():
        assert led.seconds[c] == pytest.approx(v, abs=0.02), (c, led.seconds)
    d = led.to_dict()
    assert set(d["categories"]) == set(BADPUT) and d["wall_s"] == pytest.approx(wall, abs=1e-3)
    assert d["goodput"] == pytest.approx(sim.truth["productive"] / wall, abs=1e-4)
    return led


def test_a_clean_run():
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(20, eval_at=(10, 20), ckpt_at=(10, 20))
    s.end()
    s.launch_end()
    led = check(s, compile=2.0, eval=2.0, checkpoint_save=0.6, recomputed=0.0, detection=0.0, restart=0.0,
                data=1.0 + 20 * 0.1, productive=20 * 0.4, startup=3 + 4 + 2)
    assert led.failures == 0 and len(led.launches) == 1


@pytest.mark.parametrize("marks", [("group_failed",), ("hang", "group_failed")])
def test_a_restart_recomputes_the_steps_after_the_checkpoint(marks):
    """Killed at step 13 after the step-10 checkpoint (or frozen: the watchdog's hang
    verdict first): detection until the first mark, restart until the new group, 3
    steps re-run."""
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(13, ckpt_at=(10,))
    s.fail(detect_s=7.48, marks=marks)
    s.group(first=False, restored_step=10, restore_s=0.8)
    s.steps(10, ckpt_at=(20,))
    s.end()
    s.launch_end()
    led = check(s, recomputed=3 * 0.5, detection=7.5, checkpoint_restore=0.8, compile=4.0,
                restart=4 + 2 + (1.0 if len(marks) > 1 else 0.0))
    assert led.failures == 1


def test_a_resumed_run_counts_both_launches_and_not_the_pause():
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(8, ckpt_at=(8,))
    s.rec(event="stop", step=8, reason="interrupt")
    s.end(stopped="interrupt")
    s.launch_end("interrupted")
    s.pause(3600)
    s.launch()
    s.group(first=True, restored_step=8, restore_s=0.4)
    s.steps(12, ckpt_at=(20,))
    s.end()
    s.launch_end()
    led = check(s, recomputed=0.0, detection=0.0, restart=0.0, checkpoint_restore=0.4, startup=2 * (3 + 4 + 2))
    assert len(led.launches) == 2 and led.wall_s < 3600


def test_a_run_still_going_ends_now_and_a_run_from_before_the_ledger_still_adds_up():
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(5)
    now = s.t + 2.0
    led = ledger(s.recs, now=now)
    assert led.wall_s == pytest.approx(now - s.launch_start)
    assert sum(led.seconds.values()) == pytest.approx(led.wall_s, rel=0.01)
    old = [r for r in s.recs if r.get("event") != "launch"]  # no launch events, no start fields
    old = [{k: v for k, v in r.items() if k not in ("t0", "prepare_s", "train_seconds")} if r.get("event") == "start"
           else r for r in old]
    led = ledger(old)
    assert sum(led.seconds.values()) == pytest.approx(led.wall_s, rel=0.01) and led.wall_s > 0


def test_a_failed_group_with_no_mark_is_restart_time_and_a_failed_run_ends_in_detection():
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(4)
    s.vanish("restart", 5.0)  # an elastic resize: Ray ended the group, no failure event
    s.group(first=False, restored_step=None)
    s.steps(3)
    s.fail(detect_s=1.98)  # the last group fails for good
    s.spend("other", 1.0)
    s.launch_end("failed")
    led = check(s, detection=2.0, restart=4 + 2 + 5.02)
    assert led.failures == 2


def test_an_elastic_resize_is_a_restart_not_a_failure():
    """The Train controller ends a healthy group to resize it and says so (`resize`):
    no failure, no detection; the gap is restart time. (A soak counted each grow-back as
    a failure and shortened checkpoint.every=auto's MTBF.)"""
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(4)
    s.rec(event="resize", world_from=1, world_to=2)  # decided while the group still steps
    s.steps(2)
    s.vanish("restart", 0.5)
    s.spend("restart", 4.5)
    s.group(first=False)
    s.steps(3)
    s.end()
    s.launch_end()
    led = check(s, detection=0.0, restart=0.02 + 0.5 + 4.5 + 4 + 2)
    assert led.failures == 0


def test_a_move_off_a_draining_node_is_a_restart_even_without_an_end_event():
    """The ranks on the draining node exit first; Ray tears rank 0 down before it writes
    `end` (a soak's preemption). Its checkpoint and the controller's planned mark say it
    was a move."""
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(6, ckpt_at=(6,))
    s.rec(event="preemption", step=6)
    s.rec(event="preemption_checkpoint", step=6)
    s.spend("restart", 0.4)
    s.rec(event="group_failed", decision="retry", planned=True)
    s.spend("restart", 3.0)
    s.group(first=False, restored_step=6)
    s.steps(2)
    s.end()
    s.launch_end()
    led = check(s, detection=0.0)
    assert led.failures == 0


def _restart_run() -> Sim:
    s = Sim()
    s.launch()
    s.group(first=True)
    s.steps(13, ckpt_at=(10,), eval_at=(10,))
    s.fail(detect_s=7.48, marks=("hang", "group_failed"))
    s.group(first=False, restored_step=10, restore_s=0.8)
    s.steps(10, ckpt_at=(20,), eval_at=(20,))
    s.end()
    s.launch_end()
    return s


def test_report_prints_the_categories_and_writes_goodput_png(tmp_path, capsys):
    from raygpt.cli import main

    run = tmp_path / "r"
    run.mkdir()
    s = _restart_run()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s.recs))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    for c in CATEGORIES:
        assert c in out
    wall = sum(s.truth.values())
    assert f"{100 * s.truth['productive'] / wall:.1f}%" in out  # goodput
    png = run / "goodput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(run.glob(".goodput*"))  # no temp file left


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_report_on_a_missing_or_empty_run_dir_is_one_line(tmp_path, capsys, what):
    from raygpt.cli import main

    run = tmp_path / "r"
    if what == "empty":
        run.mkdir()
    assert main(["report", str(run)]) == 2  # a user error
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and str(run) in err[0], err


def test_replica_mode_counts_the_missing_replicas_share_and_the_stall(tmp_path):
    """run.fault_tolerance=replica: one group throughout; a window stepped by 2 of 3
    replicas is 2/3 productive and 1/3 replica_out; the uncommitted steps' stall (not in
    train_seconds) is detection."""
    t0 = 1000.0
    recs = [{"time": t0, "event": "launch", "started": t0},
            {"time": t0 + 5, "event": "start", "step": 0, "world_size": 3, "train_seconds": 0.0, "t0": t0 + 1,
             "prepare_s": 1.0, "restore_s": 0.0}]
    ts, t = 0.0, t0 + 5
    for step, replicas, stall in [(10, 3, 0.0), (20, 2, 2.0), (30, 2, 0.0), (40, 3, 0.0)]:
        ts, t = ts + 3.0, t + 3.0 + stall
        recs.append({"time": t, "step": step, "world_size": 3, "replicas": replicas, "train_seconds": ts,
                     **({"stall_s": stall} if stall else {})})
    recs += [{"time": t, "event": "end", "step": 40}, {"time": t, "event": "launch_end"}]
    led = ledger(recs)
    assert led.seconds["replica_out"] == pytest.approx(2 * 3.0 / 3)
    assert led.seconds["detection"] == pytest.approx(2.0)
    assert led.seconds["productive"] == pytest.approx(2 * 3.0 + 2 * 2.0)
    assert sum(led.seconds.values()) == pytest.approx(led.wall_s)
    from raygpt.train.report import plot_goodput  # every category has its colour (a KeyError before)

    assert plot_goodput(tmp_path, recs, led).stat().st_size > 0


def test_the_timeline_shades_the_stretches_a_replica_was_out():
    from raygpt.train.report import replica_out_spans

    q = [{"time": 10.0, "event": "replica_quorum", "step": 5, "replicas": [0], "missing": [1]},
         {"time": 12.0, "step": 6},
         {"time": 20.0, "event": "replica_quorum", "step": 9, "replicas": [0, 1], "missing": []},
         {"time": 30.0, "event": "replica_quorum", "step": 20, "replicas": [1], "missing": [0]},
         {"time": 31.0, "event": "replica_quorum", "step": 21, "replicas": [1], "missing": [0]},
         {"time": 35.0, "step": 25}]
    assert replica_out_spans(q) == [(10.0, 20.0), (30.0, 35.0)]
    assert replica_out_spans([]) == []
