"""Ray's private APIs only behind raygpt.raycompat: no other module of the package
imports (or names) a Ray module or attribute with a leading underscore, nor
ray.experimental.internal_kv, so the next Ray breaks one module, not many."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raygpt"
ADAPTER = PACKAGE / "raycompat.py"
_DOTTED = re.compile(r"ray(\.\w+)+")


def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "ray" and (any(p.startswith("_") for p in parts[1:]) or "internal_kv" in parts)


def _attr_chain(node: ast.Attribute) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def private_uses(source: str) -> list[str]:
    """'line: name' for every Ray private module or attribute the source imports, reaches
    as `ray._x...` or names in a string that is just a dotted path (a logger name)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            chain = _attr_chain(node)
            names = [chain] if chain else []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            names = [node.value]
        out += [f"{node.lineno}: {n}" for n in names if _private(n)]
    return sorted(set(out))


def test_only_raycompat_uses_ray_private_apis():
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ADAPTER:
            continue
        uses = private_uses(path.read_text())
        if uses:
            bad[str(path.relative_to(PACKAGE.parent))] = uses
    assert not bad, f"Ray private APIs outside raygpt/raycompat.py (wrap them there): {bad}"


def test_the_check_finds_each_form():
    src = """
import ray._private.state
from ray.experimental import internal_kv
from ray.experimental.internal_kv import _internal_kv_get
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.torch.config import _TorchBackend
from ray.serve.context import _get_global_client
x = ray._raylet.GcsClient
log = logging.getLogger("ray._private.worker")
from ray.train import Checkpoint
from raygpt.raycompat import ElasticScalingPolicy
y = ray.get_runtime_context()
'''A docstring that mentions ray.serve._private is fine.'''
"""
    got = [u.split(": ", 1)[1] for u in private_uses(src)]
    for want in ("ray._private.state", "ray.experimental.internal_kv", "ray.experimental.internal_kv._internal_kv_get",
                 "ray.train.v2._internal.execution.callback", "ray.train.torch.config._TorchBackend",
                 "ray.serve.context._get_global_client", "ray._raylet.GcsClient", "ray._private.worker"):
        assert want in got, (want, got)
    assert not [g for g in got if "Checkpoint" in g or "raycompat" in g or "get_runtime_context" in g
                or "serve._private" in g]


def test_importing_raycompat_does_not_import_ray():
    import subprocess

    code = "import sys, raygpt.raycompat; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
