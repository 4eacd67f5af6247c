"""`ran train` with no Ray to connect to: it starts a lean local Ray for the job and stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import logged
import psutil
import pytest
from fault_injection import fault_env

pytestmark = pytest.mark.integration


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries ``RAN_TEST_MARK=mark`` (the job's and its Ray's)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAN_TEST_MARK") == mark:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _ran_train(job: Path, *args: str, cwd: Path, uri: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=uri, **env_vars)
    return subprocess.run([sys.executable, "-m", "ran.cli", "train", str(job), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


STEPS_PER_EPOCH = 384 // 16  # synth_data train split / batch of the one worker


def test_own_lean_ray_trains_recovers_tracks_and_is_gone_after(synth_data, tiny_job, tmp_path):
    """Started without the dashboard and Ray Train's cleaner actors, a worker killed after epoch 1
    is still replaced from that checkpoint, and the MLflow run is whole."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "train.epochs": 3, "scaling.num_workers": 1, "scaling.max_failures": 1}).to_yaml())
    mark = uuid.uuid4().hex
    started = time.time()
    # Killed by the controller once it registered epoch 1's checkpoint (test_train_faults says
    # why that makes the restart point certain).
    done = _ran_train(job, cwd=tmp_path, uri=uri, RAN_TEST_MARK=mark, RAN_LOG_LEVEL="INFO",
                      **fault_env(after_epoch=1, marker=tmp_path / "failed-once"))  # Ray's own INFO lines say which Ray started
    wall = time.time() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Started a local Ray instance" in out
    assert "View the dashboard" not in out  # the lean Ray runs no dashboard
    assert (tmp_path / "failed-once").exists(), "the fault was not injected"
    assert "final validation: top-1" in out
    assert _marked(mark) == [], "the job's Ray outlived it"

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("ran").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert logged.epochs(client, run.info.run_id, "train/loss") == [1, 2, 3], \
        "an epoch is missing or logged twice"
    assert [s for s, _ in logged.history(client, run.info.run_id, "train/loss")] == \
        [e * STEPS_PER_EPOCH for e in (1, 2, 3)]  # at the global step
    assert run.data.tags["ran.resumed_from"] == f"epoch=1 step={STEPS_PER_EPOCH}"
    # Opened while Ray started, tagged with its job once Ray was up.
    assert run.data.tags["ray.job_id"] and run.data.tags["ran.job"] == "tiny"
    assert run.data.tags["ran.plan.steps_per_epoch"] == str(STEPS_PER_EPOCH)
    startup = client.get_metric_history(run.info.run_id, "perf/startup_s")
    assert len(startup) == 1 and 0 < startup[0].value < wall


def test_more_workers_than_this_machine_fails_before_ray_starts(synth_data, tiny_job, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    cpus = os.cpu_count() or 1
    done = _ran_train(job, "--set", f"scaling.num_workers={cpus + 1}", cwd=tmp_path, uri=uri)
    assert done.returncode == 2
    assert f"cannot place {cpus + 1} workers x 1 CPU" in done.stderr
    assert "Started a local Ray" not in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
