"""`train.profile: "START:COUNT"` / `raygpt train --profile START:COUNT`: a torch
profiler trace of COUNT training steps per rank, written into the run directory.

    <run_dir>/profile/rank<R>.pt.trace.json     Chrome trace: open in https://ui.perfetto.dev,
                                                chrome://tracing, or TensorBoard's profiler
                                                plugin (`tensorboard --logdir <run_dir>/profile`)
    <run_dir>/profile/rank<R>.memory.pickle     CUDA only: allocator history of the same
                                                steps, for https://pytorch.org/memory_viz

The training loop calls `step(k)` before it runs step k (0-based, as the loop counts)
and `close()` when it stops; nothing else. Files are written to a temporary name first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from raygpt.config import parse_profile_spec
from raygpt.files import write_atomic


class StepProfiler:
    """Profiles steps start..start+count-1 of this rank; a no-op when spec is None."""

    def __init__(self, run_dir: str | os.PathLike | None, rank: int, spec: str | None,
                 device: torch.device | str = "cpu"):
        self.rank = rank
        self.device = torch.device(device)
        self.window = parse_profile_spec(spec) if spec else None
        self.out_dir = Path(run_dir) / "profile" if run_dir is not None else None
        self._prof = None
        self._range = None
        self._memory = False
        self.done = self.window is None or self.out_dir is None
        self.files: list[Path] = []

    @property
    def active(self) -> bool:
        return self._prof is not None

    def step(self, step: int) -> None:
        """Call before running step `step`."""
        if self.done:
            return
        start, count = self.window
        if self._prof is None and start <= step < start + count:
            self._start()
        elif self._prof is not None and step >= start + count:
            self.close()
            return
        if self._prof is not None:
            self._mark(step)

    def _mark(self, step: int | None) -> None:
        """A ProfilerStep#<step> range around each step (what the trace viewers group by)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if step is not None:
            self._range = torch.profiler.record_function(f"ProfilerStep#{step}")
            self._range.__enter__()

    def close(self) -> None:
        """Stop and write the files (also when training ended inside the window)."""
        if self._prof is None:
            return
        self._mark(None)
        prof, self._prof = self._prof, None
        prof.stop()
        self.done = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.pt.trace.json"
        write_atomic(trace, lambda tmp: prof.export_chrome_trace(str(tmp)))
        self.files.append(trace)
        if self._memory:
            snap = self.out_dir / f"rank{self.rank}.memory.pickle"
            write_atomic(snap, lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.files.append(snap)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._memory = True
        self._prof = profile(activities=activities, record_shapes=True, with_stack=False)
        self._prof.start()
