"""A compile cache kept with the run, so a restarted worker compiles warm.

torch's portable cache artifacts (torch.compiler.save_cache_artifacts /
load_cache_artifacts: the FX graph and AOT autograd cache entries, autotuning results,
and on a GPU the Triton kernels bundled into the FX graph entries) go to
<run_dir>/compile_cache/<key>/rank<r>.bin after the first compiled step (and again when
a later graph, eval's, adds to them); a later start of the same run loads them before
it compiles. The bytes travel with the run directory, so a worker restarted on another
node that sees it (shared storage) finds them, whatever its working directory.

The key names what shapes the graphs (torch version, device kind, plan, model, parallel
settings, dtype, micro batch): a restart with another world size or plan starts cold
under its own key. Each rank keeps its own file (pipeline stages compile different
graphs). A stale or foreign artifact is harmless: torch checks every entry's own key
and compiles what does not match.

On CPU the artifacts hold the generated C++ but not the kernels compiled from it: the
kernel libraries this process built go beside them (rank<r>.kernels.tar) and are put
into the node's inductor cache (TORCHINDUCTOR_CACHE_DIR, under /tmp by default) before
compiling; their names hash the source and compiler command line, so a node with another
CPU instruction set builds its own. Not kept: inductor's precompiled header (about 150
MB), built once per node. Dynamo traces the model at every start.

Measured on CPU, torch 2.13 (bench/compile_cache.py, debug preset): in a fresh inductor
cache directory the FX graph entries loaded from the artifacts still missed (the graphs
were lowered again, ~3 s); the kernel bundle is what cut the first step there, 17.8 s
-> 5.3 s. A restart on the same node finds everything in the node's own cache (2.1 s).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Callable

import torch

from raygpt.files import write_atomic

DIRNAME = "compile_cache"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_parts(cfg, plan, device: torch.device, micro: int, amp, vocab_size: int) -> dict:
    """What the compiled graphs depend on (a Config and a ParallelPlan)."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    par = {k: v for k, v in cfg.parallel.model_dump(mode="json").items() if k != "compile_cache"}
    return {"torch": torch.__version__, "device": kind, "plan": plan.describe(), "parallel": par,
            "model": cfg.model.model_dump(mode="json"), "vocab_size": vocab_size, "micro_batch": micro,
            "amp": str(amp), "freeze": list(cfg.train.freeze)}


def _inductor_dir() -> Path | None:
    """This process's inductor cache directory (TORCHINDUCTOR_CACHE_DIR or its default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir())
    except Exception:
        return None


def _fx_counters() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache in this process so far."""
    try:
        from torch._dynamo.utils import counters

        c = counters["inductor"]
        return int(c["fxgraph_cache_hit"]), int(c["fxgraph_cache_miss"])
    except Exception:  # a torch without these counters: the fields are left out
        return -1, -1


class CompileCache:
    """One rank's view of the run's compile cache. state: "off" (compile or the cache
    off, or no run directory), "cold" (nothing kept for this key yet, or unreadable),
    "warm" (artifacts loaded before compiling)."""

    def __init__(self, run_dir: str | Path | None, parts: dict, rank: int, enabled: bool,
                 log: Callable[[str], None] = print):
        self.key = cache_key(parts)
        self.path = Path(run_dir) / DIRNAME / self.key / f"rank{rank}.bin" if enabled and run_dir else None
        self.parts, self.log = parts, log
        self.state = "off" if self.path is None else "cold"
        self.loaded_bytes = 0
        on_cpu = self.path is not None and parts.get("device") == "cpu"
        self.kernels_path = self.path.with_suffix(".kernels.tar") if on_cpu else None
        self._kernels: set[str] = set()  # kernel files (relative to the inductor cache) the bundle holds
        self.loaded_kernels = 0
        self._t0 = time.time()
        self.load_s = 0.0
        self._fx0 = _fx_counters()
        self._digest: str | None = None  # of the bytes the file holds
        self._seen = -1  # FX graph lookups (hits + misses) at the last save
        self._write_failed = False

    def load(self) -> str:
        """Before the first compiled call. -> state."""
        if self.path is None:
            return self.state
        self._load_kernels()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self.state
        except OSError as e:
            self.log(f"compile cache {self.path} not readable ({e}): compiling cold")
            return self.state
        t0 = time.perf_counter()
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # another torch's format, a truncated file
            info = None
            self.log(f"compile cache {self.path} not loaded ({type(e).__name__}: {e}): compiling cold")
        else:
            if info is None:  # torch warned why (a checksum, another version's format)
                self.log(f"compile cache {self.path} not loaded (torch refused its bytes): compiling cold")
        self.load_s = time.perf_counter() - t0
        if info is None or info.empty():
            return self.state
        self.state, self.loaded_bytes = "warm", len(data)
        self._digest = hashlib.sha256(data).hexdigest()
        self._fx0 = _fx_counters()
        self.log(f"compile cache warm: {len(data) / 1e6:.2f} MB of artifacts "
                 f"({', '.join(f'{len(v)} {k}' for k, v in info.artifacts.items())}) loaded in {self.load_s:.2f}s")
        return self.state

    def save(self) -> int | None:
        """After a step that compiled: write this process's artifacts when they changed.
        A storage error is logged once, never raised. -> bytes written, or None."""
        if self.path is None or self._write_failed:
            return None
        h, m = _fx_counters()
        if h >= 0 and h + m == self._seen:  # nothing compiled or looked up since
            return None
        self._seen = h + m
        self._save_kernels()
        if self.state == "warm" and m >= 0 and m == self._fx0[1]:
            return None  # only hits since the load: the file has them (and maybe graphs not run yet)
        try:
            got = torch.compiler.save_cache_artifacts()
        except Exception as e:
            self.log(f"compile cache: artifacts not serialized ({type(e).__name__}: {e})")
            return None
        if not got:
            return None
        data = got[0]
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data)
            if not (self.path.parent / "key.json").exists():
                write_atomic(self.path.parent / "key.json", json.dumps(self.parts, indent=2, default=str))
        except OSError as e:
            self._write_failed = True
            self.log(f"compile cache {self.path} not written ({e}); the run goes on without it")
            return None
        self._digest = digest
        return len(data)

    def _load_kernels(self) -> None:
        root = _inductor_dir()
        if self.kernels_path is None or root is None or not self.kernels_path.is_file():
            return
        try:
            with tarfile.open(self.kernels_path) as tar:
                for m in tar.getmembers():
                    name = Path(m.name)
                    if not m.isfile() or name.is_absolute() or ".." in name.parts or name.suffix != ".so":
                        continue
                    self._kernels.add(m.name)
                    target = root / name
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(target, tar.extractfile(m).read())  # ranks on one node may race
                    os.chmod(target, 0o755)
                    self.loaded_kernels += 1
        except (OSError, tarfile.TarError) as e:
            self.log(f"compile cache {self.kernels_path} not loaded ({e}): its kernels are compiled again")

    def _save_kernels(self) -> None:
        """The kernel libraries built in this process (and those loaded), bundled."""
        root = _inductor_dir()
        if self.kernels_path is None or root is None or self._write_failed:
            return
        new = set(self._kernels)
        for p in root.glob("*/*.so"):
            try:
                if p.stat().st_mtime >= self._t0 - 1:
                    new.add(str(p.relative_to(root)))
            except OSError:
                continue
        if new == self._kernels:
            return

        def write(tmp: Path) -> None:
            with tarfile.open(tmp, "w") as tar:
                for name in sorted(new):
                    if (root / name).is_file():
                        tar.add(root / name, arcname=name)

        try:
            self.kernels_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.kernels_path, write)
        except OSError as e:
            self._write_failed = True
            self.log(f"compile cache {self.kernels_path} not written ({e}); the run goes on without it")
            return
        self._kernels = new

    def start_fields(self) -> dict:
        """For the run's `start` event."""
        out = {"compile_cache": self.state}
        if self.state == "warm":
            out.update(compile_cache_bytes=self.loaded_bytes, compile_cache_load_s=round(self.load_s, 3))
        if self.loaded_kernels:
            out["compile_cache_kernels"] = self.loaded_kernels
        return out

    def first_step_fields(self) -> dict:
        """For the first step's record: the state and the FX graphs the first step found
        in a cache (this run's artifacts or the node's own) or compiled."""
        out = {"compile_cache": self.state}
        (h0, m0), (h, m) = self._fx0, _fx_counters()
        if h >= 0 and self.state != "off":
            out.update(compile_cache_hits=h - h0, compile_cache_misses=m - m0)
        return out
