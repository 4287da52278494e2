"""The goodput ledger's outputs: the `goodput` block the driver puts in summary.json (and
TensorBoard), and `raygpt report RUN_DIR`: a table of the categories and goodput.png,
the run's timeline (steps over wall time; checkpoints, failures, restarts marked) above
a stacked bar of the categories."""
from __future__ import annotations

import os
from pathlib import Path

from raygpt.errors import UserError
from raygpt.train.goodput import CATEGORIES, Ledger, ledger
from raygpt.train.metrics import append_event, read_metrics

COLORS = {"productive": "#2ca02c", "startup": "#7f7f7f", "data": "#17becf", "compile": "#bcbd22",
          "checkpoint_save": "#1f77b4", "checkpoint_restore": "#aec7e8", "recomputed": "#ff7f0e",
          "detection": "#d62728", "restart": "#9467bd", "replica_out": "#e377c2", "eval": "#8c564b",
          "other": "#c7c7c7"}


def close_launch(run_dir: str | os.PathLike, status: str, step: int | None = None) -> dict | None:
    """The driver, at the end of a launch: a `launch_end` event, then the whole run's
    ledger (every launch of this run name) for summary.json, also in TensorBoard. None
    when this machine has no metrics.jsonl with a launch in it (rank 0 elsewhere)."""
    try:
        append_event(run_dir, "launch_end", status=status)
    except OSError:
        return None
    recs = read_metrics(run_dir)
    if not any(r.get("event") == "launch" for r in recs):
        return None
    led = ledger(recs)
    try:
        write_tensorboard(run_dir, led, step)
    except Exception:  # TensorBoard is optional; the figures are in summary.json anyway
        pass
    return led.to_dict()


def close_failed_launch(run_dir: str | os.PathLike) -> None:
    """A run that failed for good: the ledger goes into the summary a segment wrote."""
    import json

    from raygpt.train.metrics import write_json_atomic

    block = close_launch(run_dir, "failed")
    path = Path(run_dir) / "summary.json"
    if block is None or not path.is_file():
        return
    try:
        summary = json.loads(path.read_text())
        summary["goodput"] = block
        write_json_atomic(path, summary)
    except (OSError, ValueError):
        pass


def write_tensorboard(run_dir: str | os.PathLike, led: Ledger, step: int | None) -> None:
    """goodput/* scalars beside the run's own, when the run writes TensorBoard."""
    tb = Path(run_dir) / "tensorboard"
    if not tb.is_dir() or not os.access(tb, os.W_OK):  # read-only storage: its writer thread would raise
        return
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb))
    try:
        at = int(step or 0)
        w.add_scalar("goodput/goodput", led.goodput, at)
        w.add_scalar("goodput/wall_s", led.wall_s, at)
        for c in CATEGORIES:
            w.add_scalar(f"goodput/{c}_s", led.seconds[c], at)
    finally:
        w.close()


def load_run(run_dir: str) -> tuple[Path, list[dict], Ledger]:
    p = Path(run_dir)
    if not p.is_dir():
        raise UserError(f"run directory {run_dir!r} does not exist")
    recs = [r for r in read_metrics(p) if isinstance(r.get("time"), (int, float))]
    if not recs:
        raise UserError(f"{run_dir!r} has no metrics.jsonl records (not a raygpt run directory, or it never started)")
    return p, recs, ledger(recs)


def print_table(led: Ledger, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    wall = led.wall_s or 1.0
    t = Table(title=f"raygpt report: {name}")
    t.add_column("category")
    t.add_column("seconds", justify="right")
    t.add_column("% of wall", justify="right")
    for c in CATEGORIES:
        t.add_row(c, f"{led.seconds[c]:.1f}", f"{100 * led.seconds[c] / wall:.1f}%")
    t.add_section()
    t.add_row("wall", f"{led.wall_s:.1f}", "100.0%")
    t.add_row("goodput", f"{led.seconds['productive']:.1f}", f"{100 * led.goodput:.1f}%")
    t.caption = f"{len(led.launches)} launch(es), {led.failures} failed worker group(s)"
    Console().print(t)


class RunClock:
    """Epoch time -> seconds of the run's wall time (the gaps between launches left out)."""

    def __init__(self, launches: list[tuple[float, float]]):
        self.launches = sorted(launches)

    def __call__(self, t: float) -> float:
        done = 0.0
        for s, e in self.launches:
            if t <= e:
                return done + max(0.0, t - s)
            done += e - s
        return done


RUG_OVER = 30  # more checkpoints than this are ticks, not full-height lines


def _marks(recs: list[dict]) -> dict[str, list[float]]:
    """Epoch times of what the timeline marks."""
    out: dict[str, list[float]] = {"checkpoint": [], "failure": [], "restart": [], "preemption": [], "launch": []}
    for r in recs:
        ev = r.get("event")
        if ev == "checkpoint":
            out["checkpoint"].append(r["time"])
        elif ev == "hang" or (ev == "group_failed" and not r.get("planned")):
            out["failure"].append(r["time"])
        elif ev in ("preemption", "stop"):
            out["preemption"].append(r["time"])
        elif ev == "start" and r.get("restored"):
            out["restart"].append(r["time"])
        elif ev == "launch":
            out["launch"].append(float(r.get("started", r["time"])))
    return out


def replica_out_spans(recs: list[dict]) -> list[tuple[float, float]]:
    """Replica mode: epoch (from, to) of each stretch a replica was out of the quorum, from
    the `replica_quorum` events (each says who is missing when the quorum changes); one
    still open at the end runs to the last record."""
    spans, since = [], None
    for r in recs:
        if r.get("event") != "replica_quorum":
            continue
        if r.get("missing") and since is None:
            since = r["time"]
        elif not r.get("missing") and since is not None:
            spans.append((since, r["time"]))
            since = None
    if since is not None and recs:
        spans.append((since, max(r["time"] for r in recs)))
    return spans


def plot_goodput(run_dir: Path, recs: list[dict], led: Ledger) -> Path:
    """goodput.png: cumulative step over the run's wall time with marks, above the
    categories as one stacked bar (% of wall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = RunClock(led.launches)
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(9, 5.5), gridspec_kw={"height_ratios": [4, 1]})
    groups: list[list] = [[]]  # one line per worker group: a restart is a jump back, not a slope
    for r in recs:
        if r.get("event") == "start":
            groups.append([])
        elif "step" in r and "event" not in r:
            groups[-1].append((clock(r["time"]), r["step"]))
    for i, pts in enumerate(g for g in groups if g):
        ax.plot(*zip(*pts), ".-", color=COLORS["productive"], lw=1, ms=2, label="step" if i == 0 else None)
    style = {"checkpoint": (COLORS["checkpoint_save"], ":", "checkpoint"),
             "failure": (COLORS["detection"], "-", "failure seen (hang / group failed)"),
             "restart": (COLORS["restart"], "--", "restart (restored group's start)"),
             "preemption": ("#ff7f0e", "-.", "preemption / stop"),
             "launch": ("black", "-", "launch")}
    for kind, times in _marks(recs).items():
        color, ls, label = style[kind]
        if kind == "checkpoint" and len(times) > RUG_OVER:  # a long run's saves: ticks along the bottom
            ax.plot([clock(t) for t in times], [0] * len(times), "|", color=color, ms=8, label=label,
                    transform=ax.get_xaxis_transform())
            continue
        for i, t in enumerate(times):
            ax.axvline(clock(t), color=color, ls=ls, lw=1, alpha=0.8, label=label if i == 0 else None)
    for i, (a, b) in enumerate(replica_out_spans(recs)):
        ax.axvspan(clock(a), clock(b), color=COLORS["replica_out"], alpha=0.25, lw=0,
                   label="a replica out (the others step)" if i == 0 else None)
    ax.set_xlabel("wall time of the run (s)")
    ax.set_ylabel("step")
    ax.set_title(f"{run_dir.name}: goodput {100 * led.goodput:.1f}% of {led.wall_s:.0f} s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    left = 0.0
    wall = led.wall_s or 1.0
    for c in CATEGORIES:
        share = 100 * led.seconds[c] / wall
        if share <= 0:
            continue
        bar.barh(0, share, left=left, color=COLORS[c], label=f"{c} {share:.1f}%")
        left += share
    bar.set_xlim(0, 100)
    bar.set_yticks([])
    bar.set_xlabel("% of wall time")
    bar.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.6), frameon=False)
    from raygpt.train.metrics import save_figure

    return save_figure(fig, run_dir / "goodput.png")


def report(run_dir: str) -> tuple[Ledger, Path]:
    """`raygpt report RUN_DIR`: the table on stdout, goodput.png in the run directory."""
    p, recs, led = load_run(run_dir)
    print_table(led, p.name)
    return led, plot_goodput(p, recs, led)

