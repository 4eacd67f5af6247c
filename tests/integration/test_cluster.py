"""The cluster path for real: `ray start` processes on 127.0.0.1, `ran submit` / `ran jobs` as a
user runs them (subprocesses, token auth), `ran train jobs/demo.yaml` as the job, MLflow on sqlite.

- one head: the demo job reaches SUCCEEDED, its logs come back, MLflow has its run; a second job
  is stopped.
- a head and a worker node of 1 CPU each: the 2 training workers land on different nodes; the
  worker node is killed after the first checkpoint, a new node joins, and the run resumes from the
  checkpoint and finishes.

Tiny settings (CIFAR-stem Attention-56 on 16x16 synthetic images, 2 workers) keep both under a few
minutes on 2 shared cores.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from cluster_fixtures import REPO, LocalCluster, client_env, local_cluster, ran  # noqa: F401

pytestmark = pytest.mark.integration

DEMO = "jobs/demo.yaml"


def tiny(data: str, storage: Path, epochs: int, experiment: str) -> list[str]:
    """--set items making the demo job tiny."""
    settings = {
        "model.name": "attention56", "model.stem": "cifar", "data.path": data,
        "data.batch_size": 16, "data.workers": 0, "data.crop": 16, "schedule.kind": "cosine",
        "optim.reference_batch_size": 32, "train.epochs": epochs, "train.log_every": 4,
        "train.checkpoint_every": 1, "train.eval_every": 1, "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 1, "scaling.max_failures": 2, "storage.path": str(storage),
        "tracking.experiment": experiment, "tracking.registered_model": "null",
        "tracking.log_model": "false",
    }
    out = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


def submission_id(stdout: str) -> str:
    found = re.search(r"^submitted (\S+): ran train ", stdout, re.M)
    assert found, stdout
    return found.group(1)


def mlflow_run(db: Path, experiment: str, submission: str):
    """The one MLflow run the submitted job created (tagged with its submission id)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {db}"
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`ray.submission_id` = '{submission}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def epochs_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_top1"))


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def test_submit_demo_succeeds_logs_come_back_and_mlflow_has_the_run(
        local_cluster: LocalCluster, synth_data: str, tmp_path: Path):
    local_cluster.start_head(num_cpus=2)
    db = tmp_path / "mlflow.db"
    env = client_env(local_cluster, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    url = local_cluster.dashboard_url

    out = ran("submit", DEMO, "--address", url, "--wait",
              *tiny(synth_data, tmp_path / "runs", epochs=2, experiment="cluster"), env=env)
    job_id = submission_id(out.stdout)
    assert re.search(rf"^job {job_id} SUCCEEDED$", out.stdout, re.M), out.stdout
    assert "epoch 2/2 done" in out.stdout  # the job's own output, streamed

    status = ran("jobs", "status", job_id, "--address", url, env=env).stdout
    assert re.search(r"^status\s+SUCCEEDED$", status, re.M), status
    assert re.search(r"^ran\.job\s+jobs/demo\.yaml$", status, re.M), status
    logs = ran("jobs", "logs", job_id, "--address", url, env=env).stdout
    assert "epoch 1/2 done" in logs and "epoch 2/2 done" in logs
    listed = ran("jobs", "list", "--address", url, env=env).stdout
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s", listed, re.M), listed

    client, run = mlflow_run(db, "cluster", job_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == synth_data
    assert epochs_logged(client, run.info.run_id) == [1, 2]
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))  # beside the store
    assert (tmp_path / "mlartifacts").is_dir()

    # A second job, stopped while it runs.
    out = ran("submit", DEMO, "--address", url,
              *tiny(synth_data, tmp_path / "runs", epochs=50, experiment="cluster"), env=env)
    second = submission_id(out.stdout)
    wait_for("the second job to start", lambda: "RUNNING" in ran(
        "jobs", "status", second, "--address", url, env=env).stdout, timeout=60)
    stopped = ran("jobs", "stop", second, "--address", url, env=env).stdout
    assert stopped.strip() == f"job {second} STOPPED"
    failed = ran("jobs", "logs", second, "--follow", "--address", url, env=env, check=False)
    assert failed.returncode == 1 and f"job {second} STOPPED" in failed.stdout


def worker_nodes(cluster: LocalCluster, state: str = "ALIVE") -> list[str]:
    """Node ids of the Ray Train worker actors in ``state``."""
    return [a["node_id"] for a in cluster.state("actors", class_name="RayTrainWorker", state=state)]


def checkpoints(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/epoch=*/checkpoint.pt"))


def test_two_nodes_hold_one_worker_each_and_a_killed_node_is_recovered_from_checkpoint(
        local_cluster: LocalCluster, synth_data: str, tmp_path: Path):
    # Notice a dead node in ~3 s instead of ~30 s.
    local_cluster.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                             RAY_health_check_failure_threshold="3")
    local_cluster.start_head(num_cpus=1, resources={"head_slot": 1})
    local_cluster.add_node("worker1", num_cpus=1, resources={"worker_slot": 1})
    local_cluster.wait_nodes(2)
    nodes = {("head" if n["is_head_node"] else "worker1"): n["node_id"]
             for n in local_cluster.alive_nodes()}
    db = tmp_path / "mlflow.db"
    env = client_env(local_cluster, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    url = local_cluster.dashboard_url
    storage = tmp_path / "runs"

    out = ran("submit", DEMO, "--address", url,
              *tiny(synth_data, storage, epochs=3, experiment="two-nodes"), env=env)
    job_id = submission_id(out.stdout)

    # One CPU per node and one CPU per worker: the two workers must be on different nodes.
    placed = wait_for("2 training workers", lambda: (w := worker_nodes(local_cluster)) and
                      len(w) == 2 and w, timeout=120)
    assert sorted(placed) == sorted(nodes.values())

    # Kill the worker node (SIGKILL, as a lost machine) once the first checkpoint is on disk.
    first = wait_for("the first checkpoint", lambda: checkpoints(storage), timeout=180)[0]
    local_cluster.kill_node("worker1")
    assert not local_cluster.pids("worker1")
    wait_for("the lost worker to be noticed", lambda: len(worker_nodes(local_cluster)) < 2, timeout=60)
    local_cluster.add_node("worker2", num_cpus=1, resources={"worker_slot": 1})

    followed = ran("jobs", "logs", job_id, "--follow", "--address", url, env=env, timeout=300)
    assert f"job {job_id} SUCCEEDED" in followed.stdout
    resumed = re.search(r"resumed from \S+ at epoch (\d+), step \d+", followed.stdout)
    assert resumed and int(resumed.group(1)) >= 1, followed.stdout
    assert "epoch 3/3 done" in followed.stdout

    new_node = next(n["node_id"] for n in local_cluster.alive_nodes()
                    if n["node_id"] not in nodes.values())
    all_workers = worker_nodes(local_cluster, "DEAD")
    assert new_node in all_workers  # the restarted group used the node that joined
    assert nodes["worker1"] in all_workers and nodes["head"] in all_workers

    client, run = mlflow_run(db, "two-nodes", job_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ran.resumed_from"].startswith(f"epoch={resumed.group(1)} ")
    assert epochs_logged(client, run.info.run_id) == [1, 2, 3]  # each epoch once
    assert first.parent.name.startswith("epoch=")
