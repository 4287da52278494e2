"""README's first commands, run as written through the console script (issue 20):
`raygpt train --preset debug`, then the "Then:" block's `raygpt export` and
`raygpt generate` (only `<name>` is filled in, with the run name train printed)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _readme_line(startswith: str) -> str:
    for line in (REPO / "README.md").read_text().splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line == startswith or line.startswith(startswith + " "):
            return line
    raise AssertionError(f"README has no line starting with {startswith!r}")


def _raygpt(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("raygpt")
    argv = [str(exe)] if exe.is_file() else [sys.executable, "-m", "raygpt.cli"]
    r = subprocess.run([*argv, *shlex.split(line)[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"`{line}`: {r.stderr[-3000:]}"
    return r


def _assert_lean_start(logs: Path) -> None:
    """The default run's Ray started what training needs and no more (issue 29's
    start-up): no dashboard (opt-in: --dashboard), and none of the two Train helper
    actors raygpt drops (a DatasetManager: no Ray Dataset is passed; the placement-group
    cleaner: an embedded Ray dies with the driver)."""
    actors = set()
    for f in logs.glob("worker-*.out"):
        actors |= set(re.findall(r"^:actor_name:(\w+)", f.read_text(errors="replace"), re.M))
    assert {"TrainController", "RayTrainWorker"} <= actors, actors  # the logs were read
    assert not actors & {"DatasetManager", "PlacementGroupCleaner"}, actors
    # without the dashboard Ray still runs a minimal head (no HTTP server); the full one
    # runs its modules (jobs, state, train...) as processes, each with its own log
    assert not list(logs.glob("dashboard_*Head.log")), "the dashboard was started"


def test_readme_debug_train_export_generate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYGPT_STORAGE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["RAYGPT_CACHE_DIR"] = str(tmp_path / "cache")
    raytmp = Path(tempfile.mkdtemp(prefix="rgr", dir="/tmp"))  # short: socket paths < 108 B
    env["RAY_TMPDIR"] = str(raytmp)  # the embedded Ray's session logs, to look at below
    try:
        train = _readme_line("raygpt train --preset debug")
        assert train.split() == ["raygpt", "train", "--preset", "debug"]
        r = _raygpt(train, tmp_path, env)
        name = re.search(r"raygpt: run '([^']+)'", r.stdout + r.stderr).group(1)
        assert name.startswith("debug-") and (tmp_path / "runs" / name / "summary.json").is_file()
        _assert_lean_start(raytmp / "ray" / "session_latest" / "logs")
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)

    export = _readme_line("raygpt export runs/<name>").replace("<name>", name)
    _raygpt(export, tmp_path, env)
    model = tmp_path / "models" / "shakespeare"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in model.iterdir()}

    generate = _readme_line("raygpt generate models/shakespeare")
    out = _raygpt(generate, tmp_path, env).stdout
    # char tokens: the prompt plus what fits the context (block_size; --max-tokens 200 is
    # more than the debug model's 32), then echo's newline
    block = json.loads((model / "config.json").read_text())["model"]["block_size"]
    assert out.startswith("ROMEO:") and len(out) - 1 == min(block, len("ROMEO:") + 200)
