"""Sweep outputs: a rich table, results.csv / results.parquet, sweep.png, and the
winning configuration as YAML (best.yaml in quality mode, fastest.yaml in throughput
mode) that `raygpt train --config FILE` runs as is."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raygpt.config import Config, dump_config, validate

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
PLOT = "sweep.png"
BEST = {"quality": "best.yaml", "throughput": "fastest.yaml"}


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def trial_values(config: dict) -> dict[str, Any]:
    """The "section.field" values of a trial (flat keys, or a throughput plan's dict)."""
    values = {k: v for k, v in config.items() if "." in k}
    values.update({k: v for k, v in (config.get("plan") or {}).items() if "." in k})
    return values


def collect(grid, spec, base_cfg: Config, cluster, space) -> tuple[list[dict], dict]:
    """ResultGrid -> one row per trial, and per-trial (step, val_loss) curves."""
    rows, curves = [], {}
    throughput = spec.mode == "throughput"
    max_steps = (spec.steps or 10) if throughput else base_cfg.train.max_steps
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(r.path).name
        values = trial_values(r.config or {})
        row: dict[str, Any] = {"trial_id": trial_id, **values}
        if "config_id" in ((r.config or {}).get("plan") or {}):
            row["config_id"] = r.config["plan"]["config_id"]
        step = int(m.get("step") or 0)
        row["step"] = step
        for k in ("val_loss", "best_val_loss", "loss", "tokens_per_s", "mfu", "peak_mem_mb",
                  "world_size", "train_seconds"):
            row[k] = _num(m.get(k))
        ws = row.get("world_size") or values.get("run.num_workers") or base_cfg.run.num_workers
        row["tokens_per_s_per_device"] = (row["tokens_per_s"] / ws) if row["tokens_per_s"] else None
        row["seconds"] = _num(m.get("time_total_s"))
        if r.error is not None:
            row["status"], row["reason"] = "error", _short(r.error)
        elif m.get("infeasible"):
            row["status"], row["reason"] = "infeasible", m.get("reason")
        elif m.get("finished") or step >= max_steps:
            row["status"], row["reason"] = "completed", None
        else:
            row["status"], row["reason"] = "stopped early", f"ASHA stopped it at step {step}"
        if throughput and row["status"] == "completed":
            try:
                from raygpt.tune.planner import plan_description
                from raygpt.tune.space import trial_config

                row["plan"] = plan_description(trial_config(spec.base, values), cluster)
            except Exception:
                pass
        try:
            df = r.metrics_dataframe
            if df is not None and "val_loss" in df and "step" in df:
                pts = [(int(s), float(v)) for s, v in zip(df["step"], df["val_loss"])
                       if _num(v) is not None and _num(s) is not None]
                curves[trial_id] = pts
        except Exception:
            pass
        rows.append(row)
    return rows, curves


def _short(err) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:300]


def rank(rows: list[dict], mode: str) -> list[dict]:
    """Quality: completed trials by final val loss, then stopped ones, then the rest.
    Throughput: feasible configurations by tokens/s per device."""
    order = {"completed": 0, "stopped early": 1, "error": 2, "infeasible": 3, "duplicate": 4}
    if mode == "quality":
        key = lambda r: (order.get(r["status"], 5), r.get("val_loss") if r.get("val_loss") is not None else math.inf)
    else:
        key = lambda r: (order.get(r["status"], 5), -(r.get("tokens_per_s_per_device") or 0.0))
    ranked = sorted(rows, key=key)
    n = 0
    for r in ranked:
        ok = r["status"] == "completed" if mode == "throughput" else r["status"] in ("completed", "stopped early")
        if ok and r.get("val_loss" if mode == "quality" else "tokens_per_s") is not None:
            n += 1
            r["rank"] = n
        else:
            r["rank"] = None
    return ranked


def winner_config(spec, row: dict) -> Config:
    """The user's config with the winning values: full length, run.storage/name unset."""
    from raygpt.tune.space import apply_params

    values = {k: v for k, v in row.items() if "." in k and k.split(".", 1)[0] in spec.base}
    d = apply_params(spec.base, values)
    d.setdefault("run", {}).update({"storage": None, "name": None})
    return validate(d)


def finish(outcome, base_cfg: Config, cluster) -> None:
    spec = outcome.spec
    out = spec.out_path
    out.mkdir(parents=True, exist_ok=True)
    rows = rank(outcome.rows, spec.mode)
    outcome.rows = rows
    best = next((r for r in rows if r.get("rank") == 1), None)
    # A quality winner must have finished; fall back to the best stopped one only if none did.
    if spec.mode == "quality":
        done = [r for r in rows if r["status"] == "completed" and r.get("val_loss") is not None]
        if done:
            best = done[0]
    outcome.best_row = best
    if best is not None:
        p = out / BEST[spec.mode]
        dump_config(winner_config(spec, best), p)
        outcome.best_path = str(p)
        outcome.files["best"] = str(p)
    write_tables(rows, out, outcome)
    try:
        plot(rows, outcome.curves, spec.mode, out / PLOT)
        outcome.files["plot"] = str(out / PLOT)
    except Exception as e:  # a plot never fails a sweep
        print(f"raygpt tune: plot skipped: {e}")
    print_table(rows, spec.mode, best_path=outcome.best_path)


def write_tables(rows: list[dict], out: Path, outcome=None) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    first = [c for c in ("rank", "trial_id", "config_id", "status") if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    df.to_csv(out / RESULTS_CSV, index=False)
    if outcome is not None:
        outcome.files["csv"] = str(out / RESULTS_CSV)
    try:
        pq = df.copy()
        for c in pq.columns:  # parquet wants one type per column
            if pq[c].dtype == object:
                pq[c] = pq[c].map(lambda v: None if v is None else str(v))
        pq.to_parquet(out / RESULTS_PARQUET, index=False)
        if outcome is not None:
            outcome.files["parquet"] = str(out / RESULTS_PARQUET)
    except Exception as e:
        print(f"raygpt tune: parquet skipped: {e}")


def _param_cols(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if "." in k and k not in cols:
                cols.append(k)
    return cols


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3g}"
    return str(v)


def print_table(rows: list[dict], mode: str, best_path: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    params = _param_cols(rows)
    t = Table(title=f"raygpt tune ({mode}): " + ("sorted by val loss" if mode == "quality"
                                                 else "feasible plans by tokens/s per device"))
    t.add_column("#", justify="right")
    t.add_column("trial" if mode == "quality" else "config")
    for p in params:
        t.add_column(p.split(".", 1)[1])
    if mode == "quality":
        metrics = [("step", "step"), ("val_loss", "val loss"), ("best_val_loss", "best val"),
                   ("tokens_per_s", "tok/s")]
    else:
        metrics = [("plan", "plan"), ("tokens_per_s", "tok/s"),
                   ("tokens_per_s_per_device", "tok/s/device"), ("peak_mem_mb", "peak MB")]
    for _, title in metrics:
        t.add_column(title, justify="right")
    t.add_column("status")
    for r in rows:
        status = r["status"] if not r.get("reason") or r["status"] == "stopped early" else f"{r['status']}: {r['reason']}"
        if r["status"] == "stopped early":
            status = f"stopped early (step {r['step']})"
        style = "bold green" if r.get("rank") == 1 else ("dim" if r["status"] in ("infeasible", "duplicate", "error") else None)
        t.add_row(_fmt(r.get("rank")), str(r.get("trial_id") or r.get("config_id")),
                  *[_fmt(r.get(p)) for p in params], *[_fmt(r.get(k)) for k, _ in metrics],
                  status, style=style)
    c = Console(width=max(160, Console().width))
    c.print(t)
    if best_path:
        c.print(f"{'best' if mode == 'quality' else 'fastest'} configuration: {best_path} "
                f"(raygpt train --config {best_path})")
    else:
        c.print("no trial produced a usable result")


def plot(rows: list[dict], curves: dict, mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mode == "quality":
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        status = {r.get("trial_id"): r["status"] for r in rows}
        for tid, pts in curves.items():
            if not pts:
                continue
            s, v = zip(*sorted(pts))
            ls = "--" if status.get(tid) == "stopped early" else "-"
            a.plot(s, v, ls, marker=".", label=tid)
        a.set_xlabel("step")
        a.set_ylabel("val loss")
        a.set_title("validation loss per trial (dashed: stopped early)")
        if len(curves) <= 12:
            a.legend(fontsize=7)
        pts = [(r.get("optim.lr"), r.get("val_loss"), r["status"]) for r in rows
               if r.get("val_loss") is not None and r.get("optim.lr") is not None]
        if pts:
            for st, mk in (("completed", "o"), ("stopped early", "x")):
                xs = [p[0] for p in pts if p[2] == st]
                ys = [p[1] for p in pts if p[2] == st]
                if xs:
                    b.scatter(xs, ys, marker=mk, label=st)
            b.set_xscale("log")
            b.set_xlabel("optim.lr")
            b.legend(fontsize=8)
        else:
            ok = [r for r in rows if r.get("val_loss") is not None]
            b.bar([str(r["trial_id"]) for r in ok], [r["val_loss"] for r in ok])
            b.tick_params(axis="x", rotation=60, labelsize=7)
        b.set_ylabel("last val loss")
        b.set_title("last val loss")
    else:
        ok = [r for r in rows if r["status"] == "completed" and r.get("tokens_per_s_per_device")]
        bad = [r for r in rows if r["status"] not in ("completed",)]
        fig, a = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(ok) + len(bad))))
        params = _param_cols(rows)
        label = lambda r: ", ".join(f"{p.split('.', 1)[1]}={r.get(p)}" for p in params)
        ys = list(range(len(ok)))[::-1]
        a.barh(ys, [r["tokens_per_s_per_device"] for r in ok], color="tab:blue")
        for y, r in zip(ys, ok):
            mem = f", {r['peak_mem_mb']:.0f} MB" if r.get("peak_mem_mb") else ""
            a.text(r["tokens_per_s_per_device"], y, f" {r['tokens_per_s_per_device']:,.0f}{mem}",
                   va="center", fontsize=7)
        yb = list(range(-1, -1 - len(bad), -1))
        for y, r in zip(yb, bad):
            a.text(0, y, f" {r['status']}: {str(r.get('reason'))[:90]}", va="center", fontsize=7,
                   color="gray")
        a.set_ylim(min(ys + yb, default=0) - 0.7, max(ys + yb, default=0) + 0.7)
        a.set_yticks(ys + yb)
        a.set_yticklabels([label(r) for r in ok] + [label(r) for r in bad], fontsize=7)
        a.set_xlabel("tokens/s per device")
        a.set_title("throughput planner")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
