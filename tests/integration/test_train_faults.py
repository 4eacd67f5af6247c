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
import time
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

    from ran.train.launch import run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="ckpt")
    marker = tmp_path / "died"
    # Inside epoch 3. (`ray.train.report` returns once the result is queued, before the controller
    # has registered its checkpoint; failing a whole epoch later leaves it time to.)
    fail_at = 2 * STEPS_PER_EPOCH + 3
    cfg = tiny_job(synth_data, "s3://ckpt/runs", **{"train.epochs": 3})
    outcome = run_training(cfg, fault={"step": fail_at, "rank": 1, "marker": str(marker)})

    assert marker.read_text().startswith(f"rank 1 exited at step {fail_at}")
    assert outcome.metrics["epoch"] == 3 and outcome.metrics["step"] == 3 * STEPS_PER_EPOCH
    assert outcome.checkpoint.startswith("s3://ckpt/runs/tiny-")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]]
    kept = {k.split("/")[-2] for k in keys if k.endswith("/checkpoint.pt")}
    assert f"epoch=0003_step={3 * STEPS_PER_EPOCH:07d}" in kept  # the latest is always kept
    assert 2 <= len(kept) <= 3  # train.keep_checkpoints=2: the best two by val_top1, + the latest

    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ran.resumed_from"] in (f"epoch=2 step={2 * STEPS_PER_EPOCH}",
                                                  f"epoch=1 step={STEPS_PER_EPOCH}")
    assert "training_curves.png" in {a.path for a in client.list_artifacts(outcome.run_id)}
    _assert_each_epoch_once(mlflow_server, outcome.run_id, 3)


def _ran(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ran.cli", "train", *args], cwd=cwd, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"ran train exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_driver_killed_then_resume_continues(ray_local, synth_data, tiny_job, mlflow_sqlite,
                                             tmp_path):
    from mlflow.tracking import MlflowClient

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    overrides = ["--set", "train.log_every=2", "--set", "train.epochs=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "MLFLOW_TRACKING_URI": mlflow_sqlite}
    first_log = tmp_path / "first.log"
    first = _ran(str(job), *overrides, env=env, cwd=tmp_path, log=first_log)
    runs = tmp_path / "runs"

    def first_checkpoint_committed() -> bool:
        snapshots = list(runs.glob("tiny-*/checkpoint_manager_snapshot.json"))
        return bool(snapshots) and "epoch=0001" in snapshots[0].read_text()

    try:
        _wait_for(first_checkpoint_committed, 240, first, first_log)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the driver, as a crash or a closed laptop would
        first.wait(10)
    assert not list(runs.glob("tiny-*/epoch=0004*")), "killed too late to test anything"

    second_log = tmp_path / "second.log"
    second = _ran(str(job), *overrides, "--resume", env=env, cwd=tmp_path, log=second_log)
    assert second.wait(300) == 0, second_log.read_text()[-3000:]
    out = second_log.read_text()
    resumed = re.search(r"resumed from \S+ at epoch (\d), step (\d+)", out)
    assert resumed, out[-3000:]
    epoch = int(resumed.group(1))
    assert 1 <= epoch <= 3 and int(resumed.group(2)) == epoch * STEPS_PER_EPOCH
    assert "registered model" not in out  # the tiny job registers nothing

    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name("ran")
    runs_found = client.search_runs([experiment.experiment_id])
    assert len(runs_found) == 1, "resume must continue the same MLflow run"
    assert runs_found[0].info.status == "FINISHED"
    _assert_each_epoch_once(mlflow_sqlite, runs_found[0].info.run_id, 4)


def test_fresh_run_never_resumes_an_old_one(synth_data, tiny_job, tmp_path):
    from ran.train.launch import storage_for

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
