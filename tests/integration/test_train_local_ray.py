"""`ran train` with no Ray to connect to: it starts a lean local Ray for the job and stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _raylets() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "raylet":
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def _ran_train(job: Path, *args: str, cwd: Path, uri: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=uri, **env_vars)
    return subprocess.run([sys.executable, "-m", "ran.cli", "train", str(job), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


STEPS_PER_EPOCH = 384 // 16  # synth_data train split / batch of the one worker


def test_own_lean_ray_trains_recovers_tracks_and_is_gone_after(synth_data, tiny_job, tmp_path):
    """Started without the dashboard and Ray Train's cleaner actors, a worker that dies in epoch 3
    is still replaced from a checkpoint, and the MLflow run is whole."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "train.epochs": 3, "scaling.num_workers": 1, "scaling.max_failures": 1}).to_yaml())
    before = _raylets()
    started = time.time()
    # Inside epoch 3: a report reaches the controller at its next poll, so failing right after
    # one could restart from the one before (as test_train_faults explains).
    done = _ran_train(job, cwd=tmp_path, uri=uri, RAN_FAIL_AT_STEP=str(2 * STEPS_PER_EPOCH + 3),
                      RAN_FAIL_MARKER=str(tmp_path / "failed-once"))
    wall = time.time() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Started a local Ray instance" in out
    assert "View the dashboard" not in out  # the lean Ray runs no dashboard
    assert (tmp_path / "failed-once").exists(), "the fault was not injected"
    assert "final validation: top-1" in out
    assert _raylets() == before, "the job's Ray outlived it"

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("ran").experiment_id])[0]
    assert run.info.status == "FINISHED"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(epochs) == [1, 2, 3], "an epoch is missing or logged twice"
    assert run.data.tags["ran.resumed_from"] in (f"epoch=2 step={2 * STEPS_PER_EPOCH}",
                                                  f"epoch=1 step={STEPS_PER_EPOCH}")
    # Opened while Ray started, tagged with its job once Ray was up.
    assert run.data.tags["ray.job_id"] and run.data.tags["ran.job"] == "tiny"
    assert run.data.params["plan.steps_per_epoch"]
    startup = client.get_metric_history(run.info.run_id, "startup_s")
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
