"""Eval-gated promotion of a model into a running Serve application, and rollback.

promote: evaluate the candidate and the model the app serves on the same held-out
windows (default data: what the served model was trained on); only when
    candidate_val_loss <= served_val_loss + margin
swap the candidate in (serve_ops.set_model_dir: a Serve lightweight update, no restart,
no failed request). Every decision (promoted, refused, failed, rolled back) is one JSON
line in <state dir>/<app>.jsonl with both scores; the state dir is --state-dir,
$RAYGPT_STATE_DIR, or ~/.cache/raygpt/promotions.

rollback: the promotions of an app form a stack (each promotion pushes the model it
replaced, each rollback pops one): `raygpt rollback` puts back the model that the last
not-yet-undone promotion replaced.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from raygpt.errors import UserError


def state_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("RAYGPT_STATE_DIR")
    if env:
        return Path(env).expanduser()
    from raygpt.data.prepare import cache_dir

    return cache_dir() / "promotions"


def log_path(app: str, sdir: str | os.PathLike | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in app) or "app"
    return state_dir(sdir) / f"{safe}.jsonl"


def read_log(app: str, sdir: str | os.PathLike | None = None) -> list[dict]:
    p = log_path(app, sdir)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line (crash mid-write) is skipped, not fatal
    return out


def append_log(app: str, record: dict, sdir: str | os.PathLike | None = None) -> Path:
    """One JSON line, appended under an exclusive lock (concurrent promoters)."""
    p = log_path(app, sdir)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False) + "\n"
    with open(p, "a", encoding="utf-8") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return p


def rollback_stack(records: list[dict]) -> list[str]:
    """Model dirs a rollback would restore, oldest first (the last one is next)."""
    stack: list[str] = []
    for r in records:
        if r.get("action") == "promote" and r.get("decision") == "promoted" and r.get("previous"):
            stack.append(r["previous"])
        elif r.get("action") == "rollback" and r.get("decision") == "rolled_back" and not r.get("explicit"):
            if stack:
                stack.pop()
    return stack


@contextlib.contextmanager
def _serve_session(address: str | None, dashboard: str | None):
    """Joined to the Ray cluster Serve runs on for the block (not with `dashboard`: the
    REST API needs no connection); disconnects only when it connected."""
    from raygpt.lifecycle import serve_ops

    started = False if dashboard else serve_ops.connect(address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _score(ev: dict) -> dict:
    return {k: ev.get(k) for k in ("model_dir", "version", "params", "val_loss", "perplexity",
                                   "tokens_per_s")}


def promote(candidate: str | os.PathLike, app: str, *, margin: float = 0.0,
            data: str | os.PathLike | None = None, steps: int | None = None,
            batch_size: int | None = None, seed: int | None = None, device: str = "auto",
            address: str | None = None, url: str | None = None, api_key: str | None = None,
            state: str | os.PathLike | None = None, dry_run: bool = False,
            timeout: float = 600.0, dashboard: str | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Evaluate, decide, maybe swap; returns the logged decision record.

    dashboard: reach Serve through the dashboard's REST API (http://HEAD:8265) instead of
    joining the Ray cluster (declaratively deployed apps only)."""
    from raygpt.lifecycle import eval as ev
    from raygpt.lifecycle import serve_ops
    from raygpt.model.io import read_model_config

    log = log or (lambda _m: None)
    if margin != margin:  # NaN
        raise UserError("--margin must be a number")
    cand = serve_ops.resolve_model_dir(str(candidate))
    cmeta = read_model_config(cand)
    with _serve_session(address, dashboard):
        served = serve_ops.served_model(app, url, api_key, dashboard)
        if not Path(served["model_dir"]).is_dir():
            raise UserError(f"the served model {served['model_dir']} is not readable here: run "
                            f"promote where the model directories are (a shared volume)")
        rec: dict = {"time": _now(), "action": "promote", "app": app, "margin": margin,
                     "candidate_dir": cand, "served_dir": served["model_dir"]}
        if Path(served["model_dir"]).resolve() == Path(cand) and served.get("version") == cmeta.get("version"):
            rec.update(decision="noop", reason="the candidate is already being served")
            append_log(app, rec, state)
            return rec
        kw = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("seed", seed))
              if v is not None}
        c_ev, s_ev = ev.compare_models(cand, served["model_dir"], data, device=device, log=log, **kw)
        rec.update(candidate=_score(c_ev), served=_score(s_ev), data_dir=c_ev["data_dir"],
                   eval={"steps": c_ev["steps"], "batch_size": c_ev["batch_size"],
                         "block_size": c_ev["block_size"], "seed": c_ev["seed"],
                         "tokens": c_ev["tokens"]})
        limit = s_ev["val_loss"] + margin
        accept = c_ev["val_loss"] <= limit
        rec["threshold"] = limit
        log(f"candidate val loss {c_ev['val_loss']:.4f} vs served {s_ev['val_loss']:.4f} "
            f"(+ margin {margin:g} = {limit:.4f})")
        if not accept:
            rec.update(decision="refused",
                       reason=f"candidate val loss {c_ev['val_loss']:.4f} > served "
                              f"{s_ev['val_loss']:.4f} + margin {margin:g}")
        elif dry_run:
            rec.update(decision="would_promote", reason="--dry-run")
        else:
            try:
                card = serve_ops.set_model_dir(app, cand, expect_version=cmeta.get("version"),
                                               url=url or served.get("url"), api_key=api_key,
                                               timeout=timeout, dashboard=dashboard, log=log)
                rec.update(decision="promoted", previous=served["model_dir"],
                           previous_version=served.get("version"),
                           serving_version=card.get("version"),
                           reason=f"candidate val loss {c_ev['val_loss']:.4f} <= "
                                  f"{limit:.4f}")
            except UserError as e:
                rec.update(decision="failed", reason=str(e))
        append_log(app, rec, state)
        return rec


def rollback(app: str, *, to: str | os.PathLike | None = None, address: str | None = None,
             url: str | None = None, api_key: str | None = None,
             state: str | os.PathLike | None = None, timeout: float = 600.0,
             dashboard: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Put back the model the last (not yet undone) promotion replaced, or `to`."""
    from raygpt.lifecycle import serve_ops
    from raygpt.model.io import read_model_config

    log = log or (lambda _m: None)
    records = read_log(app, state)
    stack = rollback_stack(records)
    if to is not None:
        target = serve_ops.resolve_model_dir(str(to))
    elif stack:
        target = stack[-1]
    else:
        raise UserError(f"no promotion of Serve app {app!r} to roll back "
                        f"(log: {log_path(app, state)})")
    tmeta = read_model_config(target)
    with _serve_session(address, dashboard):
        served = serve_ops.served_model(app, url, api_key, dashboard)
        rec = {"time": _now(), "action": "rollback", "app": app, "from": served["model_dir"],
               "from_version": served.get("version"), "to": target,
               "to_version": tmeta.get("version"), "explicit": to is not None}
        try:
            card = serve_ops.set_model_dir(app, target, expect_version=tmeta.get("version"),
                                           url=url or served.get("url"), api_key=api_key,
                                           timeout=timeout, dashboard=dashboard, log=log)
            rec.update(decision="rolled_back", serving_version=card.get("version"))
        except UserError as e:
            rec.update(decision="failed", reason=str(e))
        append_log(app, rec, state)
        return rec
