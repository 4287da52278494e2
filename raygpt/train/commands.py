"""`raygpt train | export | generate | report`. Heavy imports (torch, ray) stay inside."""
from __future__ import annotations

from typing import List, Optional

import typer

from raygpt.errors import UserError
from raygpt.train.runconfig import build_run_config, parse_workers  # noqa: F401 (re-exported)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config file")
PRESET_OPT = typer.Option(None, "--preset", "-p", help="named preset (debug, shakespeare-char-cpu, shakespeare-char, gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
SET_OPT = typer.Option(None, "--set", "-s", help="override a field: section.field=value (repeatable)")


def train_cmd(
    config: Optional[str] = CONFIG_OPT,
    preset: Optional[str] = PRESET_OPT,
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="override: section.field=value (repeatable)"),
    num_workers: Optional[str] = typer.Option(None, "--num-workers", "-n", help="N, or MIN:MAX for an elastic run"),
    use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-gpu", help="default: auto-detect"),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker"),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker"),
    resources_per_worker: Optional[str] = typer.Option(None, "--resources-per-worker", help="JSON of extra Ray resources per worker"),
    storage: Optional[str] = typer.Option(None, "--storage", help="run storage: local path or URI (s3://, gs://, ...); default ./runs"),
    name: Optional[str] = typer.Option(None, "--name", help="run name; a run with the same storage+name resumes"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address ('auto' joins a running cluster); default: local"),
    max_failures: Optional[int] = typer.Option(None, "--max-failures", help="worker-group restarts allowed (-1 = unlimited)"),
    dashboard: Optional[bool] = typer.Option(None, "--dashboard/--no-dashboard", help="start the local Ray's dashboard (http://127.0.0.1:8265); default off"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="fine-tune from an exported model directory"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config and exit"),
    profile: Optional[str] = typer.Option(None, "--profile", help="START:COUNT: torch profiler trace of those steps per rank into <run dir>/profile/"),
):
    """Train a GPT with Ray Train (default: the bundled Shakespeare corpus, local Ray, CPU)."""
    cfg = build_run_config(config, preset, set_, num_workers=num_workers, use_gpu=use_gpu,
                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                           storage=storage, name=name, address=address, max_failures=max_failures,
                           dashboard=dashboard, init_from=init_from, resources=resources_per_worker, profile=profile)
    if print_config:
        typer.echo(cfg.to_yaml())
        return
    from raygpt.train.launch import RunInterrupted, run_training

    try:
        summary = run_training(cfg)
    except RunInterrupted as e:
        typer.echo(f"raygpt: run '{e.paths.name}' stopped at step {e.step}; resume it with:\n"
                   f"  {resume_command(e.paths)}", err=True)
        raise SystemExit(130) from None  # (typer.Exit under standalone_mode=False returns 0)
    print_summary(summary)


def resume_command(paths) -> str:
    """The command line that continues a run: its saved config, name and storage."""
    import shlex

    from raygpt.train.launch import redact_uri

    cfg_file = paths.run_dir / "config.yaml"
    return shlex.join(["raygpt", "train", "--config", str(cfg_file), "--name", paths.name,
                       "--storage", redact_uri(paths.storage)])


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="raygpt train: summary", show_header=False)
    for k in ("best_val_loss", "final_val_loss", "steps", "tokens_per_s", "mfu", "train_seconds",
              "plan", "checkpoint", "run_dir"):
        v = s.get(k)
        if isinstance(v, float):
            v = f"{100 * v:.2f}%" if k == "mfu" else (f"{v:,.1f}" if k == "tokens_per_s" else f"{v:.4f}")
        t.add_row(k, str(v))
    Console().print(t)


def report_cmd(
    run_dir: str = typer.Argument(..., help="a run directory (runs/NAME): its metrics.jsonl"),
):
    """Where the run's wall time went: goodput and badput by category, and goodput.png."""
    from raygpt.train.report import report

    _, png = report(run_dir)
    typer.echo(f"wrote {png}")


def export_cmd(
    checkpoint: str = typer.Argument(..., help="checkpoint directory, a run directory (its latest "
                                     "checkpoint), or a model directory (raygpt or Hugging Face) to convert"),
    out: str = typer.Option(..., "--out", "-o", help="output model directory"),
    format: str = typer.Option("raygpt", "--format", "-f",
                               help="raygpt (model.safetensors + config.json + tokenizer.json) or "
                                    "hf (a GPT-2 directory transformers and vLLM load)"),
):
    """Export a sharded checkpoint (or convert a model directory) to a model directory."""
    from raygpt.train.export import export_to

    p = export_to(checkpoint, out, format)
    typer.echo(f"exported {checkpoint} -> {p} ({format})")


def generate_cmd(
    model_dir: str = typer.Argument(..., help="exported model directory"),
    prompt: str = typer.Option("\n", "--prompt", help="text to continue"),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0 = greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    num_samples: int = typer.Option(1, "--num-samples", min=1),
):
    """Generate text from an exported model (safetensors; nothing is unpickled)."""
    import torch

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.model.io import TOKENIZER, load_model_dir

    model, _ = load_model_dir(model_dir)
    from pathlib import Path

    tok_path = Path(model_dir) / TOKENIZER
    if not tok_path.is_file():
        raise UserError(f"model directory {model_dir!r} has no {TOKENIZER}")
    tok = load_tokenizer(tok_path)
    model.restrict_vocab(tok.vocab_size)  # a padded table: never sample an id past the tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("--prompt is empty after tokenization")
    if len(ids) > model.config.block_size:
        raise UserError(f"--prompt has {len(ids)} tokens; the model's context is {model.config.block_size}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in range(num_samples):
        out = model.generate(torch.tensor([ids]), max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=gen)
        text = tok.decode(out[0, len(ids):].tolist())
        typer.echo(prompt + text)
        if i < num_samples - 1:
            typer.echo("-" * 40)
