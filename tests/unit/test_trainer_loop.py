"""The training loop on its own (shared/DESIGN.md, torchtitan): the Trainer imports neither Ray nor
MLflow nor ran.tracking, and runs, reports and checkpoints with no Ray at all."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAINER = "ran.train.trainer"
FORBIDDEN = ("ray", "mlflow")


def _path(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, *, nested: bool) -> set[str]:
    """What ``path`` imports: its top-level statements, or (``nested``) every statement, those
    inside functions too. ``from a import b`` counts as ``a`` and ``a.b``."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if nested else iter(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_closure(start: str, find=_path) -> dict[str, set[str]]:
    """``start``'s every import statement, then, transitively, the top-level imports of every ran
    module reached (what loading ``start`` loads): module -> what it imports."""
    seen: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        path = find(module)
        if module in seen or path is None:
            continue
        seen[module] = _imports(path, nested=module == start)
        for name in seen[module]:
            parts = name.split(".")
            # the package of each prefix is loaded too: ran.data.read loads ran.data
            todo.extend(".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "ran")
    return seen


def _offending(closure: dict[str, set[str]]) -> dict[str, list[str]]:
    """Ray or MLflow anywhere in the closure; ran.tracking from the trainer's own layer
    (ran.train: the loop and the step). ``ran.runtime``, one layer down, reaches the registry
    through ran.tracking by design (DESIGN.md's arrows) and imports no MLflow when loaded."""
    bad = {}
    for module, names in closure.items():
        found = sorted(n for n in names if n.split(".")[0] in FORBIDDEN
                       or (module.startswith("ran.train") and n.startswith("ran.tracking")))
        if found:
            bad[module] = found
    return bad


def test_the_trainer_imports_neither_ray_nor_mlflow_nor_tracking():
    closure = import_closure(TRAINER)
    assert {"ran.train.step", "ran.train.schedule", "ran.runtime"} <= set(closure)  # it walked
    assert not _offending(closure), f"the training loop reaches {_offending(closure)}"


def test_the_walk_finds_ray_behind_a_function_and_tracking_two_modules_away(tmp_path):
    files = {
        "ran.train.trainer": "from ran.train import helper\ndef f():\n    import ray.train\n",
        "ran.train.helper": "from ran.train.deeper import x\n",
        "ran.train.deeper": "from ran.tracking import RunLogger\n",
    }
    for module, text in files.items():
        (tmp_path / f"{module}.py").write_text(text)
    closure = import_closure(TRAINER, find=lambda m: (tmp_path / f"{m}.py") if m in files else None)
    assert _offending(closure) == {"ran.train.trainer": ["ray.train"],
                                   "ran.train.deeper": ["ran.tracking", "ran.tracking.RunLogger"]}


def test_importing_the_trainer_loads_neither_ray_nor_mlflow():
    code = ("import sys, ran.train.trainer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Driving the loop directly


class ListLog:
    """A run log (``ran.train.trainer.RunLog``) that keeps everything in lists."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.attempts: list[dict] = []
        self.notices: list[str] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_attempt(self, attempt):
        self.attempts.append(attempt)

    def log_notice(self, message):
        self.notices.append(message)

    def unlogged(self):
        return {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), classes=4, train=40, val=8, size=16, seed=0,
                    samples_per_shard=20, progress=False, workers=1)
    return str(out)


def _trainer(shards: str, run_log=None):
    from ran.config import load_config
    from ran.data.read import read_manifest
    from ran.train.trainer import Trainer

    cfg = load_config(None, {
        "model.name": "attention56", "model.stem": "cifar", "data.path": shards,
        "data.recipe": "cifar", "data.crop": 16, "data.batch_size": 16, "data.workers": 0,
        "optim.reference_batch_size": 16, "schedule.kind": "constant", "train.epochs": 1,
        "train.precision": "fp32", "train.log_every": 1, "storage.path": shards})
    cfg = cfg.resolve(data_path=shards, num_classes=read_manifest(shards)["num_classes"],
                      storage_path=shards)
    return Trainer(cfg, run_log=run_log)


def test_one_epoch_driven_directly_reports_its_samples_and_a_checkpoint_that_loads(shards, tmp_path):
    from ran.tracking.names import EPOCH_METRICS, VALIDATION_METRICS
    from ran.train.trainer import LocalReporter

    log = ListLog()
    trainer = _trainer(shards, run_log=log)
    reporter = LocalReporter(tmp_path)
    final = trainer.fit(reporter)

    # One epoch of 40 samples: steps of 16, 16 and 8; one report, at its end, with a checkpoint.
    assert len(reporter.metrics) == 1 and reporter.metrics[0] == final
    assert (final["epoch"], final["step"], final["train/samples"], final["train/epoch_samples"]) == (
        1, 3, 40, 40)
    assert math.isfinite(final["train/loss"]) and final["train/loss"] > 0
    assert final["eval/samples"] == 8 and 0 <= final["eval/top1"] <= 1
    assert set(final) <= set(EPOCH_METRICS) | set(VALIDATION_METRICS)  # what Tune and MLflow know
    assert [step for step, m in log.metrics if "train/step_loss" in m] == [1, 2, 3]
    assert log.attempts[0]["plan"]["total_steps"] == 3 and "resumed_from" not in log.attempts[0]
    assert log.notices == []

    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["epoch=0001_step=0000003"]
    again = _trainer(shards)
    assert again.step == 0
    again.restore(tmp_path / written[0])
    assert (again.step, again.samples, again.epoch) == (3, 40, 1)
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(again.raw_model.state_dict()[name], tensor), name
