"""Ctrl-C to `ran train`: the workers checkpoint the step they reach and end, the command says
where it stopped and how to continue, exits 130, the MLflow run is KILLED, and `--resume`
continues from that step in the same run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import logged
import pytest

pytestmark = pytest.mark.integration

STEPS_PER_EPOCH = 384 // (16 * 2)  # synth_data train split / global batch


def _ran(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ran.cli", "train", *args], cwd=cwd, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen) -> None:
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)


def test_sigint_checkpoints_the_step_reached_exits_130_and_resume_continues(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path):
    from mlflow.tracking import MlflowClient

    from ran.runtime import load_checkpoint

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{"train.epochs": 4}).to_yaml())
    env = {**os.environ, "RAY_ADDRESS": ray_local, "MLFLOW_TRACKING_URI": mlflow_sqlite}
    first_log = tmp_path / "first.log"
    first = _ran(str(job), "--set", "train.log_every=2", env=env, cwd=tmp_path, log=first_log)
    _wait_for(first_log, "epoch 1/4 done", first)
    first.send_signal(signal.SIGINT)  # to the driver only, as `kill -INT PID` (mid-epoch 2)
    assert first.wait(300) == 130, first_log.read_text()[-3000:]

    out = first_log.read_text()
    assert "Traceback" not in out, out[-3000:]
    last = out.rstrip().splitlines()[-1]
    stopped = re.fullmatch(
        rf"interrupted at step (\d+): checkpoint ({re.escape(str(tmp_path))}/runs/tiny-\S+/"
        rf"epoch=(\d{{4}})_step=(\d{{7}})) is kept; continue with: ran train {re.escape(str(job))} "
        r"--set train.log_every=2 --resume", last)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    # Workers look for the request every 10 steps: the step reached is the first multiple of 10
    # after the interrupt, before the run's end (48), and its checkpoint holds exactly that step.
    assert step % 10 == 0 and STEPS_PER_EPOCH < step < 4 * STEPS_PER_EPOCH
    assert int(stopped.group(4)) == step and int(stopped.group(3)) == step // STEPS_PER_EPOCH
    state = load_checkpoint(stopped.group(2))
    assert (state["step"], state["samples"]) == (step, step * 32)

    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("ran").experiment_id])
    assert run.info.status == "KILLED" and run.info.end_time is not None

    second_log = tmp_path / "second.log"
    second = _ran(str(job), "--set", "train.log_every=2", "--resume", env=env, cwd=tmp_path,
                  log=second_log)
    assert second.wait(300) == 0, second_log.read_text()[-3000:]
    resumed = re.search(r"resumed from \S+ at epoch (\d), step (\d+)", second_log.read_text())
    assert resumed and int(resumed.group(2)) == step, second_log.read_text()[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("ran").experiment_id])
    assert run.info.status == "FINISHED"
    assert logged.epochs(mlflow_sqlite, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    step_loss = [s for s, _ in logged.history(mlflow_sqlite, run.info.run_id, "train/step_loss")]
    assert step_loss == list(range(2, 4 * STEPS_PER_EPOCH + 1, 2))  # no step twice, none missing


def test_ctrl_c_to_the_process_group_with_its_own_local_ray(synth_data, tiny_job, mlflow_sqlite,
                                                            tmp_path):
    """A terminal's Ctrl-C: SIGINT to the whole process group of `ran train`, which started its
    own lean local Ray (no RAY_ADDRESS). The same outcome: the step's checkpoint, 130, KILLED."""
    from mlflow.tracking import MlflowClient

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{"train.epochs": 4}).to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = mlflow_sqlite
    log = tmp_path / "train.log"
    proc = _ran(str(job), env=env, cwd=tmp_path, log=log)
    _wait_for(log, "epoch 1/4 done", proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(300) == 130, log.read_text()[-3000:]
    last = log.read_text().rstrip().splitlines()[-1]
    stopped = re.fullmatch(r"interrupted at step (\d+): checkpoint (\S+) is kept; continue with: "
                           rf"ran train {re.escape(str(job))} --resume", last)
    assert stopped, log.read_text()[-3000:]
    assert int(stopped.group(1)) % 10 == 0 and Path(stopped.group(2)).is_dir()
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("ran").experiment_id])
    assert run.info.status == "KILLED"
