"""Layers point one way (shared/DESIGN.md): walk every module's imports and fail on a back edge.

cli -> {tune, cluster, bench} -> {train, evaluate, explain, promotion, serving} -> runtime -> tracking
    -> {models, data, config, steptable}
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ran"

# Higher numbers sit above lower ones; a module may import its own level or below.
LEVELS = {
    "ran.cli": 6, "ran.__main__": 6,
    "ran.tune": 5, "ran.cluster": 5, "ran.bench": 5,
    "ran.train": 4, "ran.evaluate": 4, "ran.explain": 4, "ran.promotion": 4, "ran.serving": 4,
    "ran.runtime": 3,
    "ran.tracking": 2,
    "ran.models": 1, "ran.data": 1, "ran.config": 1, "ran.steptable": 1, "ran.table": 1, "ran.progress": 1,
}
PURE = ("ran.models", "ran.data")  # import neither Ray nor MLflow


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m != "ran" and _layer(m) not in LEVELS]
    assert not unplaced, f"add these to LEVELS (and DESIGN.md): {unplaced}"
    assert len(_modules()) > 20  # the walk found the package


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "ran"))
def test_no_module_imports_one_above_it(module):
    path = _modules()[module]
    mine = LEVELS[_layer(module)]
    above = sorted(name for name in _imports(path)
                   if name.startswith("ran.") and _layer(name) in LEVELS
                   and LEVELS[_layer(name)] > mine)
    assert not above, f"{module} (level {mine}) imports from above: {above}"


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith(PURE)))
def test_models_and_data_import_neither_ray_nor_mlflow(module):
    bad = sorted(n for n in _imports(_modules()[module])
                 if n.split(".")[0] in ("ray", "mlflow"))
    assert not bad, f"{module} imports {bad}"


def test_the_walk_sees_a_back_edge(tmp_path):
    """The check itself can fail: a module of ran.tracking importing ran.train is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ran.train.launch import run_training\nimport ray\n")
    imported = _imports(bad)
    assert "ran.train.launch" in imported and "ray" in imported
    assert LEVELS[_layer("ran.train.launch")] > LEVELS["ran.tracking"]


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the ran modules it imports (at the top or inside a function). An import of a
    package's own ``__init__`` by one of its modules is left out: the package's namespace, not a
    module of it (``from ran.data import DataError``)."""
    edges = {}
    for module, path in modules.items():
        found = set()
        for name in _imports(path):
            while name and name not in modules:  # ran.data.read.Batch -> ran.data.read
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
        edges[module] = found
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``edges``: each strongly connected set of two or more modules, sorted
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                circles.append(sorted(members))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle():
    """No two modules import each other, directly or through others, even inside a function
    (the import that breaks a circle at load time still ties the two modules into one)."""
    circles = _circles(_edges(_modules()))
    assert not circles, f"import circles: {circles}; move what both need into one of them"


def test_the_walk_sees_a_circle(tmp_path):
    """The circle check itself can fail: a.py imports b at the top, b imports a in a function."""
    (tmp_path / "a.py").write_text("from ran.x import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from ran.x import a\n")
    modules = {"ran.x.a": tmp_path / "a.py", "ran.x.b": tmp_path / "b.py"}
    assert _circles(_edges(modules)) == [["ran.x.a", "ran.x.b"]]
