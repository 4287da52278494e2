"""Run-directory outputs written by rank 0: metrics.jsonl, TensorBoard, summary.json,
loss-curve PNG. Plus the device peak FLOP/s used for MFU."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from raygpt.files import write_atomic, write_json_atomic, write_text_atomic  # noqa: F401  (also imported from here)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, keyed by the exact name that
# torch.cuda.get_device_name reports. Exact names, not substrings: an H100 PCIe (756) or
# NVL (835) is not an H100 SXM (989), and a name not listed gets no MFU rather than a
# guess (set RAYGPT_PEAK_FLOPS to give one).
GPU_PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM (the same tensor cores as the H100 SXM)
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H800": 989e12,
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,  # fp32 accumulate
}


def gpu_peak_flops(name: str) -> float | None:
    """The table's peak for a device name, or None when the name is not in it."""
    return GPU_PEAK_FLOPS.get(name.strip())


def peak_flops(device: torch.device, threads: int = 1) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the figure comes from).

    RAYGPT_PEAK_FLOPS overrides. A GPU not in GPU_PEAK_FLOPS gives (None, a note): MFU is
    then omitted, never computed against a guessed peak. On CPU an estimate: threads x
    2.5 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units)."""
    env = os.environ.get("RAYGPT_PEAK_FLOPS")
    if env:
        return float(env), "RAYGPT_PEAK_FLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            return None, (f"no MFU: {name!r} is not in raygpt.train.metrics.GPU_PEAK_FLOPS "
                          f"(set RAYGPT_PEAK_FLOPS=<dense bf16 FLOP/s> to give its peak)")
        return peak, f"bf16 dense peak of {name}"
    return max(1, threads) * 2.5e9 * 32, f"CPU estimate for {max(1, threads)} threads"


def device_peak_flops(device: torch.device, threads: int = 1) -> float | None:
    """Peak FLOP/s of the device, or None for a GPU not in the table (see peak_flops)."""
    return peak_flops(device, threads)[0]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, or None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


class RunWriter:
    """Appends to <run_dir>/metrics.jsonl (survives restarts: the step says where).

    Storage that refuses writes (read-only, full, an I/O error) never stops training:
    the lines it refused stay in memory, in order, and go out first at the next write it
    takes (one warning when it starts refusing, one line when it takes them again).
    TensorBoard (a copy of the same figures) is switched off at its first failure."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._fd: int | None = None
        self._unwritten: list[bytes] = []  # refused by the storage, oldest first
        if enabled:
            self._flush()  # opens the file (or keeps trying at each record)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                _quiet_tensorboard_thread()
            except Exception:  # tensorboard is optional at run time (and needs writable storage)
                self._tb = None

    def _flush(self) -> bool:
        """Write the unwritten lines, oldest first. -> whether all of them went out."""
        try:
            if self._fd is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                # O_APPEND, one write per line: never interleaves with the driver's events
                self._fd = os.open(self.run_dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while self._unwritten:
                n = os.write(self._fd, self._unwritten[0])
                if n < len(self._unwritten[0]):  # storage full mid-line: the rest at the next try
                    self._unwritten[0] = self._unwritten[0][n:]
                    continue
                self._unwritten.pop(0)
        except OSError as e:
            if not getattr(self, "_refused", False):
                self._refused = True
                _warn(f"{self.run_dir / 'metrics.jsonl'} refuses writes ({_os_error(e)}): records kept in "
                      "memory until it takes them; training goes on")
            return False
        if getattr(self, "_refused", False):
            self._refused = False
            _warn(f"{self.run_dir / 'metrics.jsonl'} takes writes again: the records kept in memory are written")
        return True

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **rec}
        self._unwritten.append((json.dumps(rec) + "\n").encode())
        self._flush()
        if self._tb is not None:
            try:
                step = rec["step"]
                for k, v in rec.items():
                    if k not in ("step", "time", "event") and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, step)
            except Exception as e:  # its writer thread's storage error comes back here
                self._tb_off(e)

    def _tb_off(self, e: Exception) -> None:
        tb, self._tb = self._tb, None
        _warn(f"tensorboard logging off for this run segment ({_os_error(e)}); metrics.jsonl keeps every record")
        try:
            tb.close()
        except Exception:
            pass

    def event(self, name: str, **fields) -> None:
        self.log({"event": name, **fields})

    def close(self) -> None:
        if not self.enabled:
            return
        if not self._flush():
            _warn(f"{len(self._unwritten)} record(s) could not be written to {self.run_dir / 'metrics.jsonl'}")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as e:
                self._tb_off(e)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread prints a traceback when the storage refuses a write;
    RunWriter says it in one line when the same error reaches the training thread."""
    import threading

    prev = threading.excepthook
    if getattr(prev, "_raygpt", False):
        return

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            prev(args)

    hook._raygpt = True
    threading.excepthook = hook


def _os_error(e: BaseException) -> str:
    if isinstance(e, OSError):
        from raygpt.errors import describe_os_error

        return describe_os_error(e)
    return f"{type(e).__name__}: {e}"


def _warn(msg: str) -> None:
    # stdout like the trainer's own lines (Ray Train patches print); one line each
    import sys

    sys.stdout.write(f"[raygpt] warning: {msg}\n")
    sys.stdout.flush()


_UNWRITTEN_EVENTS: dict[str, list[bytes]] = {}  # append_event lines the storage refused, per file


def append_event(run_dir: str | os.PathLike, name: str, **fields) -> bool:
    """An event from outside rank 0 (the driver's hang watchdog): one line appended with
    O_APPEND, so it never interleaves with rank 0's lines. A line the storage refuses is
    kept in memory and written before the next one (or by flush_events): -> False then."""
    line = json.dumps({"time": round(time.time(), 3), "event": name, **fields}) + "\n"
    _UNWRITTEN_EVENTS.setdefault(str(Path(run_dir) / "metrics.jsonl"), []).append(line.encode())
    return flush_events(run_dir)


def flush_events(run_dir: str | os.PathLike) -> bool:
    """Write the events append_event could not. -> whether none is left."""
    path = str(Path(run_dir) / "metrics.jsonl")
    lines = _UNWRITTEN_EVENTS.get(path)
    if not lines:
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while lines:
                os.write(fd, lines[0])  # a line is small: all of it, or an error
                lines.pop(0)
        finally:
            os.close(fd)
    except OSError as e:
        _warn(f"{path} refuses writes ({_os_error(e)}): {len(lines)} event(s) kept in memory")
        return False
    return True


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a crash
    return out


def plot_loss(run_dir: str | os.PathLike) -> Path | None:
    """loss.png from metrics.jsonl (train loss per log step, val loss per eval)."""
    recs = [r for r in read_metrics(run_dir) if "event" not in r]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val loss", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(run_dir) / "loss.png")


def save_figure(fig, out: Path) -> Path:
    """Write a matplotlib figure under a temp name, then rename: never a half-written PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> int:
    """Copy a run directory's files (not checkpoints: Ray stores those) to a pyarrow
    filesystem URI (s3://, gs://, hdfs://, ...). Returns the number of files."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    local_dir = Path(local_dir)
    n = 0
    for f in sorted(local_dir.rglob("*")):
        rel = f.relative_to(local_dir)
        if not f.is_file() or rel.parts[0].startswith((".", "checkpoint_")):
            continue
        dest = f"{base.rstrip('/')}/{rel.as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(dest) as out:
            out.write(f.read_bytes())
        n += 1
    return n


def read_uri_json(uri: str) -> dict | None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None
