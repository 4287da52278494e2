"""Two Ray nodes that share no working directory: the second node runs in its own mount
namespace (`unshare -m`, root only) with a tmpfs over the driver's working directory and
over the data cache, so a worker there cannot see anything the driver wrote into them.
A 2-worker DDP run (one worker per node) trains from `data.path` given as a storage URI
(file://) of a directory both nodes reach, and ends with the loss of the same run on one
node. Before this issue the driver refused that data.path ("has no meta.json": data.path
had to be a local directory, handed to every worker as the driver's path)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_ports
from raycluster import RAY, Cluster, start_retrying, stop_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare(1) for a private mount namespace"),
]

TRAIN = ["--preset", "debug", "--set", "train.max_steps=6", "--set", "train.eval_every=6",
         "--set", "train.eval_steps=2", "--set", "train.log_every=1", "--set", "model.block_size=32",
         "--set", "train.global_batch=8", "--set", "train.micro_batch=4", "-n", "2",
         "--cpus-per-worker", "1"]


def _second_node(cluster: Cluster, hidden: list[Path], log: Path) -> subprocess.Popen:
    """A worker node joined to `cluster`, in its own mount namespace; on fresh ports again
    when one it picked was taken before it bound it."""
    mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in hidden)
    procs: list[subprocess.Popen] = []

    def launch() -> subprocess.Popen:
        for old in procs:
            stop_cluster(old, str(log.parent))
        ports = [str(p) for p in free_ports(6)]
        ray_cmd = [RAY, "start", "--block", "--address", f"127.0.0.1:{cluster.gcs_port}",
                   "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
                   "--resources", json.dumps({"w": 1}),
                   "--object-store-memory", str(128 << 20), "--node-manager-port", ports[0],
                   "--object-manager-port", ports[1], "--dashboard-agent-listen-port", ports[2],
                   "--dashboard-agent-grpc-port", ports[3], "--runtime-env-agent-port", ports[4],
                   "--metrics-export-port", ports[5], "--disable-usage-stats"]
        script = f"{mounts} && exec {' '.join(repr(a) if ' ' in a or '{' in a else a for a in ray_cmd)}"
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT, env=cluster.base_env,
                                      start_new_session=True))
        return procs[-1]

    return start_retrying(launch, lambda: _alive_nodes(cluster) >= 2, 180, "ray start (node 2)", log)


def _alive_nodes(cluster: Cluster) -> int:
    import httpx

    try:
        r = httpx.get(f"{cluster.dashboard}/nodes?view=summary", headers=cluster.headers, timeout=5)
        return sum(1 for x in r.json()["data"]["summary"] if x["raylet"]["state"] == "ALIVE")
    except Exception:  # noqa: BLE001 - the dashboard is still starting
        return 0


def _train(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> dict:
    p = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", *TRAIN, *args], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    return p


def test_two_nodes_without_a_shared_working_directory(tmp_path):
    from raygpt.data.prepare import prepare_corpus

    shared, driver_wd, cache = tmp_path / "shared", tmp_path / "driver", tmp_path / "cache"
    for d in (shared, driver_wd, cache):
        d.mkdir()
    src = Path(__file__).resolve().parents[2] / "raygpt" / "assets" / "tinyshakespeare.txt"
    (shared / "corpus.txt").write_text(src.read_text()[:200_000])
    prepare_corpus(shared / "corpus.txt", shared / "data", tokenizer="char")
    data_uri = f"file://{shared}/data"

    cluster = Cluster(tmp_path)
    # "w": one unit per node (the two-node run); "solo": the head alone takes both workers
    # of the one-node run, on this same cluster (no second Ray start for the comparison)
    cluster.cmd += ["--resources", json.dumps({"w": 1, "solo": 2})]
    # every raylet (and so every worker) uses this cache; on node 2 it is a private tmpfs
    cluster.base_env["RAYGPT_CACHE_DIR"] = str(cache)
    node2 = None
    # The GCS port picked for the head is taken before `ray start` binds it (CI once lost
    # this test that way): the start must go on, on fresh ports.
    taken = socket.socket()
    taken.bind(("0.0.0.0", cluster.gcs_port))
    taken.listen()
    first_gcs_port = cluster.gcs_port
    try:
        cluster.start()
        taken.close()
        assert cluster.gcs_port != first_gcs_port
        node2 = _second_node(cluster, [driver_wd, cache], tmp_path / "node2.log")
        env = {**cluster.base_env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
        # one worker per node: each node offers one unit of "w"
        _train(["--address", f"127.0.0.1:{cluster.gcs_port}", "--set", f"data.path={data_uri}",
                "--storage", str(shared / "runs"), "--name", "two",
                "--resources-per-worker", json.dumps({"w": 1})], driver_wd, env)
        two = json.loads((shared / "runs" / "two" / "summary.json").read_text())
        # node 2's worker read the shards through ITS cache, a tmpfs the driver never saw
        # (looked at through the mount namespace of node 2's processes)
        inside = Path(f"/proc/{node2.pid}/root") / str(cache).lstrip("/") / "remote"
        fetched = sorted(p.name for p in inside.glob("*/train/*.arrow"))
        assert fetched, f"no shards in node 2's cache {inside}"
        assert not (driver_wd / "runs").exists()  # nothing relied on the driver's cwd
        _train(["--address", f"127.0.0.1:{cluster.gcs_port}", "--set", f"data.path={data_uri}",
                "--storage", str(tmp_path / "runs1"), "--name", "one",
                "--resources-per-worker", json.dumps({"solo": 1})], driver_wd, env)
        one = json.loads((tmp_path / "runs1" / "one" / "summary.json").read_text())
    finally:
        taken.close()
        if node2 is not None:
            stop_cluster(node2, str(tmp_path))
        cluster.stop()
    assert two["world_size"] == one["world_size"] == 2
    assert abs(two["final_val_loss"] - one["final_val_loss"]) < 1e-5, (two, one)
