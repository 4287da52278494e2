"""What replicas and drivers tell each other through Ray's KV store.

- Each replica publishes its state under `KV_PREFIX/<app>/<replica id>`: the model it
  serves (`raygpt promote` waits on every replica's), and while draining whether it is
  idle.
- `raygpt serve --address` puts the API key(s) under `SECRET_PREFIX/<app>/api_keys`; the
  Serve config names only that entry (anyone who can run a Ray driver on the cluster can
  read it, as they could any replica's memory; the dashboard's Serve API cannot).
- A driver that shuts an app down (`raygpt serve` on SIGTERM) sets the app's drain key
  first. Every replica polls it and answers new requests 503 + Retry-After (retryable:
  the openai SDK and load balancers retry a 503, not the 404 Serve's proxy gives once the
  app is deleted), and the driver deletes the app only when every running replica has
  said it is idle (or the drain timeout passed). A Serve handle call would reach one
  replica; the KV store reaches them all.
"""
from __future__ import annotations

import json
import time

KV_PREFIX = "raygpt/serve"
DRAIN_PREFIX = "raygpt/serve-drain"
SECRET_PREFIX = "raygpt/serve-secret"
SERVER_DEPLOYMENT = "GPTServer"


def state_key(app: str, replica_id: str) -> str:
    return f"{KV_PREFIX}/{app}/{replica_id}"


def drain_key(app: str) -> str:
    return f"{DRAIN_PREFIX}/{app}"


def published_states(details: dict, app: str, deployment: str = SERVER_DEPLOYMENT) -> dict[str, dict | None]:
    """{replica_id: published state} for every RUNNING replica of `deployment` in Serve's
    instance details (None: not published yet). Needs this process in the Ray cluster."""
    from raygpt.raycompat import kv_get

    d = (((details.get("applications") or {}).get(app) or {}).get("deployments") or {}).get(deployment) or {}
    out: dict[str, dict | None] = {}
    for r in d.get("replicas") or []:
        if str(getattr(r.get("state"), "value", r.get("state"))) != "RUNNING":
            continue
        raw = kv_get(state_key(app, r["replica_id"]))
        out[r["replica_id"]] = json.loads(raw) if raw else None
    return out


def secret_key(app: str) -> str:
    return f"{SECRET_PREFIX}/{app}/api_keys"


def put_api_keys(app: str, keys: str) -> str:
    """Store an app's API key(s) in Ray's KV store -> the entry's name, which is all the
    Serve config holds (settings.api_key_kv). Not a runtime_env env var: Serve keeps
    those in the deployment config, which `serve status`/the dashboard API show."""
    from raygpt.raycompat import kv_put

    kv_put(secret_key(app), keys.encode())
    return secret_key(app)


def delete_api_keys(app: str) -> None:
    from raygpt.raycompat import kv_del

    kv_del(secret_key(app))


def set_drain(app: str, on: bool) -> None:
    from raygpt.raycompat import kv_del, kv_put

    if on:
        kv_put(drain_key(app), str(time.time()).encode())
    else:
        kv_del(drain_key(app))


def drain_requested(app: str) -> bool:
    from raygpt.raycompat import kv_get

    return bool(kv_get(drain_key(app)))


def drain_app(app: str, timeout_s: float, poll_s: float = 0.2) -> dict:
    """Ask every replica of `app` to stop admitting, then wait until each running one
    reports idle (in-flight requests, streams included, finished) or `timeout_s` passed.
    -> {"drained": bool, "replicas": n, "seconds": s}. The caller then deletes the app."""
    from raygpt.raycompat import serve_client

    t0 = time.monotonic()
    set_drain(app, True)
    client = serve_client()
    states: dict = {}
    while client is not None:
        states = published_states(client.get_serve_details(), app)
        done = all(s is not None and s.get("draining") and s.get("idle") for s in states.values())
        if done or time.monotonic() - t0 >= timeout_s:
            break
        time.sleep(poll_s)
    idle = all(s is not None and s.get("idle") for s in states.values())
    return {"drained": idle, "replicas": len(states), "seconds": round(time.monotonic() - t0, 2)}
