"""Fault tolerance of `ran train`: a worker dies, the driver dies, checkpoints live on S3.

Every case must end with the planned number of steps and an MLflow run holding each epoch exactly
once (neither duplicated by the replay after a restart nor missing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ran.config import ConfigError

pytestmark = pytest.mark.integration

STEPS_PER_EPOCH = 384 // (16 * 2)  # synth_data train split / global batch


def _history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _assert_each_epoch_once(uri: str, run_id: str, epochs: int) -> None:
    for key in ("train_loss", "val_top1", "lr", "img_per_s"):
        assert _history(uri, run_id, key) == list(range(1, epochs + 1)), key
    step_loss = _history(uri, run_id, "step_loss")
    assert len(step_loss) == len(set(step_loss)), "a step was logged twice"


def test_worker_death_resumes_from_s3_checkpoint_in_the_same_run(
        ray_local, synth_data, tiny_job, mlflow_server, moto_server, tmp_path, monkeypatch):
    """The cluster setup: checkpoints on S3, MLflow behind a tracking server."""
    import boto3
    from mlflow.tracking import MlflowClient

    from ran.train.faults import Fault
    from ran.train.launch import run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="ckpt")
    marker = tmp_path / "died"
    # Killed from the controller right after it registered epoch 1's checkpoint. A worker holds
    # at most one unread report (Ray Train's result queue has size 1) and blocks on the next, so
    # with two epochs to go no later checkpoint can be registered: the restart is from epoch 1.
    cfg = tiny_job(synth_data, "s3://ckpt/runs", **{"train.epochs": 3})
    outcome = run_training(cfg, fault=Fault(after_epoch=1, rank=1, marker=str(marker)))

    assert marker.read_text().startswith("rank 1 (pid ")
    assert marker.read_text().endswith("killed after epoch 1\n")
    assert outcome.metrics["epoch"] == 3 and outcome.metrics["step"] == 3 * STEPS_PER_EPOCH
    assert outcome.checkpoint.startswith("s3://ckpt/runs/tiny-")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]]
    kept = {k.split("/")[-2] for k in keys if k.endswith("/checkpoint.pt")}
    assert f"epoch=0003_step={3 * STEPS_PER_EPOCH:07d}" in kept  # the latest is always kept
    assert 2 <= len(kept) <= 3  # train.keep_checkpoints=2: the best two by val_top1, + the latest

    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ran.resumed_from"] == f"epoch=1 step={STEPS_PER_EPOCH}"
    assert "training_curves.png" in {a.path for a in client.list_artifacts(outcome.run_id)}
    _assert_each_epoch_once(mlflow_server, outcome.run_id, 3)


def _ran(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ran.cli", "train", *args], cwd=cwd, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_driver_killed_then_resume_continues(ray_local, synth_data, tiny_job, mlflow_sqlite,
                                             tmp_path):
    from mlflow.tracking import MlflowClient

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    overrides = ["--set", "train.log_every=2", "--set", "train.epochs=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "MLFLOW_TRACKING_URI": mlflow_sqlite}
    marker = tmp_path / "driver-killed"
    # The driver is killed (SIGKILL, as a crash or a closed laptop would) right after epoch 1's
    # checkpoint is registered; ran.train.faults holds the controller until Ray ends it.
    first_log = tmp_path / "first.log"
    first = _ran(str(job), *overrides, cwd=tmp_path, log=first_log,
                 env={**env, "RAN_FAIL_AFTER_EPOCH": "1", "RAN_FAIL_TARGET": "driver",
                      "RAN_FAIL_MARKER": str(marker)})
    assert first.wait(300) == -signal.SIGKILL, first_log.read_text()[-3000:]
    assert marker.read_text() == f"driver (pid {first.pid}) killed after epoch 1\n"

    second_log = tmp_path / "second.log"
    second = _ran(str(job), *overrides, "--resume", env=env, cwd=tmp_path, log=second_log)
    assert second.wait(300) == 0, second_log.read_text()[-3000:]
    out = second_log.read_text()
    resumed = re.search(r"resumed from \S+ at epoch (\d), step (\d+)", out)
    assert resumed, out[-3000:]
    assert (int(resumed.group(1)), int(resumed.group(2))) == (1, STEPS_PER_EPOCH)
    assert "registered model" not in out  # the tiny job registers nothing

    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name("ran")
    runs_found = client.search_runs([experiment.experiment_id])
    assert len(runs_found) == 1, "resume must continue the same MLflow run"
    assert runs_found[0].info.status == "FINISHED"
    _assert_each_epoch_once(mlflow_sqlite, runs_found[0].info.run_id, 4)


def test_fresh_run_never_resumes_an_old_one(synth_data, tiny_job, tmp_path):
    from ran.train.rundir import storage_for

    cfg = tiny_job(synth_data, tmp_path / "runs", **{"storage.name": "fixed"})
    (tmp_path / "runs" / "fixed").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        storage_for(cfg, resume=False)
    assert storage_for(cfg, resume=True).name == "fixed"

    unnamed = tiny_job(synth_data, tmp_path / "runs")
    with pytest.raises(ConfigError, match="nothing to resume"):
        storage_for(unnamed, resume=True)
    fresh = storage_for(unnamed, resume=False)
    assert fresh.name.startswith("tiny-") and not fresh.exists()
