"""A real Ray cluster in subprocesses, torn down without `ray stop`.

`ray stop` kills every Ray process of this user on the machine (other test sessions'
too). The head runs with `--block`, so every process of the cluster descends from the
`ray start` process we spawned (the fake autoscaler's nodes too: the monitor starts
them); the teardown terminates exactly that process tree, plus anything still naming
our private --temp-dir, and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


from conftest import free_ports  # noqa: E402 - ports outside the ephemeral range


class Exited(RuntimeError):
    """A `ray start` that exited before it served."""


def start_retrying(launch, ready, timeout: float, what: str, log: Path, tries: int = 3):
    """`launch()` starts a process on freshly picked ports and returns it; `ready()` is
    true once it serves. A process that exits before that (a port taken between picking
    and binding it: "Failed to start GCS") is started again on fresh ports. `log`: its
    output, quoted when it fails."""
    from conftest import wait_for

    for attempt in range(1, tries + 1):
        proc = launch()

        def up() -> bool:
            if proc.poll() is not None:
                raise Exited(f"{what} exited {proc.returncode}")
            return ready()

        try:
            wait_for(up, timeout, lambda: f"{what}:\n{log.read_text(errors='replace')[-3000:]}", interval=1)
            return proc
        except Exited as e:
            if attempt == tries:
                raise RuntimeError(f"{e} on each of {tries} tries:\n{log.read_text(errors='replace')[-3000:]}") from None
            print(f"{e} (try {attempt}/{tries}); again on fresh ports")


# ---------------------------------------------------------------- process-tree teardown


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> set[int]:
    kids = _children_map()
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, []))
    return out


def _naming(marker: str) -> set[int]:
    """Processes of this user whose command line names `marker` (our private temp dir)."""
    out = set()
    uid = os.getuid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{d}").st_uid != uid:
                continue
            if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                out.add(int(d))
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_cluster(proc: subprocess.Popen, marker: str, grace_s: float = 15.0) -> int:
    """Terminate the `ray start --block` process, all its descendants and any process that
    names our temp dir. Returns how many processes were signalled."""
    pids = (_tree(proc.pid) | _naming(marker)) - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if not any(_alive(p) for p in pids):
                break
        # Processes started meanwhile (e.g. a worker respawned during shutdown).
        pids |= {p for p in _naming(marker) if p != os.getpid()}
    return len(pids)


@contextlib.contextmanager
def started(cluster: "Cluster"):
    """Start the cluster; always tear it down after (for module-scoped fixtures)."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Cluster:
    """`ray start --head --block` on private ports and a private temp dir.

    node_ip: the head's address (127.0.0.1 by default). extra_args / extra_env: e.g. an
    --autoscaling-config and RAY_FAKE_CLUSTER=1 for Ray's fake multi-node autoscaler."""

    PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                  "--node-manager-port", "--object-manager-port")

    def __init__(self, tmp: Path, num_cpus: int = 4, node_ip: str = "127.0.0.1",
                 extra_args: tuple = (), extra_env: dict | None = None):
        # Unix socket paths must stay under 108 bytes: a short private temp dir.
        self.temp_dir = tempfile.mkdtemp(prefix="rge2e-", dir="/tmp")
        self.log = tmp / "ray-start.log"
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job = this venv
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray 2.60 turns token auth on when ~/.ray/auth_token exists (shared by everything
        # on this machine). Use it, but with a private token: deterministic and isolated.
        self.token = secrets.token_hex(32)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = self.token
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.update(extra_env or {})
        self.base_env = env
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.cmd = [
            RAY, "start", "--head", "--block", "--node-ip-address", node_ip,
            *(a for flag in self.PORT_FLAGS for a in (flag, "0")),  # set by assign_ports
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(256 * 1024 * 1024),
            "--temp-dir", self.temp_dir, "--disable-usage-stats", *extra_args,
        ]
        self.node_ip = node_ip
        self.proc: subprocess.Popen | None = None
        self.assign_ports()

    def assign_ports(self) -> None:
        """Fresh ports for every server of the head (before each try of `start`)."""
        ports = dict(zip(self.PORT_FLAGS, free_ports(len(self.PORT_FLAGS))))
        for i, arg in enumerate(self.cmd[:-1]):
            if arg in ports:
                self.cmd[i + 1] = str(ports[arg])
        self.gcs_port, self.dash_port = ports["--port"], ports["--dashboard-port"]
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    @property
    def env(self) -> dict:
        """For CLI calls against this cluster: RAY_ADDRESS only in the subprocess env."""
        return {**self.base_env, "RAY_ADDRESS": self.dashboard}

    def _up(self) -> bool:
        """`ray start` finished starting the node (it then blocks) and the dashboard
        answers; the dashboard alone can answer before the raylet is up."""
        if "block forever" not in self.log.read_text(errors="replace"):
            return False
        try:
            return httpx.get(f"{self.dashboard}/api/jobs/", headers=self.headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _launch(self) -> subprocess.Popen:
        if self.proc is not None:  # a failed try: its leftovers go, and its ports with them
            print(self.log.read_text(errors="replace")[-1500:])
            stop_cluster(self.proc, self.temp_dir)
            self.assign_ports()
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env=self.base_env, cwd=REPO, start_new_session=True)
        return self.proc

    def start(self, timeout: float = 240):
        t0 = time.time()
        start_retrying(self._launch, self._up, timeout, "ray start --head", self.log)
        print(f"cluster up in {time.time() - t0:.1f}s (dashboard {self.dashboard})")

    def stop(self):
        if self.proc is not None:
            n = stop_cluster(self.proc, self.temp_dir)
            print(f"cluster stopped ({n} processes)")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def run(cmd: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}  [rc {p.returncode}, {time.time() - t0:.1f}s]")
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> rc {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def job_status(cluster: Cluster, job_id: str) -> str:
    """The job's status from the same REST API the CLI uses (`ray job status`)."""
    r = httpx.get(f"{cluster.dashboard}/api/jobs/{job_id}", headers=cluster.headers, timeout=30)
    r.raise_for_status()
    return r.json()["status"]


def wait_status(cluster, job_id, want: tuple[str, ...], timeout: float) -> str:
    """The job's status once it is one of `want` or terminal; after `timeout` seconds,
    whatever it is then (the caller's assert names it)."""
    from conftest import wait_for

    last = []

    def settled():
        last.append(job_status(cluster, job_id))
        return last[-1] in want or last[-1] in TERMINAL

    try:
        wait_for(settled, timeout, "job status", interval=1)
    except AssertionError:
        pass
    return last[-1]


