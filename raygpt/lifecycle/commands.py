"""`raygpt eval | distill | promote | rollback`. Heavy imports (torch, ray) stay inside."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from raygpt.errors import UserError

_STEPS = typer.Option(20, "--steps", min=1, help="val batches to average (fixed, seeded: the same for every model)")
_BATCH = typer.Option(16, "--batch-size", min=1, help="sequences per val batch")
_SEED = typer.Option(1234, "--seed", help="which val windows (same seed = same windows)")
_DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
_ADDRESS = typer.Option(None, "--address", help="Ray cluster running Serve (default: RAY_ADDRESS or 'auto')")
_URL = typer.Option(None, "--url", help="the app's HTTP base URL (default: from Serve's HTTP options + route prefix)")
_STATE = typer.Option(None, "--state-dir", help="decision log dir (default: $RAYGPT_STATE_DIR or ~/.cache/raygpt/promotions)")
_DASHBOARD = typer.Option(None, "--dashboard", help="reach Serve via the dashboard REST API (http://HEAD:8265) instead of joining Ray; config-deployed apps only")
_API_KEY = typer.Option(None, "--api-key", envvar="RAYGPT_API_KEY", help="Bearer key when the app requires one")


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def eval_cmd(
    model_dir: str = typer.Argument(..., help="exported model directory"),
    data: Optional[str] = typer.Option(
        None, "--data", help="prepared data dir (same tokenizer), or a text file/dir to encode with the "
                             "model's tokenizer; default: the data the model was trained on"),
    steps: int = _STEPS,
    batch_size: int = _BATCH,
    seed: int = _SEED,
    samples: int = typer.Option(3, "--samples", min=0, help="greedy samples to show"),
    sample_tokens: int = typer.Option(64, "--sample-tokens", min=1),
    device: str = _DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
):
    """Val loss, perplexity, tokens/s and greedy samples of MODEL_DIR on held-out data."""
    from raygpt.lifecycle.eval import evaluate_model

    res = evaluate_model(model_dir, data, steps=steps, batch_size=batch_size, seed=seed,
                         samples=samples, sample_tokens=sample_tokens, device=device,
                         log=None if as_json else _err)
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"model      {res['model_dir']} (version {res['version']}, {res['params'] / 1e6:.2f}M params)")
    typer.echo(f"data       {res['data_dir']} (val split, {res['steps']} x {res['batch_size']} x "
               f"{res['block_size']} = {res['tokens']:,} tokens, seed {res['seed']})")
    typer.echo(f"val loss   {res['val_loss']:.4f}")
    typer.echo(f"perplexity {res['perplexity']:.3f}")
    typer.echo(f"tokens/s   {res['tokens_per_s']:,.0f} ({res['device']})")
    for i, s in enumerate(res["samples"]):
        typer.echo(f"--- sample {i} (greedy) ---")
        typer.echo(f"{s['prompt']}[>]{s['completion']}")


def distill_cmd(
    teacher: str = typer.Option(..., "--teacher", help="exported teacher model directory"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="the student's preset (e.g. debug)"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config of the student run"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="override: section.field=value (repeatable)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="softmax temperature T (default 2)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.0, max=1.0, help="weight of the KL term (default 0.5)"),
    num_workers: Optional[str] = typer.Option(None, "--num-workers", "-n", help="N, or MIN:MAX for an elastic run"),
    use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-gpu", help="default: auto-detect"),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker"),
    storage: Optional[str] = typer.Option(None, "--storage", help="run storage (default ./runs)"),
    name: Optional[str] = typer.Option(None, "--name", help="run name (same storage+name resumes)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address ('auto' joins a running cluster)"),
    export: Optional[str] = typer.Option(None, "--export", help="export the distilled student to this model dir"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config and exit"),
):
    """Distill a teacher into a smaller student (KL on soft targets + CE) with Ray Train."""
    from raygpt.lifecycle.distill import build_distill_config

    if preset is None and config is None:
        raise UserError("--preset (or --config) names the student, e.g. --preset debug")
    cfg = build_distill_config(teacher, config, preset, set_, temperature=temperature, alpha=alpha,
                               num_workers=num_workers, use_gpu=use_gpu,
                               cpus_per_worker=cpus_per_worker, storage=storage, name=name,
                               address=address, log=_err)
    if print_config:
        typer.echo(cfg.to_yaml())
        return
    from raygpt.train.commands import print_summary
    from raygpt.train.launch import run_training

    summary = run_training(cfg)
    print_summary(summary)
    if export:
        from raygpt.train.export import export_checkpoint

        p = export_checkpoint(summary["checkpoint"] or summary["run_dir"], export)
        typer.echo(f"exported the student -> {p}")


def _print_decision(rec: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rec))
        return
    c, s = rec.get("candidate"), rec.get("served")
    if c and s:
        typer.echo(f"candidate {rec['candidate_dir']}: val loss {c['val_loss']:.4f} (ppl {c['perplexity']:.3f})")
        typer.echo(f"served    {rec['served_dir']}: val loss {s['val_loss']:.4f} (ppl {s['perplexity']:.3f})")
    typer.echo(f"decision: {rec['decision']}" + (f" ({rec['reason']})" if rec.get("reason") else ""))


def promote_cmd(
    candidate: str = typer.Argument(..., help="candidate model directory (absolute or relative; must be readable by the replicas)"),
    serve_app: str = typer.Option(..., "--serve-app", help="name of the running Serve application"),
    margin: float = typer.Option(0.0, "--margin", help="promote if candidate val loss <= served + margin"),
    data: Optional[str] = typer.Option(None, "--data", help="held-out data (default: the served model's training data)"),
    steps: int = _STEPS,
    batch_size: int = _BATCH,
    seed: int = _SEED,
    device: str = _DEVICE,
    address: Optional[str] = _ADDRESS,
    dashboard: Optional[str] = _DASHBOARD,
    url: Optional[str] = _URL,
    api_key: Optional[str] = _API_KEY,
    state_dir: Optional[str] = _STATE,
    dry_run: bool = typer.Option(False, "--dry-run", help="evaluate and decide, do not swap"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait for the swap"),
    as_json: bool = typer.Option(False, "--json", help="print the decision record as JSON"),
):
    """Evaluate CANDIDATE against the served model; swap it in only if it is not worse."""
    from raygpt.lifecycle.promote import promote

    rec = promote(candidate, serve_app, margin=margin, data=data, steps=steps,
                  batch_size=batch_size, seed=seed, device=device, address=address, url=url,
                  api_key=api_key, state=state_dir, dry_run=dry_run, timeout=timeout,
                  dashboard=dashboard, log=None if as_json else _err)
    _print_decision(rec, as_json)
    if rec["decision"] == "failed":
        raise SystemExit(1)
    if rec["decision"] == "refused":
        raise SystemExit(3)


def rollback_cmd(
    serve_app: str = typer.Option(..., "--serve-app", help="name of the running Serve application"),
    to: Optional[str] = typer.Option(None, "--to", help="this model dir instead of the one the last promotion replaced"),
    address: Optional[str] = _ADDRESS,
    dashboard: Optional[str] = _DASHBOARD,
    url: Optional[str] = _URL,
    api_key: Optional[str] = _API_KEY,
    state_dir: Optional[str] = _STATE,
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait for the swap"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Serve again the model that the last promotion replaced."""
    from raygpt.lifecycle.promote import rollback

    rec = rollback(serve_app, to=to, address=address, url=url, api_key=api_key, state=state_dir,
                   timeout=timeout, dashboard=dashboard, log=None if as_json else _err)
    if as_json:
        typer.echo(json.dumps(rec))
    else:
        typer.echo(f"{rec['decision']}: {rec['from']} -> {rec['to']}"
                   + (f" ({rec['reason']})" if rec.get("reason") else ""))
    if rec["decision"] != "rolled_back":
        raise SystemExit(1)
