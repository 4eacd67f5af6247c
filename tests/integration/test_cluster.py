"""The cluster path for real: `ray start` processes on 127.0.0.1, `ran submit` / `ran jobs` as a
user runs them (subprocesses, token auth), `ran train jobs/demo.yaml` as the job, MLflow on sqlite.

One cluster for the module: a head and a worker node of 1 CPU each, so the 2 training workers
must land on different nodes.

- the demo job reaches SUCCEEDED across both nodes, its logs come back, MLflow has its run; a
  second job is stopped.
- the worker node is killed after the first checkpoint, a new node joins, and the run resumes from
  the checkpoint and finishes.

Tiny settings (CIFAR-stem Attention-56 on 16x16 synthetic images, 2 workers) keep both under a few
minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from cluster_fixtures import LocalCluster, client_env, ran, two_nodes  # noqa: F401

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


@pytest.fixture(scope="module")
def client(two_nodes: LocalCluster):
    """An in-process JobSubmissionClient, for polling without paying a `ran` start-up each time."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(two_nodes.dashboard_url,
                               headers={"Authorization": f"Bearer {two_nodes.env['RAY_AUTH_TOKEN']}"})


def train_workers(cluster: LocalCluster, state: str | None = None) -> dict[str, str]:
    """Ray Train worker actors (in ``state``, if given): actor id -> node id."""
    filters = {"class_name": "RayTrainWorker", **({"state": state} if state else {})}
    return {a["actor_id"]: a["node_id"] for a in cluster.state("actors", **filters)}


def node_ids(cluster: LocalCluster) -> dict[str, str]:
    return {("head" if n["is_head_node"] else "worker"): n["node_id"] for n in cluster.alive_nodes()}


def registered_epoch(storage: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train has registered (what a restart resumes from):
    a checkpoint directory on disk is not enough, the report that carries it must have landed."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being written
            return None
        return int(latest["metrics"]["epoch"]) if latest else None
    return None


def test_submit_demo_succeeds_logs_come_back_and_mlflow_has_the_run(
        two_nodes: LocalCluster, client, synth_data: str, tmp_path: Path):
    db = tmp_path / "mlflow.db"
    env = client_env(two_nodes, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    url = two_nodes.dashboard_url
    nodes = node_ids(two_nodes)
    before = train_workers(two_nodes)  # of earlier jobs on this cluster
    status = two_nodes.local_sh("status")
    assert status.returncode == 0 and f"dashboard {url} is up" in status.stdout, status.stdout

    out = ran("submit", DEMO, "--address", url, "--wait",
              *tiny(synth_data, tmp_path / "runs", epochs=1, experiment="cluster"), env=env)
    job_id = submission_id(out.stdout)
    assert re.search(rf"^job {job_id} SUCCEEDED$", out.stdout, re.M), out.stdout
    assert "epoch 1/1 done" in out.stdout  # the job's own output, streamed

    # One CPU per node and one per worker: the two training workers ran on different nodes.
    ours = {a: n for a, n in train_workers(two_nodes).items() if a not in before}
    assert sorted(ours.values()) == sorted(nodes.values())

    status = ran("jobs", "status", job_id, "--address", url, env=env).stdout
    assert re.search(r"^status\s+SUCCEEDED$", status, re.M), status
    assert re.search(r"^ran\.job\s+jobs/demo\.yaml$", status, re.M), status
    logs = ran("jobs", "logs", job_id, "--address", url, env=env).stdout
    assert "epoch 1/1 done" in logs and "final validation" in logs
    listed = ran("jobs", "list", "--address", url, env=env).stdout
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s", listed, re.M), listed

    mlflow, run = mlflow_run(db, "cluster", job_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == synth_data
    assert epochs_logged(mlflow, run.info.run_id) == [1]
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))  # beside the store
    assert (tmp_path / "mlartifacts").is_dir()

    # A second job, stopped while it runs.
    out = ran("submit", DEMO, "--address", url,
              *tiny(synth_data, tmp_path / "runs", epochs=50, experiment="cluster"), env=env)
    second = submission_id(out.stdout)
    wait_for("the second job to run", lambda: str(client.get_job_status(second)) == "RUNNING",
             timeout=60)
    stopped = ran("jobs", "stop", second, "--address", url, env=env).stdout
    assert stopped.strip() == f"job {second} STOPPED"
    assert str(client.get_job_status(second)) == "STOPPED"


def test_a_killed_worker_node_is_replaced_and_training_resumes_from_its_checkpoint(
        two_nodes: LocalCluster, client, synth_data: str, tmp_path: Path):
    db = tmp_path / "mlflow.db"
    env = client_env(two_nodes, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    url = two_nodes.dashboard_url
    storage = tmp_path / "runs"
    nodes = node_ids(two_nodes)
    before = train_workers(two_nodes)  # of earlier jobs on this cluster

    out = ran("submit", DEMO, "--address", url,
              *tiny(synth_data, storage, epochs=3, experiment="two-nodes"), env=env)
    job_id = submission_id(out.stdout)
    def ours(state: str | None = None) -> dict[str, str]:
        return {a: n for a, n in train_workers(two_nodes, state).items() if a not in before}

    placed = wait_for("2 training workers", lambda: len(w := ours("ALIVE")) == 2 and w, timeout=180)
    assert sorted(placed.values()) == sorted(nodes.values())  # one on each node

    # Kill the worker node (SIGKILL, as a lost machine) once a checkpoint is registered.
    checkpointed = wait_for("a registered checkpoint", lambda: registered_epoch(storage), timeout=180)
    worker = next(name for name in two_nodes.nodes if name != "head" and two_nodes.pids(name))
    two_nodes.kill_node(worker)
    assert not two_nodes.pids(worker)
    wait_for("the lost worker to be noticed", lambda: len(ours("ALIVE")) < 2, timeout=60)
    two_nodes.add_node(f"{worker}-replacement", num_cpus=1, resources={"worker_slot": 1})

    followed = ran("jobs", "logs", job_id, "--follow", "--address", url, env=env, timeout=300)
    assert f"job {job_id} SUCCEEDED" in followed.stdout
    resumed = re.search(r"resumed from \S+ at epoch (\d+), step \d+", followed.stdout)
    assert resumed and int(resumed.group(1)) >= checkpointed >= 1, followed.stdout
    assert "epoch 3/3 done" in followed.stdout

    new_node = (set(node_ids(two_nodes).values()) - set(nodes.values())).pop()
    groups = sorted(ours().values())
    assert groups == sorted([nodes["head"], nodes["worker"], nodes["head"], new_node])  # 2 groups

    mlflow, run = mlflow_run(db, "two-nodes", job_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ran.resumed_from"].startswith(f"epoch={resumed.group(1)} ")
    assert epochs_logged(mlflow, run.info.run_id) == [1, 2, 3]  # each epoch exactly once
