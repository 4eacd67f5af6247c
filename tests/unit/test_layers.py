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
