"""A data error in a worker ends `ran train` with one `error:` line (no worker traceback without
-v) that says whether a checkpoint is kept, and where."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ran.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture
def broken(synth_data: str, tmp_path: Path) -> Path:
    """The synthetic shards with the val shard overwritten by garbage (found at validation)."""
    out = tmp_path / "broken"
    shutil.copytree(synth_data, out)
    shard = out / "val-000000.tar"
    shard.write_bytes(b"\0garbage" * (shard.stat().st_size // 8))
    return out


@pytest.mark.parametrize(("every_steps", "max_failures"), [(None, 0), (4, 1)])
def test_a_data_error_in_a_worker_is_one_line_naming_restarts_and_the_checkpoint_kept(
        ray_local, broken, tiny_job, mlflow_sqlite, tmp_path, capfd, every_steps, max_failures):
    """Without a checkpoint and no restart allowed; and with one restart, which resumes from step
    8's checkpoint and meets the same bad shard: the line counts the restart that happened."""
    from mlflow.tracking import MlflowClient

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(broken, tmp_path / "runs", **{
        "scaling.max_failures": max_failures,
        "train.checkpoint_every_steps": every_steps}).to_yaml())
    code = main(["train", str(job)])
    err = capfd.readouterr().err
    assert code == 1
    assert "Traceback" not in err and "Error in training function" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    # Epoch 1 is 12 steps; its validation fails before the epoch's checkpoint: with a checkpoint
    # every 4 steps, step 8's is the latest (step 12's is left to the epoch's end).
    kept = (f"the latest checkpoint {run_dir}/epoch=0000_step=0000008 is kept: fix the cause and "
            "run the same command with --resume" if every_steps else
            "no checkpoint is kept: fix the cause and run the command again")
    assert re.fullmatch(
        rf"error: training failed after {max_failures} restart\(s\) \(scaling.max_failures="
        rf"{max_failures}\): 64 of 64 "
        r"samples unreadable in rank [01] loader worker 0, above max_bad_fraction=0.01 \(last: "
        rf"shard {re.escape(str(broken))}/val-000000.tar: TarFormatError: bad tar header checksum "
        rf"\(not a tar file, or corrupt\)\); {re.escape(kept)}", errors[0]), errors[0]
    checkpoints = sorted(p.name for p in run_dir.glob("epoch=*"))
    assert checkpoints == (["epoch=0000_step=0000004", "epoch=0000_step=0000008"]
                           if every_steps else [])
    client = MlflowClient(mlflow_sqlite)
    run = client.search_runs([client.get_experiment_by_name("ran").experiment_id])[0]
    assert run.info.status == "FAILED"
