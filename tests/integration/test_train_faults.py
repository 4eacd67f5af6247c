"""Fault tolerance of `ran train`: a worker dies, a worker gets SIGTERM mid-epoch, the driver dies,
checkpoints live on S3.

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

import logged
import pytest
from fault_injection import fault_env

from ran.config import ConfigError

pytestmark = pytest.mark.integration

STEPS_PER_EPOCH = 384 // (16 * 2)  # synth_data train split / global batch


def _history(uri: str, run_id: str, key: str) -> list[int]:
    return [step for step, _ in logged.history(uri, run_id, key)]


def _assert_each_epoch_once(uri: str, run_id: str, epochs: int) -> None:
    """Epochs 1..epochs each logged once, at the global step where it ended."""
    for key in ("train/loss", "eval/top1", "train/lr", "perf/img_per_s"):
        assert logged.epochs(uri, run_id, key) == list(range(1, epochs + 1)), key
        assert _history(uri, run_id, key) == [e * STEPS_PER_EPOCH for e in range(1, epochs + 1)], key
    step_loss = _history(uri, run_id, "train/step_loss")
    assert len(step_loss) == len(set(step_loss)), "a step was logged twice"


def test_worker_death_resumes_from_s3_checkpoint_in_the_same_run(
        ray_local, synth_data, tiny_job, mlflow_server, moto_server, tmp_path, monkeypatch):
    """The cluster setup: checkpoints on S3, MLflow behind a tracking server."""
    import boto3
    from mlflow.tracking import MlflowClient

    from fault_injection import Fault, KillWorker
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
    outcome = run_training(cfg, callbacks=[KillWorker(Fault(after_epoch=1, rank=1, marker=str(marker)))])

    assert marker.read_text().startswith("rank 1 (pid ")
    assert marker.read_text().endswith("killed after epoch 1\n")
    assert outcome.metrics["epoch"] == 3 and outcome.metrics["step"] == 3 * STEPS_PER_EPOCH
    assert outcome.checkpoint.startswith("s3://ckpt/runs/tiny-")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]]
    kept = {k.split("/")[-2] for k in keys if k.endswith("/checkpoint.pt")}
    assert f"epoch=0003_step={3 * STEPS_PER_EPOCH:07d}" in kept  # the latest is always kept
    assert 2 <= len(kept) <= 3  # train.keep_checkpoints=2: the best two by eval/top1, + the latest

    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ran.resumed_from"] == f"epoch=1 step={STEPS_PER_EPOCH}"
    assert "training_curves.png" in {a.path for a in client.list_artifacts(outcome.run_id)}
    _assert_each_epoch_once(mlflow_server, outcome.run_id, 3)


def test_sigterm_mid_epoch_checkpoints_that_step_and_the_run_resumes_from_it(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path):
    """A spot reclaim: SIGTERM from outside, by PID, to rank 1 during epoch 1. The group writes a
    checkpoint at the step it reached, waits until Ray Train registered it, and stops; the
    restarted group continues from exactly that step, so no step is trained or logged twice."""
    from mlflow.tracking import MlflowClient

    from ran.runtime import load_checkpoint
    from fault_injection import Fault, KillWorker
    from ran.train.launch import run_training

    marker = tmp_path / "terminated"
    cfg = tiny_job(synth_data, tmp_path / "runs", **{
        "train.log_every": 1, "train.checkpoint_every_steps": 3, "train.keep_checkpoints": 50})
    # Sent once step 3's checkpoint is registered. Rank 0 takes step 6's checkpoint only after
    # step 3's is registered, and step 9's only after step 6's (one in flight), so the notice is
    # seen by step 10 at the latest, inside the 12 steps of epoch 1.
    outcome = run_training(cfg, callbacks=[KillWorker(Fault(after_step=3, rank=1, signal="TERM",
                                                            marker=str(marker)))])

    assert re.fullmatch(r"rank 1 \(pid \d+\) sent SIGTERM after step 3\n", marker.read_text())
    client = MlflowClient(mlflow_sqlite)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    notice = re.fullmatch(r"SIGTERM on rank\(s\) 1: checkpoint epoch=0000_step=(\d{7}) \(sample "
                          r"(\d+)\) is registered; stopping this worker group so that it "
                          r"restarts from it", run.data.tags["ran.notice"])
    assert notice, run.data.tags["ran.notice"]
    step = int(notice.group(1))
    assert 3 < step < STEPS_PER_EPOCH and int(notice.group(2)) == step * 32  # mid-epoch 1
    assert run.data.tags["ran.resumed_from"] == f"epoch=0 step={step}"
    state = load_checkpoint(Path(outcome.run_dir) / f"epoch=0000_step={step:07d}")
    assert (state["step"], state["samples"], state["epoch"]) == (step, step * 32, 0)
    assert state["epoch_progress"][1] == step * 32

    assert outcome.metrics["step"] == 2 * STEPS_PER_EPOCH
    assert _history(mlflow_sqlite, outcome.run_id, "train/step_loss") == list(range(1, 25))
    _assert_each_epoch_once(mlflow_sqlite, outcome.run_id, 2)
    assert [v for _, v in _values(mlflow_sqlite, outcome.run_id, "train/epoch_samples")] == [384, 384]
    # The same plan after the restart: ran.plan.* tags, no plan/ charts of one value.
    assert _values(mlflow_sqlite, outcome.run_id, "plan/world_size") == []


def _values(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


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
    # checkpoint is registered; fault_injection holds the controller until Ray ends it.
    first_log = tmp_path / "first.log"
    first = _ran(str(job), *overrides, cwd=tmp_path, log=first_log,
                 env={**env, **fault_env(after_epoch=1, target="driver", marker=marker)})
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
