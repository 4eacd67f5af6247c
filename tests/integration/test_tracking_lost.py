"""The tracking server goes away in the middle of `ran train`: training goes on to the end (as
designed: ran.tracking.runs.RunLogger), and the console says so in one warning line when it goes
and in the summary, with no traceback or retry chatter from MLflow, urllib3 or Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import free_port, local_server, mlflow_server_argv, stop_tree

pytestmark = pytest.mark.integration


def test_a_server_lost_mid_run_is_said_when_it_goes_and_in_the_summary_not_in_tracebacks(
        synth_data, tiny_job, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    port = free_port()
    argv = mlflow_server_argv(f"sqlite:///{tmp_path}/mlflow.db", port)
    with local_server(argv, port=port, ready="/health", log=tmp_path / "server.log",
                      cwd=tmp_path) as url:
        # MLflow's own retries (each a urllib3 warning), 2 a call backing off for 3 s instead of
        # 7 for a minute. `ran train` starts its own Ray, so that its workers (rank 0 logs the
        # metrics) have this environment.
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-m", "ran.cli", "train", str(job)], cwd=tmp_path,
                                env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        before: list[str] = []
        try:
            for line in proc.stdout:  # the server goes once epoch 1 is done
                before.append(line)
                if line.startswith("epoch 1/2 done:"):
                    break
        except BaseException:
            stop_tree(proc.pid)
            raise
    try:
        after = proc.communicate(timeout=600)[0]
    finally:
        stop_tree(proc.pid)
    out = "".join(before) + after
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "Retrying (" not in out, out[-5000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    # Once when it went, and the one value logged after the summary was made (the last
    # checkpoint's wait), which the summary cannot name.
    assert len(warnings) == 2, out
    assert warnings[0] == (
        f"warning: MLflow at {url} does not answer ([Errno 111] Connection refused): training goes "
        "on, rank 0 keeps retrying its metrics and the summary names any it could not log")
    assert re.fullmatch(rf"warning: MLflow at {re.escape(url)} \(\[Errno 111\] Connection refused\): "
                        r"\S*ckpt_wait\S* at step 24 not logged either", warnings[1]), warnings[1]
    assert len([line for line in out.splitlines() if line.startswith("not in MLflow:")]) == 1
    # After the outage: the warning, epoch 2 (training went on) and the summary, nothing else.
    kinds = ("warning: MLflow", "epoch 2/2 ", "checkpoint epoch=", "final validation:",
             "checkpoints:", "MLflow run:", "look:", "not in MLflow:",
             f"MLflow at {url} did not answer at the end")
    assert [line for line in after.splitlines() if not line.startswith(kinds)] == [], after
    assert "epoch 2/2 done:" in after
