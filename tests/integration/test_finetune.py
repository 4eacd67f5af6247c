"""Fine-tuning from the registry (``model.init_from``) and the registration gate, on a real MLflow
registry (sqlite), a real local Ray and real Ray Tune.

The parent, ``models:/tiny@champion``, is a CIFAR-stem Attention-56 of 4 classes logged and
registered through ``ran.tracking.log_final_model`` without training (seeded initial weights),
recorded with ``eval/top1`` 1.0: a holder that no model can beat, so that the search below must
not register. The child data has 3 classes, so a fine-tuning run re-initialises the classifier.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

PARENT = "tiny"
TRUNK_KEY = "blocks.1.trunk.0.conv1.weight"  # a trunk conv of the first attention module


@pytest.fixture(scope="module")
def store(synth_data: str, tiny_job, tmp_path_factory: pytest.TempPathFactory):
    """The sqlite registry holding ``tiny`` version 1 @champion, and 3-class child shards."""
    from mlflow.tracking import MlflowClient

    from ran.data.read import read_manifest
    from ran.data.synth import write_synthetic
    from ran.data.transforms import normalizer
    from ran.runtime import build_model
    from ran.tracking import RunTracker, log_final_model
    from ran.train.launch import resolve_config

    root = tmp_path_factory.mktemp("finetune")
    uri = f"sqlite:///{root}/mlflow.db"
    write_synthetic(str(root / "three"), classes=3, train=96, val=48, size=16, seed=1,
                    samples_per_shard=48, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        cfg, _ = resolve_config(tiny_job(synth_data, root / "runs", **{
            "name": "parent", "tracking.experiment": "parent", "tracking.registered_model": PARENT}))
        torch.manual_seed(7)
        model = build_model(cfg).eval()
        images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
        example = normalizer("cifar")(images).numpy().astype(np.float32)
        tracker = RunTracker.create_training(cfg, run_name="parent", tags={},
                                             manifest=read_manifest(synth_data))
        assert log_final_model(tracker, model, cfg, read_manifest(synth_data)["classes"], example,
                               {"eval/top1": 1.0, "eval/top5": 1.0, "eval/loss": 0.0}) == f"{PARENT}/1"
        tracker.finish()
        MlflowClient(uri).set_registered_model_alias(PARENT, "champion", "1")
    return {"uri": uri, "root": root, "parent": model.state_dict(), "parent_run": tracker.run_id,
            "three": str(root / "three"), "four": synth_data}


@pytest.fixture
def env(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.chdir(store["root"])
    return store


def _child(store: dict[str, Any], tiny_job, name: str, **overrides: Any):
    return tiny_job(store["three"], store["root"] / "runs", **{
        "name": name, "tracking.experiment": name, "model.init_from": f"models:/{PARENT}@champion",
        "optim.lr": 0.01, "train.epochs": 1, **overrides})


def test_preflight_pins_the_alias_and_the_trainer_starts_from_the_parents_trunk(env, tiny_job):
    from ran.runtime import build_model
    from ran.train.launch import resolve_config
    from ran.train.trainer import Trainer

    cfg, manifest = resolve_config(_child(env, tiny_job, "pinned"))
    assert cfg.model.init_from == f"models:/{PARENT}/1" and cfg.model.num_classes == 3

    trainer = Trainer(cfg)  # step 0: built, loaded, not trained
    state = trainer.raw_model.state_dict()
    assert trainer.step == 0
    parent = env["parent"]
    assert torch.equal(state[TRUNK_KEY], parent[TRUNK_KEY])
    same = [k for k in state if not k.startswith("fc.")]
    assert len(same) == len(parent) - 2 and all(torch.equal(state[k], parent[k]) for k in same)
    torch.manual_seed(cfg.train.seed)  # the classifier alone keeps a fresh initialisation
    fresh = build_model(cfg).state_dict()
    assert state["fc.weight"].shape == (3, parent["fc.weight"].shape[1])
    assert torch.equal(state["fc.weight"], fresh["fc.weight"])


def test_a_mismatched_architecture_lists_the_keys_before_ray_starts(env, tiny_job, capsys,
                                                                    monkeypatch, tmp_path):
    import ray

    from ran.cli import main

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started for a job that pre-flight should refuse")

    monkeypatch.setattr(ray, "init", no_ray)
    job = tmp_path / "bigger.yaml"
    job.write_text(_child(env, tiny_job, "bigger", **{"model.name": "attention92",
                                                       "storage.path": str(tmp_path / "runs")}).to_yaml())
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: model.init_from models:/{PARENT}@champion: its weights do not "
                          "fit attention92 (cifar stem, 3 classes): ")
    assert "608 missing (blocks.2.pre.0.bn_in.weight, " in err and "194 unexpected (" in err
    assert "Start from a model of the same architecture" in err
    assert not (tmp_path / "runs").exists()

    stem = tmp_path / "stem.yaml"
    stem.write_text(_child(env, tiny_job, "stem", **{"model.stem": "imagenet",
                                                      "storage.path": str(tmp_path / "runs")}).to_yaml())
    assert main(["train", str(stem)]) == 2
    assert "of another shape (stem.0.weight (16, 3, 3, 3) vs (64, 3, 7, 7), " in capsys.readouterr().err


def test_a_finetuning_run_below_its_registration_threshold_is_logged_tagged_and_says_why_last(
        env, tiny_job, ray_local, capsys, tmp_path):
    """One real run for two behaviours: it trains from the parent on 3 new classes (tagged with
    the parent), and, below ``tracking.register_min_top1`` (lr 1e-6 keeps it near chance), its
    model is logged but not registered, which its last printed line says."""
    from mlflow.tracking import MlflowClient

    from ran.cli import main
    from ran.runtime import ModelBundle

    job = tmp_path / "child.yaml"
    job.write_text(_child(env, tiny_job, "child", **{
        "optim.lr": 1e-6, "tracking.registered_model": "tiny-three", "tracking.log_model": True,
        "tracking.register_min_top1": 1.0}).to_yaml())
    assert main(["train", str(job)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]

    client = MlflowClient(env["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("child").experiment_id])
    top1 = run.data.metrics["eval/top1"]
    assert top1 < 1.0
    assert last == (f"not registered: eval/top1 {top1:.4f} is below tracking.register_min_top1 "
                    f"1.0000; the model is logged in MLflow run {run.info.run_id}")
    assert client.search_registered_models("name = 'tiny-three'") == []
    assert run.data.tags["ran.registration"] == last
    assert run.data.tags["ran.init_from"] == f"models:/{PARENT}/1"
    assert run.data.tags["ran.init_from_run"] == env["parent_run"]
    assert run.data.params["model.init_from"] == f"models:/{PARENT}/1"
    child = ModelBundle.load(run.info.run_id)  # the logged (unregistered) model of the run
    assert child.config.model.init_from == f"models:/{PARENT}/1"
    assert child.model.fc.out_features == 3 and child.class_names == [
        "00-disc-solid", "01-square-solid", "02-triangle-solid"]


def test_a_search_from_one_parent_registers_its_best_only_if_it_beats_the_holder(env, tiny_job,
                                                                                 ray_local):
    from mlflow.tracking import MlflowClient

    from ran.tune.search import run_search, summary
    from ran.tune.space import parse_space

    job = tiny_job(env["four"], env["root"] / "runs", **{
        "name": "search", "tracking.experiment": "search",
        "model.init_from": f"models:/{PARENT}@champion", "data.batch_size": 8,
        "data.workers": 0, "optim.reference_batch_size": 8, "schedule.kind": "constant",
        "train.epochs": 1, "train.precision": "fp32", "train.channels_last": False,
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 0.9, "scaling.max_failures": 0,
        "tracking.registered_model": PARENT, "tracking.log_model": True,
        "tracking.register_if_beats": "champion"}).model_dump()
    space = parse_space({"space": {"optim.lr": {"grid": [0.01, 0.001]}},
                         "search": {"scheduler": "fifo", "max_concurrent_trials": 2}}, name="lr")
    outcome = run_search(space, job)

    assert [t.status for t in outcome.trials] == ["completed", "completed"]
    assert outcome.registered is None
    best = outcome.best
    expected = (f"not registered: eval/top1 {best.metric:.4f} does not beat {PARENT}@champion "
                f"(version 1): eval/top1 1.0000 on the same data; the model is logged in MLflow run "
                f"{best.run_id}")
    assert summary(outcome, space).splitlines()[-1] == expected
    client = MlflowClient(env["uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{PARENT}'")] == ["1"]
    assert client.get_run(best.run_id).data.tags["ran.registration"] == expected
    logged = client.search_logged_models(experiment_ids=[client.get_run(best.run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{best.run_id}'")
    assert [m.name for m in logged] == ["model"]  # logged, not registered
    trials = [client.get_run(t.run_id) for t in outcome.trials]
    assert [r.data.tags["ran.init_from"] for r in trials] == [f"models:/{PARENT}/1"] * 2


# ---------------------------------------------------------------------------------------------
# The registration gate against the registry (no Ray)


def _gated(store: dict[str, Any], tiny_job, data: str, **tracking: Any):
    from ran.train.launch import resolve_config

    cfg, _ = resolve_config(tiny_job(data, store["root"] / "runs", **{
        "tracking.registered_model": PARENT, **{f"tracking.{k}": v for k, v in tracking.items()}}))
    return cfg


def test_the_gate_compares_with_the_alias_holder_on_the_same_data(env, tiny_job):
    from ran.tracking.models import registration_gate

    beats = _gated(env, tiny_job, env["four"], register_if_beats="champion")
    assert registration_gate(beats, {"eval/top1": 1.0}).register is False  # equal does not beat
    assert registration_gate(beats, {"eval/top1": 0.5}).reason == (
        f"not registered: eval/top1 0.5000 does not beat {PARENT}@champion (version 1): eval/top1 "
        "1.0000 on the same data")
    other_data = _gated(env, tiny_job, env["three"], register_if_beats="champion")
    decision = registration_gate(other_data, {"eval/top1": 0.9})
    assert decision.register is False and decision.reason.startswith(
        f"not registered: {PARENT}@champion (version 1) has no eval/top1 recorded on the same data "
        f"as {env['three']} [val]")
    unassigned = _gated(env, tiny_job, env["four"], register_if_beats="staging")
    assert registration_gate(unassigned, {"eval/top1": 0.1}).reason == (  # the best version instead
        f"not registered: eval/top1 0.1000 does not beat {PARENT}/1, the best version on the same "
        f"data ({PARENT}@staging is unassigned): eval/top1 1.0000 on the same data")


def test_the_gate_holds_a_minimum_top1(env, tiny_job):
    from ran.tracking.models import registration_gate

    cfg = _gated(env, tiny_job, env["four"], register_min_top1=0.9)
    assert registration_gate(cfg, {"eval/top1": 0.8999}).reason == (
        "not registered: eval/top1 0.8999 is below tracking.register_min_top1 0.9000")
    passed = registration_gate(cfg, {"eval/top1": 0.9})
    assert passed.register and passed.reason == (
        f"registered as {PARENT}: eval/top1 0.9000 >= tracking.register_min_top1 0.9000")
