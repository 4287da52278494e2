"""What a running Serve application serves, and swapping its model without downtime.

The serving app (raygpt.serving.app) takes its model from the deployment's
`user_config: {model_dir: ..., version: ...}`; a change of user_config alone is a Serve *lightweight
update*: every replica's `reconfigure` loads the new directory beside the old model and
swaps it in, in-flight requests finish on the old one, and a directory that fails to load
is refused (GET /admin/model then shows `last_update_error`). Nothing restarts.

How the new user_config reaches Serve depends on how the application was deployed:

- declaratively (`serve deploy` / `serve run CONFIG.yaml` / a KubeRay RayService): the
  running config of every declarative app is re-applied with only this app's
  user_config changed: what `serve deploy` of the edited file does.
- imperatively (`serve.run`, `raygpt serve`): the app's deployments are re-sent to the
  controller with their current code version, replica config and options, only the
  user_config changed (serve.run itself would give them a new random code version, which
  restarts the replicas). This uses Serve's controller API (ray.serve._private, through
  raygpt.raycompat); a Ray version where it changed gives a clear error (redeploy from
  a config file then).

Two ways to reach Serve: through Ray (this process joins the cluster: --address), or
through the dashboard's Serve REST API (--dashboard http://HEAD:8265, what `serve deploy`
and KubeRay use; declarative apps only), e.g. from a job running on another cluster.

On a KubeRay RayService, KubeRay re-applies `serveConfigV2` when the custom resource
changes: record a promotion there too (docs/lifecycle.md).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from raygpt.errors import UserError
from raygpt.serving.replicas import SERVER_DEPLOYMENT  # the deployment carrying model_dir


class SwapError(UserError):
    """A model update that Serve refused (the old model keeps serving)."""


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster Serve runs on (unless this process is already connected).
    Returns True when this call connected (the caller disconnects)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at --address {address}: {e}") from None
    return True


def _rest(dashboard: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard)


def get_details(dashboard: str | None = None) -> dict:
    """Serve's instance details (what `serve status -v` / GET /api/serve/applications/ show)."""
    if dashboard:
        try:
            return _rest(dashboard).get_serve_details()
        except Exception as e:  # noqa: BLE001 - connection refused, 404 without Serve, ...
            raise UserError(f"--dashboard {dashboard}: cannot read Serve's state ({e})") from None
    return _client().get_serve_details()


def _client():
    from raygpt.raycompat import serve_client

    c = serve_client()
    if c is None:
        raise UserError("no Ray Serve instance runs on this Ray cluster")
    return c


@dataclass
class AppInfo:
    name: str
    source: str                    # "declarative" | "imperative" | "unknown"
    route_prefix: str | None
    deployment: str                # the deployment carrying user_config.model_dir
    user_config: dict | None
    status: str
    url: str | None                # http://host:port/prefix (None: HTTP disabled)
    deployed_app_config: dict | None


def _url(details: dict, route_prefix: str | None, host_hint: str | None = None) -> str | None:
    http = details.get("http_options") or {}
    if details.get("proxy_location") in ("Disabled", "NoServer") or not http.get("port"):
        return None
    host = http.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = host_hint or "127.0.0.1"  # the head we reached the dashboard on
    prefix = (route_prefix or "/").rstrip("/")
    return f"http://{host}:{http['port']}{prefix}"


def app_info(app: str, dashboard: str | None = None) -> AppInfo:
    details = get_details(dashboard)
    apps = details.get("applications") or {}
    if app not in apps:
        known = ", ".join(sorted(apps)) or "none"
        raise UserError(f"--serve-app {app!r}: no such Serve application (running: {known})")
    a = apps[app]
    deps = a.get("deployments") or {}
    name = SERVER_DEPLOYMENT if SERVER_DEPLOYMENT in deps else None
    if name is None:
        for dn, d in deps.items():
            uc = (d.get("deployment_config") or {}).get("user_config")
            if isinstance(uc, dict) and "model_dir" in uc:
                name = dn
                break
    if name is None:
        raise UserError(f"Serve application {app!r} has no raygpt model deployment "
                        f"(deployments: {', '.join(deps) or 'none'})")
    uc = (deps[name].get("deployment_config") or {}).get("user_config")
    src = a.get("source")
    src = getattr(src, "value", src) or "unknown"
    return AppInfo(name=app, source=str(src).lower(), route_prefix=a.get("route_prefix"),
                   deployment=name, user_config=dict(uc) if isinstance(uc, dict) else None,
                   status=str(getattr(a.get("status"), "value", a.get("status"))),
                   url=_url(details, a.get("route_prefix"),
                            urlparse(dashboard).hostname if dashboard else None),
                   deployed_app_config=a.get("deployed_app_config"))


# ----------------------------------------------------------------------------- HTTP


def _headers(api_key: str | None) -> dict:
    key = api_key or os.environ.get("RAYGPT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def model_card(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    """GET {url}/admin/model -> the served model's card (model_dir, version,
    last_update_error, ...); GET /v1/models of a server older than /admin/model."""
    import httpx

    r = httpx.get(f"{url}/admin/model", headers=_headers(api_key), timeout=timeout)
    if r.status_code == 404:
        r = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=timeout)
        if r.status_code == 200:
            return r.json()["data"][0]
    if r.status_code != 200:
        raise UserError(f"GET {r.request.url}: HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


def served_model(app: str, url: str | None = None, api_key: str | None = None,
                 dashboard: str | None = None) -> dict:
    """-> {"model_dir", "version", "url", "source": "http"|"user_config", "card"}.

    The card the app answers on GET /v1/models is the truth (it is what replicas serve,
    also after a refused update); the deployment's user_config is the fallback when the
    HTTP endpoint is not reachable from here."""
    info = app_info(app, dashboard)
    url = url or info.url
    if url:
        try:
            card = model_card(url, api_key)
            if card.get("model_dir"):
                return {"model_dir": card["model_dir"], "version": card.get("version"),
                        "url": url, "source": "http", "card": card}
        except Exception as e:  # noqa: BLE001 - fall back to the deployment config
            last = e
        else:
            last = None
    else:
        last = None
    md = (info.user_config or {}).get("model_dir")
    if not md:
        raise UserError(f"cannot tell which model Serve app {app!r} serves"
                        + (f" ({last})" if last else ""))
    version = None
    try:
        from raygpt.model.io import read_model_config

        version = read_model_config(md).get("version")
    except Exception:  # noqa: BLE001 - the dir may be on another node only
        pass
    return {"model_dir": md, "version": version, "url": url, "source": "user_config", "card": None}


# ----------------------------------------------------------------------------- update


def _update_declarative(info: AppInfo, new_user_config: dict, dashboard: str | None = None) -> None:
    details = get_details(dashboard)
    apps = []
    for name, a in (details.get("applications") or {}).items():
        src = str(getattr(a.get("source"), "value", a.get("source"))).lower()
        cfg = a.get("deployed_app_config")
        if src != "declarative" or cfg is None:
            continue
        cfg = copy.deepcopy(cfg)
        if name == info.name:
            deps = cfg.setdefault("deployments", [])
            for d in deps:
                if d.get("name") == info.deployment:
                    d["user_config"] = new_user_config
                    break
            else:
                deps.append({"name": info.deployment, "user_config": new_user_config})
        apps.append(cfg)
    body = {"applications": apps}
    for key in ("proxy_location", "http_options", "target_capacity"):
        v = details.get(key)
        if v is not None:
            body[key] = v
    if dashboard:
        _rest(dashboard).deploy_applications(body)
    else:
        from ray.serve.schema import ServeDeploySchema

        _client().deploy_apps(ServeDeploySchema.model_validate(body))


def _update_imperative(info: AppInfo, new_user_config: dict) -> None:
    from raygpt import raycompat

    try:
        get_deploy_args = raycompat.serve_get_deploy_args()
        from ray.serve.generated.serve_pb2 import ApplicationArgs, DeploymentArgs
    except ImportError as e:
        raise UserError(f"this Ray version's Serve has no controller API raygpt knows ({e}): "
                        f"deploy app {info.name!r} from a config file (serve deploy) to promote") from None
    c = _client()
    infos = raycompat.serve_deployments(c)
    mine = {did.name: (di, route) for did, (di, route) in infos.items()
            if getattr(did, "app_name", None) == info.name}
    if info.deployment not in mine:
        raise UserError(f"Serve app {info.name!r}: deployment {info.deployment!r} not found")
    args_list = []
    for name, (di, _route) in mine.items():
        dc = copy.deepcopy(di.deployment_config)
        if name == info.deployment:
            dc.user_config = new_user_config
            names = set(getattr(dc, "user_configured_option_names", set()) or set())
            names.add("user_config")
            dc.user_configured_option_names = names
        if not di.version:
            raise UserError(f"Serve app {info.name!r}: deployment {name!r} has no code version")
        a = get_deploy_args(
            name, replica_config=di.replica_config, ingress=di.ingress,
            ingress_request_router=getattr(di, "ingress_request_router", False),
            deployment_config=dc, version=di.version,
            route_prefix=info.route_prefix if di.ingress else None)
        p = DeploymentArgs()
        p.deployment_name = a["deployment_name"]
        p.deployment_config = a["deployment_config_proto_bytes"]
        p.replica_config = a["replica_config_proto_bytes"]
        p.deployer_job_id = a["deployer_job_id"]
        if a["route_prefix"]:
            p.route_prefix = a["route_prefix"]
        p.ingress = a["ingress"]
        p.ingress_request_router = a["ingress_request_router"]
        args_list.append(p.SerializeToString())
    app_args = ApplicationArgs()
    external = False
    try:
        external = raycompat.serve_external_scaler_enabled(c, info.name)
    except Exception:  # noqa: BLE001
        pass
    app_args.external_scaler_enabled = external
    raycompat.serve_deploy_applications(c, {info.name: args_list}, {info.name: app_args.SerializeToString()})


def _deployment_settled(app: str, deployment: str, dashboard: str | None = None) -> bool:
    details = get_details(dashboard)
    a = (details.get("applications") or {}).get(app) or {}
    d = (a.get("deployments") or {}).get(deployment) or {}
    status = str(getattr(d.get("status"), "value", d.get("status")))
    states = {str(getattr(r.get("state"), "value", r.get("state"))) for r in d.get("replicas") or []}
    return status == "HEALTHY" and states <= {"RUNNING"}


def replica_states(app: str, deployment: str = SERVER_DEPLOYMENT,
                   dashboard: str | None = None) -> dict[str, dict | None]:
    """{replica_id: what it serves} for every RUNNING replica of the deployment, from the
    state each replica publishes in Ray's KV store (None: not published yet). Needs this
    process in the Ray cluster; {} through the dashboard's REST API (not readable there)."""
    import ray

    if not ray.is_initialized():
        return {}
    from raygpt.serving.replicas import published_states

    return published_states(get_details(dashboard), app, deployment)


def _apply(info: AppInfo, user_config: dict, dashboard: str | None) -> None:
    if info.source == "declarative":
        _update_declarative(info, user_config, dashboard)
    elif dashboard:
        raise UserError(f"Serve app {info.name!r} was deployed with serve.run (imperative): the REST "
                        f"API (--dashboard) can only update apps deployed from a config; run "
                        f"promote with --address (joining the cluster) instead")
    else:
        _update_imperative(info, user_config)


def set_model_dir(app: str, model_dir: str, *, expect_version: str | None = None,
                  url: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                  dashboard: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Point the app's user_config at `model_dir` (and its version) and wait until every
    replica serves it.

    user_config carries the weights' version: a re-export into the same path is a new
    user_config (replicas reload it), and a replica refuses a directory holding another
    version than the one asked for. Returns the new model card. Raises SwapError when the
    replicas refused the directory or nothing changed within `timeout` seconds; the
    user_config is then put back on the last good model, so a replica started later
    (autoscaling, a lost node) loads what its peers serve."""
    log = log or (lambda _m: None)
    info = app_info(app, dashboard)
    url = url or info.url
    if expect_version is None:
        try:
            from raygpt.model.io import read_model_config

            expect_version = read_model_config(model_dir).get("version")
        except Exception:  # noqa: BLE001 - the dir may be on the replicas' nodes only
            pass
    good = dict(info.user_config or {})
    if url:  # the last good model is what the replicas serve, not what the config says
        try:
            card = model_card(url, api_key)
            if card.get("model_dir"):
                good = {**good, "model_dir": card["model_dir"], "version": card.get("version")}
        except Exception:  # noqa: BLE001
            pass
    new_uc = {**(info.user_config or {}), "model_dir": str(model_dir)}
    new_uc.pop("version", None)
    if expect_version:
        new_uc["version"] = expect_version
    _apply(info, new_uc, dashboard)
    log(f"Serve app {app!r}: user_config.model_dir -> {model_dir} ({info.source} update)")
    try:
        return _wait_swapped(app, info, str(model_dir), expect_version, url, api_key, timeout,
                             dashboard)
    except SwapError:
        if good.get("model_dir") and good != new_uc:
            log(f"Serve app {app!r}: user_config back to the last good model {good['model_dir']}")
            good = {k: v for k, v in good.items() if v is not None}
            _apply(app_info(app, dashboard), good, dashboard)
            t1 = time.time()  # Serve applies a config asynchronously: wait until it shows
            while (app_info(app, dashboard).user_config or {}) != good and time.time() - t1 < 60:
                time.sleep(0.2)
        raise


def _wait_swapped(app, info, want, expect_version, url, api_key, timeout, dashboard) -> dict:
    t0 = time.time()
    last_card = None
    while time.time() - t0 < timeout:
        if url:
            try:
                card = model_card(url, api_key)
            except Exception:  # noqa: BLE001 - a proxy hiccup: keep polling
                card = None
            if card is not None:
                last_card = card
                err = card.get("last_update_error") or {}
                if err.get("model_dir") == want and (err.get("time") or 0) >= int(t0) - 1:
                    raise SwapError(f"Serve app {app!r} refused {want}: {err.get('error')} "
                                    f"(still serving {card.get('model_dir')})")
                ok = card.get("model_dir") == want and (
                    expect_version is None or card.get("version") == expect_version)
                if ok and _deployment_settled(app, info.deployment, dashboard):
                    if _every_replica(app, info.deployment, want, expect_version, dashboard):
                        return model_card(url, api_key)
        else:
            i2 = app_info(app, dashboard)
            if (i2.user_config or {}).get("model_dir") == want and _deployment_settled(
                    app, info.deployment, dashboard) and _every_replica(
                    app, info.deployment, want, expect_version, dashboard):
                return {"model_dir": want, "version": expect_version}
        time.sleep(0.5)
    raise SwapError(f"Serve app {app!r} did not switch to {want} within {timeout:.0f}s"
                    + (f" (serving {last_card.get('model_dir')})" if last_card else ""))


def _every_replica(app, deployment, want, expect_version, dashboard) -> bool:
    """Every running replica reports the new model (True when states are not readable
    from here: the HTTP card is then all we have)."""
    states = replica_states(app, deployment, dashboard)
    for st in states.values():
        if st is None:
            return False
        if st.get("model_dir") != want or (expect_version and st.get("version") != expect_version):
            return False
    return True


def resolve_model_dir(path: str) -> str:
    """Absolute path (replicas do not run in this working directory)."""
    return str(Path(path).expanduser().resolve())
