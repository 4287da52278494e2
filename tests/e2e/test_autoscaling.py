"""Autoscaling for real, on one machine: Ray's own autoscaler with its fake multi-node
provider (`ray start --head --autoscaling-config=...`, RAY_FAKE_CLUSTER=1) launches real
raylets as nodes of a declared type when there is demand and removes them when idle.

The head has CPUs only. The worker node type `gpu_worker` stands in for a GPU node type
(a custom resource `fake_gpu`), with `min_workers: 0`, `max_workers: 2`, like the GPU
types in cluster/aws-gpu.yaml. Tests:

1. `ray job submit` of jobs/train.py with 2 workers that need `fake_gpu`: succeeds; the
   node count goes 0 -> 2 during the job and back to 0 after the idle timeout; the losses
   equal a run on fixed nodes (the shared local Ray).
2. A request that can never fit (4 such workers, max_workers 2) fails at once with one
   line naming the node type and its limit.
3. Elastic 1:2: with the node type capped at 1 the run starts on the one node that
   comes up; the cap is then raised in the autoscaling config (the autoscaler re-reads
   it) and the run grows to 2 workers with the same global batch and loss curve.
4. A Serve app whose replicas need the node type: load raises replicas and nodes,
   idleness lowers them, and every request answers while it scales.
5. A quality sweep whose trials need the node type runs them on autoscaled nodes.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import tiny_model_dir, wait_for
from raycluster import BIN, RAY, TERMINAL, Cluster, job_status, run, started, wait_status

from raygpt.config import load_config
from raygpt.train.launch import run_training
from raygpt.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RAYGPT = str(BIN / "raygpt")
RESOURCE = "fake_gpu"
IDLE_TIMEOUT_MIN = 0.2  # 12 s
TRAIN_ARGS = ["--preset", "debug", "--num-workers", "2", "--cpus-per-worker", "1",
              "--resources-per-worker", json.dumps({RESOURCE: 1}),
              "--set", "parallel.strategy=ddp", "--set", "train.max_steps=20", "--set", "train.log_every=1",
              "--set", "train.eval_every=20", "--set", "checkpoint.every=20"]


def autoscaler_config(gcs_address: str, max_gpu_nodes: int) -> dict:
    return {
        "cluster_name": "raygpt-fake",
        "max_workers": 2,
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, RESOURCE: 1}, "node_config": {},
                           "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "auth": {"ssh_user": "ubuntu"},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class AutoscalingCluster(Cluster):
    def __init__(self, tmp: Path):
        from ray._private.services import node_ip_address_from_perspective

        # The fake provider starts its raylets at this machine's address (not loopback):
        # the head must be there too.
        ip = node_ip_address_from_perspective()
        super().__init__(tmp, num_cpus=2, node_ip=ip,
                         extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.config_path = tmp / "autoscaler.yaml"
        self.set_max_gpu_nodes(2)
        self.cmd.append(f"--autoscaling-config={self.config_path}")

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.gcs_port}"

    def assign_ports(self) -> None:
        super().assign_ports()
        if hasattr(self, "config_path"):  # a retried start: the config names the new GCS port
            self.set_max_gpu_nodes(self.max_gpu_nodes)

    def set_max_gpu_nodes(self, n: int) -> None:
        self.max_gpu_nodes = n
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(autoscaler_config(self.gcs_address, n)))
        tmp.replace(self.config_path)

    def gpu_nodes(self) -> int:
        """Alive nodes that carry the stand-in GPU resource (the dashboard's state API)."""
        r = httpx.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 100, "detail": 1},
                      headers=self.headers, timeout=30)
        r.raise_for_status()
        rows = r.json()["data"]["result"]["result"]
        return sum(1 for n in rows if n["state"] == "ALIVE" and (n.get("resources_total") or {}).get(RESOURCE))

    def wait_gpu_nodes(self, want: int, timeout: float) -> float:
        """Seconds until exactly `want` such nodes are alive."""
        t0 = time.time()
        wait_for(lambda: self.gpu_nodes() == want, timeout,
                 lambda: f"{want} {RESOURCE} nodes (have {self.gpu_nodes()})", interval=1)
        return time.time() - t0


@pytest.fixture(scope="module")
def acluster(tmp_path_factory):
    with started(AutoscalingCluster(tmp_path_factory.mktemp("autoscaling"))) as c:
        yield c


class NodeWatch:
    """Samples the node count in the background while a job runs."""

    def __init__(self, cluster: AutoscalingCluster):
        self.cluster, self.samples, self._stop = cluster, [], threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.cluster.gpu_nodes()))
            except httpx.HTTPError:
                pass
            self._stop.wait(1.0)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join(timeout=30)


def first_step_time(metrics: Path, timeout: float, cluster, job: str) -> float:
    """When the job's first step is logged (fails at once if the job ends first)."""
    def stepped() -> bool:
        if metrics.is_file() and any("loss" in r for r in read_metrics(metrics.parent)):
            return True
        status = job_status(cluster, job)
        if status in TERMINAL:
            logs = run([RAY, "job", "logs", "--address", cluster.dashboard, job], cluster.env, timeout=60).stdout
            raise AssertionError(f"job {job} ended {status} before its first step:\n{logs[-3000:]}")
        return False

    wait_for(stepped, timeout, f"a step logged in {metrics}", interval=1)
    return time.time()


def losses(run_dir: Path) -> dict[int, list[float]]:
    seen: dict[int, list[float]] = {}
    for r in read_metrics(run_dir):
        if "loss" in r:
            seen.setdefault(r["step"], []).append(r["loss"])
    return seen


def test_job_scales_gpu_nodes_up_from_zero_and_back(acluster, ray_session, char_data, tmp_path):
    assert acluster.gpu_nodes() == 0
    storage = tmp_path / "runs"
    job = f"as-{uuid.uuid4().hex[:8]}"
    with NodeWatch(acluster) as watch:
        t_submit = time.time()
        run([RAY, "job", "submit", "--address", acluster.dashboard, "--working-dir", ".",
             "--submission-id", job, "--no-wait", "--", "python", "jobs/train.py", *TRAIN_ARGS,
             "--set", f"data.path={char_data}", "--storage", str(storage), "--name", "as"],
            acluster.env, timeout=120)
        t_first = first_step_time(storage / "as" / "metrics.jsonl", 600, acluster, job)
        status = wait_status(acluster, job, ("SUCCEEDED",), timeout=600)
        t_end = time.time()
    logs = run([RAY, "job", "logs", "--address", acluster.dashboard, job], acluster.env, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "waiting for the autoscaler" in logs, logs[-3000:]
    peak = max(n for _, n in watch.samples)
    assert watch.samples[0][1] == 0 and peak == 2, watch.samples
    down_s = acluster.wait_gpu_nodes(0, timeout=240)
    print(f"FIGURES: submit -> first step {t_first - t_submit:.1f}s with 0 nodes up; job {t_end - t_submit:.1f}s; "
          f"nodes back to 0 {down_s + (time.time() - t_end - down_s):.1f}s after the job ended "
          f"(idle timeout {IDLE_TIMEOUT_MIN * 60:.0f}s)")

    # The same run on fixed nodes (the shared local Ray) has the same losses.
    cfg = load_config("debug", overrides=[
        f"data.path={char_data}", f"run.storage={tmp_path / 'fixed'}", "run.name=fixed", "run.num_workers=2",
        "run.cpus_per_worker=1", "parallel.strategy=ddp", "train.max_steps=20", "train.log_every=1",
        "train.eval_every=20", "checkpoint.every=20"])
    run_training(cfg, progress=False)
    a, b = losses(storage / "as"), losses(tmp_path / "fixed" / "fixed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    worst = max(abs(a[s][0] - b[s][0]) for s in a)
    assert worst < 1e-5, f"autoscaled vs fixed-node losses differ by {worst:.2e}"


def test_request_that_can_never_fit_fails_at_once(acluster):
    args = [a if a != "2" else "4" for a in TRAIN_ARGS]  # --num-workers 4 (global batch 8 splits)
    t0 = time.time()
    p = run([RAYGPT, "train", *args, "--address", acluster.gcs_address, "--storage", "/tmp/raygpt-never"],
            acluster.base_env, timeout=300, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    line = next(x for x in err if x.startswith("error:"))
    assert "gpu_worker" in line and "max_workers 2" in line, line
    assert acluster.gpu_nodes() == 0
    print(f"never-fits refused in {time.time() - t0:.1f}s: {line}")


def test_elastic_run_starts_on_one_node_and_grows_to_two(acluster, char_data, tmp_path):
    acluster.wait_gpu_nodes(0, timeout=240)
    acluster.set_max_gpu_nodes(1)
    storage = tmp_path / "runs"
    job = f"as-el-{uuid.uuid4().hex[:8]}"
    args = [a if a != "2" else "1:2" for a in TRAIN_ARGS]
    args = [a if a != "train.max_steps=20" else "train.max_steps=100000" for a in args]
    args += ["--set", "checkpoint.every=5", "--set", "run.elastic_resize_interval_s=2",
             "--set", f"data.path={char_data}"]
    # `ray job stop` sends SIGTERM and, given the time, the driver stops the run the way
    # Ctrl-C does (a checkpoint, then Ray Train's normal shutdown, which withdraws its
    # autoscaler request: killed outright, the request would hold both nodes ~180 s).
    graceful = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}})
    # The entrypoint installed on the nodes (a cluster image's), not a --working-dir
    # upload (test 1 covers that): the fake provider's nodes share the head's session
    # directory, and once in a fresh CI run this job's driver found the unpacked package
    # without raygpt/train/watchdog.py (ModuleNotFoundError before the first step).
    try:
        run([RAY, "job", "submit", "--address", acluster.dashboard,
             "--runtime-env-json", graceful,
             "--submission-id", job, "--no-wait", "--", RAYGPT, "train", *args,
             "--storage", str(storage), "--name", "el"], acluster.env, timeout=120)
        run_dir = storage / "el"
        first_step_time(run_dir / "metrics.jsonl", 600, acluster, job)
        starts = [r for r in read_metrics(run_dir) if r.get("event") == "start"]
        assert [s["world_size"] for s in starts] == [1], starts
        acluster.set_max_gpu_nodes(2)  # the autoscaler re-reads its config: a second node may come
        t0 = time.time()

        def grown() -> bool:
            assert job_status(acluster, job) == "RUNNING"
            return any(r.get("world_size") == 2 and "loss" in r for r in read_metrics(run_dir))

        wait_for(grown, 600, "the run grown to 2 workers", interval=2)
        print(f"FIGURES: grew to 2 workers {time.time() - t0:.1f}s after the node type's cap was raised")
    finally:
        run([RAY, "job", "stop", "--address", acluster.dashboard, job], acluster.env, timeout=120, check=False)
        acluster.set_max_gpu_nodes(2)
    assert wait_status(acluster, job, ("STOPPED",), timeout=150) == "STOPPED"
    events = [r for r in read_metrics(run_dir) if r.get("event") in ("stop", "start")]
    # The regrouping for the grow stops the old group with SIGTERM ("sigterm"); the job
    # stop ends the run ("interrupt": the driver's SIGTERM), with a checkpoint: not killed.
    stop = [r for r in events if r["event"] == "stop"][-1]
    assert stop["reason"] == "interrupt" and events[-1] is stop, events
    from raygpt.train.checkpoint.discovery import latest_checkpoint
    from raygpt.train.checkpoint.io import read_state

    assert read_state(latest_checkpoint(run_dir))["step"] == stop["step"]
    starts = [r for r in read_metrics(run_dir) if r.get("event") == "start"]
    worlds = [s["world_size"] for s in starts]
    assert worlds[0] == 1 and worlds[-1] == 2, worlds
    assert starts[-1]["accum"] * 2 == starts[0]["accum"]  # the global batch is kept
    seen = losses(run_dir)
    repeated = {s: v for s, v in seen.items() if len(v) > 1}
    assert all(max(v) - min(v) < 1e-4 for v in repeated.values()), repeated


def test_serve_replicas_scale_gpu_nodes_with_load(acluster, tmp_path):
    """Replicas that need the node type: load raises replicas and nodes, idleness lowers
    them; every request answers 200 while it scales."""
    from concurrent.futures import ThreadPoolExecutor

    from raycluster import free_ports

    drained = acluster.wait_gpu_nodes(0, timeout=240)
    t_start = time.time()
    model = tiny_model_dir(tmp_path, "First Citizen:\nBefore we proceed any further, hear me speak.\nROMEO: JULIET?\n")
    (port,) = free_ports(1)
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{
               "name": "as", "route_prefix": "/", "import_path": "raygpt.serving.app:build_app",
               "args": {"model_dir": str(model), "max_slots": 4},
               "deployments": [{
                   "name": "GPTServer", "max_ongoing_requests": 4,
                   "ray_actor_options": {"num_cpus": 1, "resources": {RESOURCE: 1}},
                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                          "upscale_delay_s": 1, "downscale_delay_s": 5,
                                          "metrics_interval_s": 1, "look_back_period_s": 2},
               }]}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run([str(BIN / "serve"), "deploy", str(path), "--address", acluster.dashboard], acluster.env, timeout=120)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def ask(i: int) -> int:
        r = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 48, "temperature": 0}, timeout=300)
        return r.status_code

    def answers() -> bool:
        try:
            return ask(0) == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 600, "the first replica answering (one node comes up for it)", interval=2)
    first = time.time() - t_start
    acluster.wait_gpu_nodes(1, timeout=300)  # idle with min_replicas 1: one node
    codes: list[int] = []
    with NodeWatch(acluster) as watch, ThreadPoolExecutor(8) as pool:
        t1 = time.time()
        while time.time() - t1 < 600 and max((n for _, n in watch.samples), default=0) < 2:
            codes.extend(pool.map(ask, range(16)))  # bounded batches of requests, in waves
        peak_t = time.time() - t1
        codes.extend(pool.map(ask, range(8)))
    assert max(n for _, n in watch.samples) == 2, watch.samples
    assert set(codes) == {200}, sorted(set(codes))
    down = acluster.wait_gpu_nodes(1, timeout=300)  # idle: back to min_replicas, one node
    print(f"FIGURES: earlier nodes gone in {drained:.1f}s; first answer {first:.1f}s after deploy; "
          f"serve scaled to 2 nodes {peak_t:.1f}s into the load; back to 1 node {down:.1f}s after; "
          f"{len(codes)} requests, all 200")
    run([str(BIN / "serve"), "shutdown", "-y", "--address", acluster.dashboard], acluster.env, timeout=120,
        check=False)


def test_quality_sweep_runs_its_trials_on_autoscaled_nodes(acluster, char_data, tmp_path):
    """Trials whose workers need the node type: sized against what the autoscaler may
    add (none of it is up when the sweep starts), and run on the nodes it brings."""
    import csv

    acluster.wait_gpu_nodes(0, timeout=240)
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-3, 2.0e-3]}\n")
    out = tmp_path / "sweep"
    with NodeWatch(acluster) as watch:
        p = run([RAYGPT, "tune", "--config", "jobs/configs/tune-debug.yaml", "--space", str(space),
                 "--num-samples", "1", "--out", str(out), "--address", acluster.gcs_address,
                 "--set", f"data.path={char_data}", "--set", "run.resources_per_worker={fake_gpu: 1}"],
                acluster.base_env, timeout=900, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped early") for r in rows), rows
    assert max(n for _, n in watch.samples) >= 1, watch.samples
    print(f"FIGURES: 2 trials on autoscaled nodes, peak {max(n for _, n in watch.samples)} node(s)")
