"""The registration gate and the promotion gate compare top-1 values measured on the same data,
by content (the validation split's digest each run logs as its MLflow dataset), against a real
MLflow sqlite registry. No training: each "run" is a real training run record (params, dataset
inputs) with a registered version carrying the recorded ``eval/top1`` tag, as
``ran.tracking.log_final_model`` leaves it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="module")
def moved_data(synth_data: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same shards as ``synth_data``, copied to another directory (a moved checkout)."""
    copy = tmp_path_factory.mktemp("moved") / "synth"
    shutil.copytree(synth_data, copy)
    return str(copy)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Other shards: 3 classes."""
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("other")
    write_synthetic(str(out), classes=3, train=48, val=24, size=16, seed=3, samples_per_shard=48,
                    progress=False)
    return str(out)


def _cfg(tiny_job, data: str, tmp: Path, **overrides: Any):
    return tiny_job(data, tmp / "runs", **overrides)


def _register(cfg, top1: float) -> str:
    """A training run of ``cfg`` (with its dataset inputs) registered under
    ``cfg.tracking.registered_model`` with the recorded ``eval/top1``; returns the version."""
    from mlflow.exceptions import MlflowException

    from ran.data.read import read_manifest
    from ran.tracking import RunTracker

    tracker = RunTracker.create_training(cfg, run_name=f"top1-{top1}", tags={},
                                         manifest=read_manifest(cfg.data.path))
    tracker.finish()
    name = cfg.tracking.registered_model
    try:
        tracker.client.create_registered_model(name)
    except MlflowException:
        pass  # exists
    mv = tracker.client.create_model_version(name, f"runs:/{tracker.run_id}/model", tracker.run_id)
    tracker.client.set_model_version_tag(name, mv.version, "eval/top1", str(top1))
    return str(mv.version)


def _gate(cfg, top1: float):
    from ran.tracking.models import registration_gate

    return registration_gate(cfg, {"eval/top1": top1})


def test_runs_of_different_quality_register_only_improving_versions(registry, synth_data, tiny_job,
                                                                    tmp_path):
    """The demo's gate (``register_if_beats: champion``, nobody promoted yet): each run must beat
    the best version registered on the same data, so a worse run registers nothing and says so."""
    from ran.tracking import model_versions

    cfg = _cfg(tiny_job, synth_data, tmp_path, **{"tracking.registered_model": "demo",
                                                   "tracking.register_if_beats": "champion"})
    said = []
    for top1 in (0.6, 0.5, 0.7, 0.7):
        gate = _gate(cfg, top1)
        said.append(gate.reason)
        if gate.register:
            _register(cfg, top1)
    assert [(str(v.version), v.tags["eval/top1"]) for v in model_versions("demo")] == [
        ("2", "0.7"), ("1", "0.6")]
    assert said == [
        "registered as demo: eval/top1 0.6000; no version of demo was validated on the same data "
        "(demo@champion is unassigned)",
        "not registered: eval/top1 0.5000 does not beat demo/1, the best version on the same data "
        "(demo@champion is unassigned): eval/top1 0.6000 on the same data",
        "registered as demo: eval/top1 0.7000 beats demo/1, the best version on the same data "
        "(demo@champion is unassigned): 0.6000, on the same data",
        "not registered: eval/top1 0.7000 does not beat demo/2, the best version on the same data "
        "(demo@champion is unassigned): eval/top1 0.7000 on the same data"]


def test_a_finetune_worse_than_its_parent_registers_nothing_and_says_so(registry, synth_data,
                                                                       tiny_job, tmp_path):
    """The parent is another registered model; the child's own alias is unassigned and it has no
    versions: only the parent's recorded top-1 on the same data stands in the way."""
    from ran.tracking import model_versions

    parent = _cfg(tiny_job, synth_data, tmp_path, **{"tracking.registered_model": "parent"})
    assert _register(parent, 0.9) == "1"
    child = _cfg(tiny_job, synth_data, tmp_path, **{
        "tracking.registered_model": "child", "tracking.register_if_beats": "champion",
        "model.init_from": "models:/parent/1"})
    worse = _gate(child, 0.85)
    assert (worse.register, worse.reason) == (False, (
        "not registered: eval/top1 0.8500 does not beat the parent parent/1: eval/top1 0.9000 on the "
        "same data"))
    better = _gate(child, 0.95)
    assert (better.register, better.reason) == (True, (
        "registered as child: eval/top1 0.9500 beats the parent parent/1: 0.9000, on the same data"))
    assert model_versions("child") == []  # nothing was registered under the child's name


def test_a_finetune_on_other_data_is_not_held_to_its_parent(registry, synth_data, other_data,
                                                            tiny_job, tmp_path):
    parent = _cfg(tiny_job, synth_data, tmp_path, **{"tracking.registered_model": "parent"})
    _register(parent, 0.9)
    child = _cfg(tiny_job, other_data, tmp_path, **{
        "tracking.registered_model": "child", "tracking.register_if_beats": "champion",
        "model.init_from": "models:/parent/1"})
    assert _gate(child, 0.5).register is True


def test_the_same_shards_at_two_paths_compare_as_the_same_data(registry, synth_data, moved_data,
                                                               other_data, tiny_job, tmp_path):
    """A moved checkout: the champion validated on ``synth_data``, the new run on a copy."""
    from mlflow.tracking import MlflowClient

    here = _cfg(tiny_job, synth_data, tmp_path, **{"tracking.registered_model": "m"})
    _register(here, 0.8)
    MlflowClient(registry).set_registered_model_alias("m", "champion", "1")
    moved = _cfg(tiny_job, moved_data, tmp_path, **{"tracking.registered_model": "m",
                                                     "tracking.register_if_beats": "champion"})
    assert _gate(moved, 0.85).reason == (
        "registered as m: eval/top1 0.8500 beats m@champion (version 1): 0.8000, on the same data")
    assert _gate(moved, 0.8).reason == (
        "not registered: eval/top1 0.8000 does not beat m@champion (version 1): eval/top1 0.8000 on "
        "the same data")
    elsewhere = _cfg(tiny_job, other_data, tmp_path, **{"tracking.registered_model": "m",
                                                        "tracking.register_if_beats": "champion"})
    refused = _gate(elsewhere, 0.99)
    assert refused.register is False
    assert refused.reason.startswith(
        f"not registered: m@champion (version 1) has no eval/top1 recorded on the same data as "
        f"{other_data} [val]")


def test_promotion_compares_recorded_metrics_of_the_same_shards_at_two_paths(
        registry, synth_data, moved_data, other_data, tiny_job, tmp_path):
    from mlflow.tracking import MlflowClient

    from ran.promotion import recorded_standing

    client = MlflowClient(registry)
    _register(_cfg(tiny_job, synth_data, tmp_path, **{"tracking.registered_model": "m"}), 0.8)
    _register(_cfg(tiny_job, moved_data, tmp_path, **{"tracking.registered_model": "m"}), 0.9)
    _register(_cfg(tiny_job, other_data, tmp_path, **{"tracking.registered_model": "m"}), 0.95)
    one, two, three = (recorded_standing(client.get_model_version("m", v)) for v in "123")
    assert one.data.same_data(two.data) and not one.data.same_data(three.data)
    assert one.data.where == f"{synth_data} [val]" and two.data.where == f"{moved_data} [val]"
    assert one.data.digest == two.data.digest and len(one.data.digest) == 16
