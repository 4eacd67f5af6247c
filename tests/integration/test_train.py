"""`ran train` on a real local Ray with MLflow on sqlite: it learns, it is tracked, it registers.

Tiny settings throughout: CIFAR-stem Attention-56 on 16x16 synthetic images of 4 classes, batch 16
per worker, 2 workers, 2-3 epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import logged
import pytest
import torch

pytestmark = pytest.mark.integration

CHANCE = 0.25  # 4 classes


@pytest.fixture(scope="module")
def trained(ray_local: str, synth_data: str, tiny_job, tmp_path_factory: pytest.TempPathFactory):
    """One 2-worker run of 3 epochs that logs and registers its model (shared by the tests below)."""
    from ran.train.launch import run_training

    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)
        cfg = tiny_job(synth_data, root / "runs", **{
            "train.epochs": 3, "tracking.registered_model": "tiny-ran", "tracking.log_model": True,
            "tracking.experiment": "integration"})
        outcome = run_training(cfg)
        yield outcome


def _client(outcome):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=outcome.tracking_uri)


def test_two_workers_learn_far_above_chance(trained):
    assert trained.metrics["epoch"] == 3
    assert trained.metrics["eval/top1"] > CHANCE + 0.35, trained.metrics
    assert trained.metrics["eval/top5"] == 1.0  # 4 classes: top-5 covers all
    assert trained.metrics["train/skipped"] == 0


def test_mlflow_run_has_params_epoch_metrics_and_artifacts(trained):
    client = _client(trained)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "attention56"
    assert params["data.batch_size"] == "16"
    assert params["model.num_classes"] == "4"  # resolved from the manifest
    assert run.data.tags["ran.plan.global_batch"] == "32"  # the plan may change: a tag
    assert run.data.tags["ran.model"] == "attention56"
    assert run.data.tags["ray.job_id"]
    per_epoch = int(run.data.tags["ran.plan.steps_per_epoch"])
    for key in ("train/loss", "eval/top1", "eval/top5", "train/lr", "perf/img_per_s", "perf/data_wait_frac",
                "train/skipped"):
        # One x-axis: epoch metrics at the global step of the epoch's end, beside `epoch`.
        assert [s for s, _ in logged.history(client, trained.run_id, key)] == \
            [e * per_epoch for e in (1, 2, 3)], key
        assert logged.epochs(client, trained.run_id, key) == [1, 2, 3], key
    step_loss = [m.step for m in client.get_metric_history(trained.run_id, "train/step_loss")]
    assert step_loss and len(step_loss) == len(set(step_loss))
    artifacts = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {"training_curves.png", "config.yaml"} <= artifacts
    curves = Path(client.download_artifacts(trained.run_id, "training_curves.png"))
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_and_version_say_what_ran(trained):
    """The runs table tells runs apart by name; the run and the registry page describe them."""
    client = _client(trained)
    run = client.get_run(trained.run_id)
    dataset = json.loads((Path(trained.config.data.path) / "manifest.json").read_text())["dataset"]
    assert run.info.run_name == f"attention56-{dataset}-e3-{trained.run_id[:6]}"
    assert run.data.tags["mlflow.note.content"].startswith(f"attention56 (cifar stem) trained on {dataset}")
    name, version = trained.registered.rsplit("/", 1)
    mv = client.get_model_version(name, version)
    assert f"Registered from run {trained.run_id}" in mv.description
    assert mv.tags["top1"] == f"{trained.metrics['eval/top1']:.4f}"
    from ran.runtime import eval_crop

    assert len(mv.tags["data_digest"]) == 16
    assert mv.tags["eval_crop"] == str(eval_crop(trained.config))


def test_registered_version_loads_and_runs(trained):
    import mlflow.pytorch

    from ran.runtime import ModelBundle

    name, version = trained.registered.split("/")
    assert name == "tiny-ran"
    tags = _client(trained).get_model_version(name, version).tags
    assert float(tags["eval/top1"]) == pytest.approx(trained.metrics["eval/top1"])
    assert tags["run_id"] == trained.run_id

    mlflow.set_tracking_uri(trained.tracking_uri)
    exported = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    x = torch.randn(3, 3, 16, 16)
    logits = exported(x)
    assert logits.shape == (3, 4)

    rebuilt = ModelBundle.load(f"models:/{name}/{version}", device=torch.device("cpu"))
    assert type(rebuilt.model).__name__ == "ResidualAttentionNet"
    assert rebuilt.class_names[0] == "00-disc-solid"
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(x), logits, atol=1e-4)


def test_checkpoint_is_weights_only_and_complete(trained):
    from ran.runtime import load_checkpoint

    state = load_checkpoint(trained.checkpoint)  # torch.load(weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "rng", "run_id", "config"} <= set(state)
    assert state["epoch"] == 3 and state["step"] == state["plan"]["total_steps"]
    assert state["run_id"] == trained.run_id
    assert len(state["rng"]) == 2  # one RNG state per rank


def _validate_on_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: restore a checkpoint, validate, rank 0 writes the metrics to a file."""
    from ran.config import parse_config
    from ran.train.trainer import Trainer

    trainer = Trainer(parse_config(config["job"]))
    trainer.restore(config["checkpoint"])
    metrics = trainer.validate()
    if trainer.rank == 0:
        Path(config["output"]).write_text(json.dumps({**metrics, "world": trainer.world_size}))


def test_distributed_validation_equals_single_process(trained, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ran.train.trainer import Trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = trained.config.model_copy(deep=True)
    cfg.train.precision = "fp32"  # identical arithmetic per sample whatever the batch split
    cfg.data.batch_size = 24  # batches straddle the two ranks' shares differently
    output = tmp_path / "distributed.json"
    TorchTrainer(
        _validate_on_worker,
        train_loop_config={"job": cfg.model_dump(), "checkpoint": trained.checkpoint,
                           "output": str(output)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="validate", storage_path=str(tmp_path / "runs")),
    ).fit()
    distributed = json.loads(output.read_text())

    cfg.data.batch_size = 16
    single = Trainer(cfg)
    single.restore(trained.checkpoint)
    local = single.validate()

    assert distributed["world"] == 2
    assert distributed["eval/samples"] == local["eval/samples"] == 128
    assert round(distributed["eval/top1"] * 128) == round(local["eval/top1"] * 128)
    assert round(distributed["eval/top5"] * 128) == round(local["eval/top5"] * 128)
    assert distributed["eval/loss"] == pytest.approx(local["eval/loss"], rel=1e-4)
