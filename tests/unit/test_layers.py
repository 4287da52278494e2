"""Imports run one way. The layer order is written here, once; every import in the
package (function-level ones too) must go to the same or a lower layer, and no set of
modules may import each other in a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

# Lowest first. `*.commands` modules and raygpt.cli are the CLI layer, whatever their package.
LAYERS = [("errors", "raycompat", "files"), ("config", "presets"), ("model", "data"), ("parallel",), ("train",),
          ("tune", "serving", "lifecycle", "client"), ("cli",)]
PACKAGE = Path(__file__).resolve().parents[2] / "raygpt"


def layer(mod: str) -> int | None:
    parts = mod.split(".")
    if mod.endswith(".commands") or mod == "raygpt.cli":
        return len(LAYERS) - 1
    top = parts[1] if len(parts) > 1 else ""
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    pkg = root.name

    def name(p: Path) -> str:
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                # `from pkg.a import b`: b may be a module
                out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[mod] = {o for o in out if o.split(".")[0] == pkg and o in files and o != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = n
        n += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = n
                    n += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, outs in graph.items():
        for o in outs:
            lm, lo = layer(mod), layer(o)
            if lm is not None and lo is not None and lo > lm:
                bad.append(f"{mod} (layer {lm}) imports {o} (layer {lo})")
    return sorted(bad)


def test_every_module_has_a_layer():
    assert not [m for m in import_graph(PACKAGE) if m != "raygpt" and layer(m) is None]


def test_imports_run_one_way_without_cycles():
    graph = import_graph(PACKAGE)
    assert not upward(graph), "\n".join(upward(graph))
    assert not cycles(graph), cycles(graph)


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "raygpt"
    (pkg / "data").mkdir(parents=True)
    (pkg / "train").mkdir()
    for d in (pkg, pkg / "data", pkg / "train"):
        (d / "__init__.py").write_text("")
    (pkg / "data" / "loader.py").write_text("def f():\n    from raygpt.data.prepare import g\n")
    (pkg / "data" / "prepare.py").write_text("from raygpt.data import loader\n")
    (pkg / "config.py").write_text("def h():\n    from raygpt.train import launch\n")
    (pkg / "train" / "launch.py").write_text("from ..config import h\n")
    graph = import_graph(pkg)
    assert sorted(cycles(graph)) == [["raygpt.config", "raygpt.train.launch"],
                                     ["raygpt.data.loader", "raygpt.data.prepare"]]
    assert upward(graph) == ["raygpt.config (layer 1) imports raygpt.train.launch (layer 4)"]
