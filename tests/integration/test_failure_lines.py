"""What `ran train` says when training fails is true: the restarts counted are those that happened,
and a full disk at a checkpoint is one line naming that checkpoint, with what was saved before kept.

The faults come from outside the training loop, through test-only Ray Train callbacks on the
controller (passed to ``run_training``): a worker killed by PID, a checkpoint path that leads to
/dev/full.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray.cloudpickle
from ray.train import UserCallback

pytestmark = pytest.mark.integration
# The callbacks travel to Ray Train's controller by value: it cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS_PER_EPOCH = 384 // (16 * 2)  # synth_data train split / global batch


def _epoch_end(metrics: list[dict[str, Any]], epoch: int) -> bool:
    return metrics[0].get("epoch") == epoch and "train/loss" in metrics[0]


class CrashThenBrokenCallback(UserCallback):
    """Kills rank 1 after the report of step 4's checkpoint (a crash: Ray Train restarts the
    group from it), then fails on the restarted group's first report: an error in a controller
    callback, which Ray Train does not retry, so the run ends with restarts to spare."""

    def __init__(self) -> None:
        self.killed = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not self.killed and metrics[0].get("step") == 4:
            self.killed = True
            worker = psutil.Process(int(metrics[1]["worker_pid"]))
            worker.kill()
            worker.wait(30)
        elif self.killed:
            raise RuntimeError("the report callback broke")


def test_the_restarts_named_are_those_that_happened_not_the_maximum(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path):
    from ran.train.launch import RunFailed, run_training

    cfg = tiny_job(synth_data, tmp_path / "runs", **{
        "scaling.max_failures": 3, "train.epochs": 1, "train.checkpoint_every_steps": 4})
    with pytest.raises(RunFailed) as failed:
        run_training(cfg, callbacks=[CrashThenBrokenCallback()])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert str(failed.value) == (
        "training failed after 1 restart(s) (scaling.max_failures=3): the report callback broke; "
        f"the latest checkpoint {run_dir}/epoch=0000_step=0000008 is kept: fix the cause and run "
        "the same command with --resume")


class FullDiskAfter(UserCallback):
    """After the report of step ``step``'s checkpoint, the checkpoint file of step ``2 * step`` in
    ``run_dir`` becomes a link to /dev/full: writing it fails with ENOSPC, as on a full disk."""

    def __init__(self, run_dir: str, step: int) -> None:
        self.run_dir, self.step = Path(run_dir), step

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics[0].get("step") == self.step:
            target = self.run_dir / f"epoch=0000_step={2 * self.step:07d}"
            target.mkdir()
            (target / "checkpoint.pt").symlink_to("/dev/full")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this platform")
def test_a_full_disk_at_a_checkpoint_is_one_line_naming_it_and_keeps_what_was_saved(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from ran.runtime import load_checkpoint
    from ran.train.launch import RunFailed, run_training

    run_dir = tmp_path / "runs" / "full"
    cfg = tiny_job(synth_data, tmp_path / "runs", **{
        "storage.name": "full", "scaling.max_failures": 0, "train.epochs": 1,
        "train.checkpoint_every_steps": 4})
    with pytest.raises(RunFailed) as failed:
        run_training(cfg, callbacks=[FullDiskAfter(str(run_dir), 4)])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]
    assert str(failed.value) == (
        "training failed after 0 restart(s) (scaling.max_failures=0): no space left writing "
        f"checkpoint {run_dir}/epoch=0000_step=0000008 (No space left on device): free space there "
        "or set storage.path to a disk with room; the latest checkpoint "
        f"{run_dir}/epoch=0000_step=0000004 is kept: fix the cause and run the same command with "
        "--resume")
    state = load_checkpoint(run_dir / "epoch=0000_step=0000004")  # what was saved is intact
    assert (state["step"], state["samples"]) == (4, 4 * 32)
    client = MlflowClient(mlflow_sqlite)
    (run,) = client.search_runs([client.get_experiment_by_name("ran").experiment_id])
    assert run.info.status == "FAILED"
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")]
    assert logged[:1] == [4]  # what was logged stays logged (train.log_every=4)
