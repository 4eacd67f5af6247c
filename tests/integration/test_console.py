"""What `ran train` prints into a pipe: ran's own lines by default, Ray's with -v; never a colour
code or a carriage return. Two runs of the tiny job (2 epochs, registering its model), each its
own lean local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EPOCHS = 2
# Per epoch: its summary, a checkpoint line, a progress line every 10 s: a tiny epoch takes seconds.
MAX_LINES_PER_EPOCH = 5
RAY_CHATTER = ("TrainingReport(", "(RayTrainWorker pid=", "(TrainController pid=",
               "Started a local Ray instance", "Token authentication is enabled",
               "INFO mlflow", "A run snapshot was found",
               "Successfully registered model", "Created version ")  # MLflow's, registering


def _ran_train(*args: str, job: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``ran [args] train job`` as a user runs it, stdout and stderr through pipes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAN_LOG_LEVEL") and not k.startswith(("RAY_DEDUP", "RAY_COLOR"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd}/mlflow.db"
    return subprocess.run([sys.executable, "-m", "ran.cli", *args, "train", str(job)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def job(synth_data: str, tiny_job, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "train.epochs": EPOCHS, "tracking.log_model": True,
        "tracking.registered_model": "tiny-console"}).to_yaml())
    return path


def _plain(text: str) -> None:
    assert "\x1b" not in text, [line for line in text.splitlines() if "\x1b" in line][:3]
    assert "\r" not in text


def test_default_output_is_rans_own_lines(job: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    done = _ran_train(job=job, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    _plain(done.stdout)
    _plain(done.stderr)
    for text in RAY_CHATTER:
        assert text not in done.stdout and text not in done.stderr, text

    lines = done.stdout.splitlines()
    assert lines[0].startswith("run directory ")
    summaries = [line for line in lines if line.startswith("epoch ") and " done: " in line]
    assert [s.split(" done:")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"]
    end = next(i for i, line in enumerate(lines) if line.startswith("final validation: top-1 "))
    training = lines[1:end]  # between the run's header and the final summary
    assert len(training) <= MAX_LINES_PER_EPOCH * EPOCHS, training
    assert "registered model: tiny-console version 1 (models:/tiny-console/1)" in lines  # ran's words

    # The run's params are the options it used: the tiny job is a 2-epoch cosine schedule.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("ran").experiment_id])[0]
    assert run.data.params["schedule.kind"] == "cosine"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert {"schedule.milestones", "schedule.total_steps", "schedule.gamma"} & set(run.data.params) == set()


def test_verbose_output_has_rays_lines_and_still_no_colour(job: Path, tmp_path: Path):
    # One epoch with a checkpoint mid-way: two reports, as the default run's two epochs make.
    import yaml

    cfg = yaml.safe_load(job.read_text())
    cfg["train"].update(epochs=1, checkpoint_every_steps=6)
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(cfg))
    done = _ran_train("-v", job=short, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    _plain(done.stdout)
    _plain(done.stderr)
    assert "(RayTrainWorker pid=" in done.stdout  # rank 0's lines, with Ray's prefix
    reports = {line.split("Reporting training result ", 1)[1].split(":", 1)[0]
               for line in done.stderr.splitlines() if "TrainingReport(" in line}
    assert reports == {"1", "2"}  # Ray Train's line for each report (step 6's and the epoch's)
    assert "Started a local Ray instance" in done.stderr
    assert "final validation: top-1 " in done.stdout
    assert "Successfully registered model 'tiny-console'." in done.stderr  # MLflow's notice is back
