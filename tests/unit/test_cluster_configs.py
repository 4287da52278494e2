"""Cluster configs are checked with Ray's own validation and against the repository.

- every cluster-launcher YAML in cluster/ goes through `prepare_config` (defaults merged,
  Docker config checked, local-provider rules applied) and `validate_config` (Ray's
  ray-schema.json plus its cross-field checks): what `ray up` does before it calls a cloud;
- every KubeRay cluster spec (RayCluster, RayJob.rayClusterSpec, RayService.rayClusterConfig)
  goes through the KubeRay autoscaler's own translation into an autoscaling config
  (`_derive_autoscaling_config_from_ray_cr`, which also validates it);
- the Ray version in every file (pip pins, image tags, rayVersion, Dockerfile FROM) equals
  pyproject.toml's pin and the Ray installed here (the laptop's Ray must match the cluster's);
- the job configs' ScalingConfig fits the GPU node types (workers x GPUs and CPUs per worker
  within max nodes x node resources);
- entrypoints named in RayJob (and the comments/docs) exist, and parse with the real CLI;
- the Serve config's import_path imports, and RayService embeds the same application;
- `ray job submit --working-dir .` would upload a small package that still holds every
  source file the job needs (computed with Ray's own packaging code and ignore rules).

No cloud credentials and no network: nothing here talks to AWS, GCP or Kubernetes.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import re
import shlex
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve").glob("*.yaml"))
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCS = REPO / "docs" / "clusters.md"
# Where the Dockerfile puts the checkout inside the image (RayJob's working_dir).
IMAGE_REPO_DIR = "/home/ray/raygpt"
MAX_UPLOAD_BYTES = 5 * 1024 * 1024

RAY_KINDS = {"RayCluster", "RayJob", "RayService", "RayCronJob"}


# ---------------------------------------------------------------- helpers


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_pin() -> str:
    """The version specifier of `ray[...]` in pyproject.toml, e.g. '==2.60.*'."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        m = re.fullmatch(r"\s*ray(\[[^\]]*\])?\s*(==\s*[\w.*]+)\s*", d)
        if m:
            return m.group(2).replace(" ", "")
    raise AssertionError(f"pyproject.toml pins no ray version: {deps}")


def version_ok(version: str, pin: str | None = None) -> bool:
    """`version` is an exact release matching the pin AND the Ray installed here."""
    import ray
    from packaging.specifiers import SpecifierSet

    pin = pin or ray_pin()
    return version in SpecifierSet(pin) and version == ray.__version__


# Every way a Ray version is written in cluster files.
_VERSION_PATTERNS = [
    re.compile(r"rayproject/ray(?:-ml|-llm)?:(\d+\.\d+\.\d+)"),  # image tag
    re.compile(r"/raygpt:(\d+\.\d+\.\d+)"),  # our image: tag = the Ray image tag it is FROM
    re.compile(r"\bray(?:\[[^\]]*\])?==([\w.*]+)"),  # pip pin
    re.compile(r"rayVersion:\s*[\"']?([\w.]+)"),  # KubeRay
]
# `pip install ... ray` / `ray[...]` without an exact pin.
_UNPINNED_PIP = re.compile(r"pip3? install[^\n]*?[\s\"'](ray(?:\[[^\]]*\])?)(?!\[|==)[\s\"']")


def ray_versions_in(text: str) -> list[str]:
    return [m.group(1) for p in _VERSION_PATTERNS for m in p.finditer(text)]


def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_load(path)))
    validate_config(cfg)
    return cfg


def _worker_types(cfg: dict) -> dict[str, dict]:
    head = cfg["head_node_type"]
    return {k: v for k, v in cfg["available_node_types"].items() if k != head}


def kuberay_cluster_specs() -> list[tuple[str, dict, dict]]:
    """(label, RayCluster-like CR, the manifest it came from) for every Ray cluster spec."""
    out = []
    for path in KUBERAY_YAMLS:
        for doc in _docs(path):
            kind = doc.get("kind")
            spec = doc.get("spec", {})
            if kind == "RayCluster":
                cspec = spec
            elif kind == "RayJob":
                cspec = spec.get("rayClusterSpec")
            elif kind == "RayService":
                cspec = spec.get("rayClusterConfig")
            elif kind == "RayCronJob":
                cspec = spec.get("jobTemplate", {}).get("rayClusterSpec")
            else:
                continue
            name = doc.get("metadata", {}).get("name", "?")
            cr = {"metadata": {"name": name, "namespace": "default"}, "spec": cspec}
            out.append((f"{path.name}:{kind}/{name}", cr, doc))
    return out


def kuberay_autoscaling_config(cr: dict) -> dict:
    """What KubeRay's in-tree autoscaler derives from the CR (Ray's code; validates it)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))


def node_shapes_from_launcher(path: Path) -> tuple[dict, list[tuple[dict, int]]]:
    """(head resources, [(worker node resources, max nodes)]) of a launcher YAML."""
    raw = _load(path)
    cfg = _prepared(path)
    if raw["provider"]["type"] == "local":
        # Ray detects an on-prem machine's resources; the file declares them in metadata.
        meta = raw.get("metadata", {}).get("raygpt", {})
        assert "worker_node_resources" in meta, f"{path.name}: metadata.raygpt.worker_node_resources"
        n = len(raw["provider"]["worker_ips"])
        return meta.get("head_node_resources", {}), [(meta["worker_node_resources"], n)]
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    return head, [(t["resources"], t["max_workers"]) for t in _worker_types(cfg).values()]


def node_shapes_from_kuberay(cr: dict) -> tuple[dict, list[tuple[dict, int]]]:
    cfg = kuberay_autoscaling_config(cr)
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    return head, [(t["resources"], t["max_workers"]) for t in _worker_types(cfg).values()]


def worker_capacity(run: dict, head: dict, workers: list[tuple[dict, int]]) -> int:
    """How many Ray Train workers of `run`'s shape the cluster can hold at its largest."""
    need = {"CPU": float(run["cpus_per_worker"])}
    if run.get("use_gpu"):
        need["GPU"] = float(run["gpus_per_worker"])
    need.update(run.get("resources_per_worker") or {})

    def per_node(res: dict) -> int:
        fits = [int(res.get(k, 0) // v) for k, v in need.items() if v > 0]
        return min(fits) if fits else 0

    return per_node(head) + sum(per_node(res) * n for res, n in workers)


def resolve_train_entrypoint(entrypoint: str) -> dict:
    """`python jobs/train.py ARGS` -> the resolved config, through the real CLI."""
    from raygpt.cli import main

    argv = shlex.split(entrypoint)
    assert argv[0] in ("python", "python3"), entrypoint
    script = argv[1]
    assert (REPO / script).is_file(), f"entrypoint script {script} is not in the repository"
    assert script == "jobs/train.py", f"unexpected training entrypoint {script}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.chdir(REPO):
        rc = main(["train", *argv[2:], "--print-config"])
    assert rc == 0, f"`{entrypoint}` does not parse (rc={rc}): {out.getvalue()[-500:]}"
    return yaml.safe_load(out.getvalue())


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _import(import_path: str):
    import importlib

    mod, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(mod), attr)


# ---------------------------------------------------------------- inventory


def test_the_expected_files_exist():
    names = {p.name for p in LAUNCHER_YAMLS}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"} <= names
    kinds = {d["kind"] for p in KUBERAY_YAMLS for d in _docs(p)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds
    assert DOCKERFILE.is_file() and DOCS.is_file() and (REPO / ".rayignore").is_file()


# ---------------------------------------------------------------- Ray's own validation


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_yaml_passes_ray_validation(path):
    cfg = _prepared(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # The cluster really scales: worker types with a range, and the knobs set explicitly.
    raw = _load(path)
    for key in ("max_workers", "idle_timeout_minutes", "upscaling_speed"):
        assert key in raw, f"{path.name}: set {key} explicitly"
    if raw["provider"]["type"] == "local":
        # One node type for the head and the listed workers, all kept in the cluster.
        (t,) = cfg["available_node_types"].values()
        assert t["min_workers"] == t["max_workers"] == len(raw["provider"]["worker_ips"]) > 0
        return
    workers = _worker_types(cfg)
    assert workers, f"{path.name}: no worker node type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{path.name}:{name}"
    assert sum(t["max_workers"] for t in workers.values()) > 0


def test_ray_validation_can_fail():
    """The validation above is not vacuous: a typo'd field or a bad range is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CLUSTER / "aws-gpu.yaml")
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-h100"]["max_worker"] = 3  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-h100"]["min_workers"] = 5  # > global max_workers
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-h100"]["resources"] = {"GPU": 0.5}  # not an integer
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", [p for p in LAUNCHER_YAMLS if _load(p)["provider"]["type"] != "local"],
                         ids=lambda p: p.name)
def test_cloud_launcher_has_gpu_autoscaling_and_spot(path):
    cfg = _prepared(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {k: t for k, t in _worker_types(cfg).items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, f"{path.name}: no GPU worker type (declare its resources)"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 < t["max_workers"], f"{name}: GPU nodes scale from zero"
    provider = cfg["provider"]["type"]

    def is_spot(t):
        nc = t["node_config"]
        if provider == "aws":
            return nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        sched = nc.get("scheduling", {})
        return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True

    assert any(is_spot(t) for t in gpu_types.values()), f"{path.name}: no spot GPU node type"
    assert any(not is_spot(t) for t in gpu_types.values()), f"{path.name}: no on-demand GPU type"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_installs_raygpt_and_shares_storage(path):
    raw = _load(path)
    mounts = raw.get("file_mounts", {})
    repo_mounts = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert repo_mounts, f"{path.name}: the repository is not synced to the nodes"
    remote = repo_mounts[0]
    setup = " ; ".join(raw.get("setup_commands", []))
    assert re.search(rf"pip install[^;]*-e {re.escape(remote)}\b", setup), (
        f"{path.name}: setup_commands must `pip install -e {remote}`"
    )
    assert ".rayignore" in raw.get("rsync_filter", []), f"{path.name}: rsync ignores .rayignore"
    # A shared file system at the same path on every node (and inside the containers).
    init = " ; ".join(raw.get("initialization_commands", []))
    m = re.search(r"mount -t nfs\S*\s+(?:-o \S+\s+)?\S+\s+(\S+)", init)
    assert m, f"{path.name}: no NFS mount in initialization_commands"
    shared = m.group(1)
    if raw.get("docker", {}).get("image"):
        opts = " ".join(raw["docker"].get("run_options", []))
        assert f"{shared}:{shared}" in opts, f"{path.name}: {shared} is not mounted into the container"
    text = path.read_text()
    assert f"--storage {shared}/" in text or "--storage s3://" in text or "--storage gs://" in text
    provider = raw["provider"]["type"]
    workers = {k: t for k, t in raw.get("available_node_types", {}).items() if k != raw.get("head_node_type")}
    if provider == "aws":
        assert "--storage s3://" in text
        for name, t in workers.items():
            assert "IamInstanceProfile" in t["node_config"], f"{name} cannot write to S3"
    elif provider == "gcp":
        assert "--storage gs://" in text
        for name, t in workers.items():
            scopes = [s for a in t["node_config"].get("serviceAccounts", []) for s in a["scopes"]]
            assert any("cloud-platform" in s or "devstorage" in s for s in scopes), name
    else:
        assert f"--storage {shared}/" in text, "the documented --storage is not the NFS mount"


# ---------------------------------------------------------------- Ray version


def test_pyproject_pin_matches_installed_ray():
    import ray

    pin = ray_pin()
    assert version_ok(ray.__version__, pin), f"installed ray {ray.__version__} vs pin {pin}"


def test_version_check_can_fail():
    import ray

    major, minor, _ = ray.__version__.split(".")
    assert not version_ok(f"{major}.{int(minor) + 1}.0")
    assert not version_ok(f"{major}.{minor}.99")
    assert ray_versions_in('pip install "ray[train]==2.9.3"') == ["2.9.3"]
    assert _UNPINNED_PIP.search('pip install -U "ray[default]" x')


@pytest.mark.parametrize(
    "path", LAUNCHER_YAMLS + KUBERAY_YAMLS + [DOCKERFILE],
    ids=_ids(LAUNCHER_YAMLS + KUBERAY_YAMLS + [DOCKERFILE]),
)
def test_ray_version_equals_the_pin(path):
    text = path.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # not comments
    found = ray_versions_in(code)
    if path.name == "storage.yaml":
        assert not found
        return
    assert found, f"{path.name} pins no Ray version"
    bad = sorted({v for v in found if not version_ok(v)})
    assert not bad, f"{path.name}: Ray {bad} but pyproject pins {ray_pin()}"
    assert not _UNPINNED_PIP.search(code), f"{path.name}: an unpinned `pip install ray`"


def test_images_carry_the_pinned_ray():
    """Every container image is the pinned Ray image, or ours built FROM it."""
    from_line = re.search(r"^ARG RAY_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert from_line and "FROM ${RAY_IMAGE}" in DOCKERFILE.read_text()
    base_tag = from_line.group(1).split(":", 1)[1]
    for label, cr, _ in kuberay_cluster_specs():
        spec = cr["spec"]
        assert version_ok(str(spec["rayVersion"])), f"{label}: rayVersion {spec['rayVersion']}"
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for g in groups:
            for c in g["template"]["spec"]["containers"]:
                repo_, _, tag = c["image"].rpartition(":")
                assert repo_.endswith(("rayproject/ray", "/raygpt")), f"{label}: image {c['image']}"
                if repo_.endswith("/raygpt"):
                    assert tag == base_tag, f"{label}: {c['image']} is not tagged like its base {base_tag}"
                assert version_ok(tag.split("-")[0]), f"{label}: image {c['image']}"


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=_ids(KUBERAY_YAMLS))
def test_kuberay_manifest_fields(path):
    for doc in _docs(path):
        kind = doc.get("kind")
        if kind not in RAY_KINDS:
            assert doc["apiVersion"] == "v1" and kind == "PersistentVolumeClaim", kind
            assert "ReadWriteMany" in doc["spec"]["accessModes"]
            continue
        assert doc["apiVersion"] == "ray.io/v1", f"{kind}: apiVersion {doc['apiVersion']}"
        assert doc["metadata"]["name"]
        spec = doc["spec"]
        if kind == "RayJob":
            assert spec["entrypoint"].split()[:2] == ["python", "jobs/train.py"]
            assert spec["shutdownAfterJobFinishes"] is True
            assert "rayClusterSpec" in spec, "the job must create its own cluster"
        if kind == "RayService":
            assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
            assert yaml.safe_load(spec["serveConfigV2"])["applications"]


@pytest.mark.parametrize("label,cr", [(l, c) for l, c, _ in kuberay_cluster_specs()],
                         ids=[l for l, _, _ in kuberay_cluster_specs()])
def test_kuberay_cluster_spec(label, cr):
    spec = cr["spec"]
    assert spec.get("enableInTreeAutoscaling") is True, f"{label}: autoscaler off"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        lo, n, hi = g["minReplicas"], g.get("replicas", g["minReplicas"]), g["maxReplicas"]
        assert 0 <= lo <= n <= hi and hi > 0, f"{label}/{g['groupName']}: min {lo} replicas {n} max {hi}"
        for c in g["template"]["spec"]["containers"]:
            lim = c.get("resources", {}).get("limits", {})
            if int(lim.get("nvidia.com/gpu", 0)) > 0:
                gpu_groups.append(g["groupName"])
                req = c["resources"].get("requests", {})
                assert req.get("nvidia.com/gpu", lim["nvidia.com/gpu"]) == lim["nvidia.com/gpu"]
    assert gpu_groups, f"{label}: no GPU worker group"
    # Ray's KubeRay translation agrees: GPU node types with the declared GPUs.
    cfg = kuberay_autoscaling_config(cr)
    gpus = {k: t["resources"].get("GPU", 0) for k, t in _worker_types(cfg).items()}
    assert all(gpus[g] > 0 for g in gpu_groups), gpus
    # Every pod mounts the same shared storage at the same path.
    mounts = set()
    for g in [head, *spec["workerGroupSpecs"]]:
        vols = {v["name"]: v for v in g["template"]["spec"].get("volumes", [])}
        for c in g["template"]["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                if "persistentVolumeClaim" in vols.get(m["name"], {}):
                    mounts.add((vols[m["name"]]["persistentVolumeClaim"]["claimName"], m["mountPath"]))
    assert len(mounts) == 1, f"{label}: pods mount shared storage differently: {mounts}"


# ---------------------------------------------------------------- jobs fit the clusters


def _job_runs() -> list[tuple[str, dict]]:
    from raygpt.config import load_config

    return [(p.name, load_config(path=p).run.model_dump()) for p in JOB_CONFIGS]


def _training_clusters() -> list[tuple[str, dict, list]]:
    out = []
    for p in LAUNCHER_YAMLS:
        head, workers = node_shapes_from_launcher(p)
        out.append((p.name, head, workers))
    for label, cr, doc in kuberay_cluster_specs():
        if doc["kind"] == "RayCluster":
            head, workers = node_shapes_from_kuberay(cr)
            out.append((label, head, workers))
    return out


def test_job_configs_exist_and_load():
    assert JOB_CONFIGS, "no jobs/configs/*.yaml"
    runs = dict(_job_runs())
    assert any(r["use_gpu"] for r in runs.values()), "no GPU job config"


@pytest.mark.parametrize("cluster", _training_clusters(), ids=lambda c: c[0])
def test_gpu_job_configs_fit_the_cluster(cluster):
    label, head, workers = cluster
    for name, run in _job_runs():
        cap = worker_capacity(run, head, workers)
        assert cap >= run["num_workers"], (
            f"{name}: {run['num_workers']} workers x (CPU {run['cpus_per_worker']}, "
            f"GPU {run['gpus_per_worker'] if run['use_gpu'] else 0}) do not fit {label} "
            f"(at most {cap}: head {head}, workers {workers})"
        )


def test_fit_check_can_fail():
    run = {"num_workers": 17, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 8}
    _, head, workers = next(c for c in _training_clusters() if c[0] == "aws-gpu.yaml")
    assert worker_capacity(run, head, workers) == 32  # 2 types x 2 nodes x 8 GPUs
    run["gpus_per_worker"] = 2
    assert worker_capacity(run, head, workers) < 17
    run.update(gpus_per_worker=1, cpus_per_worker=100)  # 192 CPUs hold one such worker
    assert worker_capacity(run, head, workers) == 4


def test_rayjob_entrypoint_resolves_and_fits():
    jobs = [(l, cr, doc) for l, cr, doc in kuberay_cluster_specs() if doc["kind"] == "RayJob"]
    assert jobs
    for label, cr, doc in jobs:
        spec = doc["spec"]
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        assert env.get("working_dir") in (None, IMAGE_REPO_DIR), "working_dir must be the image's checkout"
        cfg = resolve_train_entrypoint(spec["entrypoint"])
        run = cfg["run"]
        head, workers = node_shapes_from_kuberay(cr)
        assert worker_capacity(run, head, workers) >= run["num_workers"], label
        assert run["address"] == "auto"
        # Checkpoints land on the shared volume every pod mounts.
        mount_paths = {m["mountPath"] for g in [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
                       for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert run["storage"] and any(run["storage"].startswith(p + "/") for p in mount_paths), (
            f"{label}: --storage {run['storage']} is not on a shared mount {mount_paths}"
        )


def test_documented_commands_name_existing_files():
    """jobs/..., serve/... and cluster/... paths in the guide and the YAML comments exist,
    and every documented `python jobs/train.py ...` line parses with the real CLI."""
    texts = {p: p.read_text() for p in [DOCS, *LAUNCHER_YAMLS, *KUBERAY_YAMLS, DOCKERFILE]}
    for p, text in texts.items():
        for ref in set(re.findall(r"\b((?:jobs|serve|cluster)/[\w./-]+\.(?:py|yaml|md))\b", text)):
            assert (REPO / ref).is_file(), f"{p.relative_to(REPO)} names {ref}, which does not exist"
        uncommented = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines())
        joined = re.sub(r"\\\n\s*", " ", uncommented)  # shell line continuations
        for m in re.finditer(r"python jobs/train\.py([^\n`]*)", joined):
            resolve_train_entrypoint("python jobs/train.py" + m.group(1))


# ---------------------------------------------------------------- Serve


def test_serve_configs_import():
    assert SERVE_CONFIGS, "no serve/*.yaml yet"
    for p in SERVE_CONFIGS:
        for app in _load(p)["applications"]:
            if app["import_path"].startswith("ray.serve.llm:") and importlib.util.find_spec("vllm") is None:
                continue  # Serve LLM imports only beside vLLM (GPU nodes): tests/unit/test_vllm_config.py
            builder = _import(app["import_path"])
            assert callable(builder), f"{p.name}: {app['import_path']} is not callable"


def _comparable_app(app: dict) -> dict:
    """An application minus where its model lives (that is per cluster)."""
    app = copy.deepcopy(app)
    app.get("args", {}).pop("model_dir", None)
    for dep in app.get("deployments", []):
        (dep.get("user_config") or {}).pop("model_dir", None)
    app.pop("runtime_env", None)
    return app


def _rayservices() -> list[dict]:
    return [d for p in KUBERAY_YAMLS for d in _docs(p) if d.get("kind") == "RayService"]


def test_rayservice_embeds_the_serve_config():
    gpu = REPO / "serve" / "gpu.yaml"
    assert gpu.is_file(), "serve/gpu.yaml does not exist"
    want = {a["name"]: _comparable_app(a) for a in _load(gpu)["applications"]}
    assert _rayservices()
    for doc in _rayservices():
        cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        got = {a["name"]: _comparable_app(a) for a in cfg["applications"]}
        assert got == want, "RayService serveConfigV2 differs from serve/gpu.yaml (beyond model_dir)"
        cluster = doc["spec"]["rayClusterConfig"]
        mounts = {m["mountPath"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        for app in cfg["applications"]:
            _import(app["import_path"])
            dirs = {app["args"].get("model_dir")} | {
                (d.get("user_config") or {}).get("model_dir") for d in app.get("deployments", [])
                if "model_dir" in (d.get("user_config") or {})}
            assert len(dirs) == 1, f"args and user_config name different model dirs: {dirs}"
            (model_dir,) = dirs
            assert any(model_dir.startswith(m + "/") for m in mounts), (
                f"model_dir {model_dir} is not on a volume the pods mount ({mounts})")
            key_env = app["args"].get("api_key_env")
            if key_env:  # the replicas (on GPU workers) must have the key in their env
                for g in cluster["workerGroupSpecs"]:
                    for c in g["template"]["spec"]["containers"]:
                        assert key_env in {e["name"] for e in c.get("env", [])}, (
                            f"{g['groupName']}: no {key_env} for args.api_key_env")


def _serve_clusters() -> list[tuple[str, dict, list]]:
    out = [c for c in _training_clusters() if "RayCluster" not in c[0]]
    for doc in _rayservices():
        cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
              "spec": doc["spec"]["rayClusterConfig"]}
        head, workers = node_shapes_from_kuberay(cr)
        out.append((f"RayService/{doc['metadata']['name']}", head, workers))
    return out


@pytest.mark.parametrize("cluster", _serve_clusters(), ids=lambda c: c[0])
def test_gpu_serve_config_fits_the_cluster(cluster):
    """serve/gpu.yaml at max_replicas fits the GPU nodes (replicas as Ray Train workers)."""
    label, head, workers = cluster
    gpu = REPO / "serve" / "gpu.yaml"
    assert gpu.is_file(), "serve/gpu.yaml does not exist"
    for app in _load(gpu)["applications"]:
        for dep in app.get("deployments", []):
            opts = dep.get("ray_actor_options", {})
            n = (dep.get("autoscaling_config") or {}).get("max_replicas", dep.get("num_replicas", 1))
            shape = {"num_workers": n, "use_gpu": opts.get("num_gpus", 0) > 0,
                     "gpus_per_worker": opts.get("num_gpus", 0), "cpus_per_worker": opts.get("num_cpus", 1)}
            cap = worker_capacity(shape, head, workers)
            assert cap >= n, f"{dep['name']}: {n} replicas x {opts} do not fit {label} (at most {cap})"


# ---------------------------------------------------------------- job upload


def _upload_package(tmp: Path) -> zipfile.ZipFile:
    """The zip `ray job submit --working-dir .` builds, with Ray's own code and rules."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    target = tmp / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=True,
                   excludes=get_runtime_env_default_excludes())
    return zipfile.ZipFile(target)


def test_job_upload_is_small_and_complete():
    with tempfile.TemporaryDirectory() as d:
        zf = _upload_package(Path(d))
        size = Path(d, "pkg.zip").stat().st_size
        names = {n.rstrip("/") for n in zf.namelist()}
    print(f"working-dir upload: {size / 1e6:.2f} MB, {len(names)} entries")
    assert size < MAX_UPLOAD_BYTES, f"the job upload is {size / 1e6:.1f} MB"
    assert not any(n.startswith((".git/", ".venv/", "venv/", ".gpu/", "runs/", "data/")) for n in names)
    assert not any(n.endswith((".arrow", ".distcp", ".pt", ".safetensors")) for n in names)
    # The job imports raygpt from the uploaded copy (it is first on PYTHONPATH): every
    # source file of the package, the entrypoints and the configs must be in it.
    needed = [p for p in (REPO / "raygpt").rglob("*") if p.is_file() and p.suffix in (".py", ".txt")
              and "__pycache__" not in p.parts]
    needed += [*(REPO / "jobs").rglob("*.py"), *JOB_CONFIGS, *SERVE_CONFIGS]
    missing = sorted(str(p.relative_to(REPO)) for p in needed if str(p.relative_to(REPO)) not in names)
    assert not missing, f"ray job submit would not upload: {missing[:10]} (check .gitignore/.rayignore)"
