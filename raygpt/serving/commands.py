"""`raygpt serve MODEL_DIR`: the Serve app of serve/*.yaml in one command. Heavy imports inside."""
from __future__ import annotations

from typing import Optional

import typer

from raygpt.errors import UserError


def key_args(api_key_env: str, address: str | None, app: str = "raygpt") -> dict:
    """Serve args that let replicas find the API key without it being in the Serve config
    (which `serve status` and the dashboard API show): a local Ray's replicas inherit our
    environment, so the variable's name is enough; on a cluster (--address) the key goes
    into Ray's KV store and the config names only the entry. Needs a connected Ray."""
    import os

    if not address:
        return {"api_key_env": api_key_env}
    from raygpt.serving.replicas import put_api_keys

    return {"api_key_kv": put_api_keys(app, os.environ[api_key_env])}


def serve_cmd(
    model_dir: str = typer.Argument(..., help="exported model directory (raygpt export)"),
    port: int = typer.Option(8000, "--port", help="HTTP port"),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP host (0.0.0.0 for all interfaces)"),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", min=1, help="fixed number of replicas (default: 1)"),
    max_slots: int = typer.Option(32, "--max-slots", min=1,
                                  help="KV-cache slots per replica (the most requests batched)"),
    max_ongoing: int = typer.Option(64, "--max-ongoing", min=1,
                                    help="max_ongoing_requests per replica"),
    max_queued: int = typer.Option(256, "--max-queued", help="max_queued_requests (503 beyond; -1 = no limit)"),
    num_cpus: float = typer.Option(1.0, "--num-cpus", min=0.0, help="CPUs per replica"),
    num_gpus: float = typer.Option(0.0, "--num-gpus", min=0.0, help="GPUs per replica (fractions allowed)"),
    name: str = typer.Option("raygpt", "--model-name", help="the model name clients pass"),
    api_key_env: Optional[str] = typer.Option(
        None, "--api-key-env", help="environment variable holding an API key (Bearer auth)"),
    rate_limit: float = typer.Option(0.0, "--rate-limit", min=0.0,
                                     help="requests/s per client and replica (0 = off)"),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster to join (default: start a local Ray; 'auto' = running one)"),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard",
                                   help="start Ray's dashboard with a local Ray (needed by `serve status`)"),
    drain_timeout: float = typer.Option(
        60.0, "--drain-timeout", min=0.0,
        help="on SIGTERM/Ctrl-C: seconds in-flight requests get to finish before exit"),
    engine_process: bool = typer.Option(
        False, "--engine-process/--no-engine-process",
        help="run each replica's engine loop in a child process (its own GIL; see docs/serving.md)"),
    step_delay: float = typer.Option(0.0, "--step-delay", min=0.0, hidden=True,
                                     help="testing aid: sleep after each engine step"),
):
    """Serve MODEL_DIR over HTTP (OpenAI-style /v1/completions, playground at /) until Ctrl-C.

    SIGTERM (or Ctrl-C) drains: new requests get 503 + Retry-After, in-flight ones finish (up to
    --drain-timeout seconds), then Serve and Ray shut down and the exit status is 0."""
    import os
    import signal
    import threading
    from pathlib import Path

    from raygpt.model.io import read_model_config

    md = Path(model_dir).expanduser().resolve()
    meta = read_model_config(md)  # fails fast (exit 2) on a missing/broken directory
    if api_key_env and not os.environ.get(api_key_env):
        raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty")

    import ray
    from ray import serve

    from raygpt.serving.app import make_app
    from raygpt.serving.replicas import delete_api_keys, drain_app, set_drain

    stop = threading.Event()
    if address:
        ray.init(address=address)
    else:  # address="local": a fresh Ray, never a stray cluster of another program
        ray.init(address="local", include_dashboard=dashboard)
    # After ray.init (which installs its own SIGTERM handler): the handler only sets a flag;
    # raising from it inside Ray's code ended in Ray's signal dump and an abort.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": port})
        opts: dict = {"max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
                      "graceful_shutdown_timeout_s": drain_timeout,
                      "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
        if replicas:
            opts["num_replicas"] = replicas
        args = {"model_dir": str(md), "max_slots": max_slots, "model_name": name,
                "rate_limit_rps": rate_limit, "step_delay_s": step_delay, "engine_process": engine_process}
        if api_key_env:
            args.update(key_args(api_key_env, address))
        if not stop.is_set():
            set_drain("raygpt", False)  # a drain left by an earlier run on this cluster
            serve.run(make_app(args, **opts), name="raygpt", route_prefix="/")
            deployed = True
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}"
        typer.echo(f"serving {md} (version {meta.get('version')}) as model {name!r}")
        typer.echo(f"  playground  {url}/")
        typer.echo(f"  API         {url}/v1/completions   (GET {url}/v1/models)")
        typer.echo("Ctrl-C to stop.", err=True)
        while not stop.wait(1.0):
            pass
        typer.echo("draining: no new requests; in-flight ones finish "
                   f"(up to {drain_timeout:g}s)", err=True)
        if deployed:
            # While the app still routes, replicas answer new requests 503 + Retry-After
            # (retryable) and finish the in-flight ones; once all are idle the app is
            # deleted (then the proxy would answer 404). graceful_shutdown_timeout_s
            # still bounds whatever is left.
            d = drain_app("raygpt", drain_timeout)
            typer.echo(f"drained {d['replicas']} replica(s) in {d['seconds']:g}s"
                       + ("" if d["drained"] else " (timed out: in-flight requests cut)"), err=True)
            serve.delete("raygpt", _blocking=True)
            set_drain("raygpt", False)
            if api_key_env and address:
                delete_api_keys("raygpt")
        typer.echo("stopped", err=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
