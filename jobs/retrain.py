"""Scheduled retraining: fine-tune the served model on new data -> evaluate -> promote.

    python jobs/retrain.py --serve-app raygpt --new-data /mnt/raygpt/incoming \\
        --storage /mnt/raygpt/runs --models-dir /mnt/raygpt/models --steps 500 --address auto

1. base model: --base MODEL_DIR, or the model the Serve app --serve-app serves now;
2. new data: a text file / directory encoded with the base model's tokenizer (or a
   directory prepared with it), written to <storage>/data/<name>;
3. fine-tune under Ray Train (`raygpt train --init-from BASE`: the base's shape and
   tokenizer, --preset/--config/--set for the optimizer, train.freeze, workers...);
4. export to <models-dir>/<name>;
5. promote (`raygpt promote`): candidate vs served model on the held-out split of the new
   data (--eval-on new, default) or of the served model's own training data (--eval-on
   served); swapped in only if not worse than served + --margin; logged with both scores.

Prints one JSON summary line (also written to <storage>/<name>/retrain.json). Exit code:
0 promoted (or nothing to do / --dry-run), 3 refused by the gate, 1 the swap failed,
2 a usage error. Run it from cron, `ray job submit`, or KubeRay's RayCronJob
(cluster/kuberay/raycronjob.yaml); see docs/lifecycle.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raygpt.errors import UserError  # noqa: E402

EXIT = {"promoted": 0, "noop": 0, "would_promote": 0, "evaluated": 0, "refused": 3, "failed": 1}


def _log(msg: str) -> None:
    print(f"[retrain] {msg}", file=sys.stderr, flush=True)


def retrain(*, new_data: str, storage: str, serve_app: str | None = None, base: str | None = None,
            models_dir: str | None = None, name: str | None = None, preset: str | None = None,
            config: str | None = None, sets: list[str] | None = None, steps: int | None = None,
            num_workers: str | None = None, address: str | None = None,
            serve_address: str | None = None, margin: float = 0.0, eval_on: str = "new",
            eval_steps: int = 20, url: str | None = None, api_key: str | None = None,
            dashboard: str | None = None, state_dir: str | None = None, dry_run: bool = False,
            log=_log) -> dict:
    import ray

    from raygpt.lifecycle import serve_ops
    from raygpt.lifecycle.data import check_same_tokenizer, prepare_with_tokenizer
    from raygpt.lifecycle.eval import evaluate_model
    from raygpt.lifecycle.promote import promote
    from raygpt.model.io import read_model_config
    from raygpt.train.export import export_checkpoint
    from raygpt.train.runconfig import build_run_config
    from raygpt.train.launch import run_training

    if serve_app is None and base is None:
        raise UserError("give --serve-app (fine-tune what it serves, then promote) or --base")
    if eval_on not in ("new", "served"):
        raise UserError(f"--eval-on {eval_on!r}: use 'new' or 'served'")
    storage_p = Path(storage).expanduser().resolve()
    name = name or f"retrain-{serve_app or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
    models = Path(models_dir).expanduser().resolve() if models_dir else storage_p / "models"

    # 1. the base model
    if base is None:
        started = False if dashboard else serve_ops.connect(serve_address or address)
        try:
            base = serve_ops.served_model(serve_app, url, api_key, dashboard)["model_dir"]
        finally:
            if started:
                ray.shutdown()
    base = serve_ops.resolve_model_dir(base)
    read_model_config(base)
    log(f"base model {base}")

    # 2. the new data, in the base model's tokens
    src = Path(new_data).expanduser()
    if (src / "meta.json").is_file():
        check_same_tokenizer(base, src)
        data = src
    else:
        data = storage_p / "data" / name
        prepare_with_tokenizer(src, data, Path(base) / "tokenizer.json", unknown="drop", log=log)

    # 3. fine-tune
    over = list(sets or []) + [f"data.path={data}"]
    if steps is not None:
        over.append(f"train.max_steps={steps}")
    cfg = build_run_config(config, preset, over, num_workers=num_workers, storage=str(storage_p),
                           name=name, address=address, init_from=base)
    summary = run_training(cfg, progress=False)
    log(f"fine-tuned {summary.get('steps')} steps: best val loss {summary.get('best_val_loss')}")

    # 4. export
    candidate = export_checkpoint(summary["checkpoint"] or summary["run_dir"], models / name)
    log(f"exported {candidate}")

    # 5. evaluate and promote
    eval_data = str(data) if eval_on == "new" else None
    out = {"name": name, "base": base, "data": str(data), "run_dir": summary.get("run_dir"),
           "candidate": str(candidate),
           "train": {k: summary.get(k) for k in ("steps", "best_val_loss", "final_val_loss",
                                                  "train_seconds", "plan")}}
    if serve_app:
        rec = promote(candidate, serve_app, margin=margin, data=eval_data, steps=eval_steps,
                      address=serve_address or address, url=url, api_key=api_key,
                      state=state_dir, dry_run=dry_run, dashboard=dashboard, log=log)
        out["promotion"] = rec
        out["decision"] = rec["decision"]
    else:
        ev_c = evaluate_model(candidate, eval_data or data, steps=eval_steps, samples=0)
        ev_b = evaluate_model(base, eval_data or data, steps=eval_steps, samples=0)
        out["evaluation"] = {"candidate": ev_c["val_loss"], "base": ev_b["val_loss"]}
        out["decision"] = "evaluated"
    run_dir = summary.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        (Path(run_dir) / "retrain.json").write_text(json.dumps(out, indent=2))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-data", required=True, help="text file/dir (or a dir prepared with the base tokenizer)")
    p.add_argument("--storage", required=True, help="runs, prepared data (and models by default) go here")
    p.add_argument("--serve-app", help="Serve application to fine-tune from and promote into")
    p.add_argument("--base", help="model dir to fine-tune (default: what --serve-app serves)")
    p.add_argument("--models-dir", help="where candidates are exported (default <storage>/models); "
                                       "must be readable by the Serve replicas")
    p.add_argument("--name", help="run / candidate name (default retrain-<app>-<time>)")
    p.add_argument("--preset", "-p", help="optimizer/training preset (the shape comes from the base)")
    p.add_argument("--config", "-c", help="YAML config of the fine-tuning run")
    p.add_argument("--set", "-s", dest="sets", action="append", default=[], help="section.field=value")
    p.add_argument("--steps", type=int, help="fine-tuning steps (train.max_steps)")
    p.add_argument("--num-workers", "-n", help="N or MIN:MAX")
    p.add_argument("--address", help="Ray cluster for training ('auto' inside a job)")
    p.add_argument("--serve-address", help="Ray cluster running Serve, when not the training one "
                                          "(e.g. ray://raygpt-serve-head-svc:10001)")
    p.add_argument("--dashboard", help="reach Serve through its dashboard REST API instead "
                                      "(e.g. http://raygpt-serve-head-svc:8265; config-deployed apps)")
    p.add_argument("--url", help="the Serve app's HTTP base URL (e.g. http://raygpt-serve-serve-svc:8000)")
    p.add_argument("--api-key", default=os.environ.get("RAYGPT_API_KEY"), help="Bearer key (env RAYGPT_API_KEY)")
    p.add_argument("--margin", type=float, default=0.0, help="promote if candidate <= served + margin")
    p.add_argument("--eval-on", default="new", choices=["new", "served"],
                   help="held-out data for the gate: the new data's val split, or the served model's data")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--state-dir", help="promotion log dir (default ~/.cache/raygpt/promotions)")
    p.add_argument("--dry-run", action="store_true", help="decide, do not swap")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        out = retrain(new_data=a.new_data, storage=a.storage, serve_app=a.serve_app, base=a.base,
                      models_dir=a.models_dir, name=a.name, preset=a.preset, config=a.config,
                      sets=a.sets, steps=a.steps, num_workers=a.num_workers, address=a.address,
                      serve_address=a.serve_address, margin=a.margin, eval_on=a.eval_on,
                      eval_steps=a.eval_steps, url=a.url, api_key=a.api_key,
                      dashboard=a.dashboard, state_dir=a.state_dir, dry_run=a.dry_run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return EXIT.get(out["decision"], 1)


if __name__ == "__main__":
    sys.exit(main())
