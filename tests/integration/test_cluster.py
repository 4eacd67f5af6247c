"""The cluster path for real: `ray start` processes on 127.0.0.1, `ran submit` / `ran jobs` as a
user runs them (subprocesses, token auth), `ran train jobs/demo.yaml` as the job, MLflow on sqlite.

One cluster for the module: a head and a worker node of 1 CPU each, so the 2 training workers
must land on different nodes.

- the demo job reaches SUCCEEDED across both nodes, its logs come back, MLflow has its run; a
  second job is stopped.
- credentials stay where they belong: the demo job is submitted with the client's AWS and MLflow
  secrets set (the nodes hold credentials of their own, and token auth is on), and none of those
  values, nor the Ray token, is in the job's stored details, its logs, the MLflow run (params, tags,
  every artifact including the model's files, the whole store) or the console; without the token
  (or with a wrong one) `ran jobs` fails with the line that says how to give it.
- the worker node is killed after the first checkpoint, a new node joins, and the run resumes from
  the checkpoint and finishes.

Tiny settings (CIFAR-stem Attention-56 on 16x16 synthetic images, 2 workers) keep both under a few
minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import logged
import psutil
import pytest
from cluster_fixtures import NODE_CREDENTIALS, LocalCluster, client_env, ran, two_nodes  # noqa: F401

pytestmark = pytest.mark.integration

DEMO = "jobs/demo.yaml"


def tiny(data: str, storage: Path, epochs: int, experiment: str, **more: str) -> list[str]:
    """--set items making the demo job tiny (``more``: further dotted keys)."""
    settings = {
        "model.name": "attention56", "model.stem": "cifar", "data.path": data,
        "data.batch_size": 16, "data.workers": 0, "data.crop": 16, "schedule.kind": "cosine",
        "optim.reference_batch_size": 32, "train.epochs": epochs, "train.log_every": 4,
        "train.checkpoint_every": 1, "train.eval_every": 1, "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 1, "scaling.max_failures": 2, "storage.path": str(storage),
        "tracking.experiment": experiment, "tracking.registered_model": "null",
        "tracking.log_model": "false", **more,
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
    return logged.epochs(client, run_id, "eval/top1")


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


# The submitter's secrets, set where `ran submit` runs: recognisable values, new each session.
CLIENT_SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIACLIENT{secrets.token_hex(5).upper()}",
    "AWS_SECRET_ACCESS_KEY": f"client-aws-secret-{secrets.token_hex(8)}",
    "AWS_SESSION_TOKEN": f"client-aws-session-{secrets.token_hex(8)}",
    "MLFLOW_TRACKING_USERNAME": f"client-mlflow-user-{secrets.token_hex(4)}",
    "MLFLOW_TRACKING_PASSWORD": f"client-mlflow-password-{secrets.token_hex(8)}",
    "MLFLOW_TRACKING_TOKEN": f"client-mlflow-token-{secrets.token_hex(8)}",
}
# Passed on purpose with --env: it must show up in the job's details (so the search there can
# find a value), with a warning on the console.
NAMED = ("RAN_TEST_NAMED_TOKEN", f"named-on-purpose-{secrets.token_hex(8)}")


@dataclass
class Submitted:
    """The demo job, submitted once for the module by `ran submit --wait`."""

    job_id: str
    out: subprocess.CompletedProcess
    env: dict[str, str]  # the client's environment
    root: Path  # its MLflow store (mlflow.db, mlartifacts/) and runs
    db: Path
    workers: dict[str, str]  # its Ray Train worker actors: actor id -> node id


@pytest.fixture(scope="module")
def demo(two_nodes: LocalCluster, synth_data: str, tmp_path_factory) -> Submitted:
    """`ran submit jobs/demo.yaml --wait` (1 epoch, model logged and registered) from a client
    holding CLIENT_SECRETS, with NAMED passed by --env."""
    root = tmp_path_factory.mktemp("demo")
    db = root / "mlflow.db"
    env = client_env(two_nodes, root, MLFLOW_TRACKING_URI=f"sqlite:///{db}", **CLIENT_SECRETS)
    before = train_workers(two_nodes)  # of earlier jobs on this cluster
    out = ran("submit", DEMO, "--address", two_nodes.dashboard_url, "--wait",
              "--env", f"{NAMED[0]}={NAMED[1]}",
              *tiny(synth_data, root / "runs", epochs=1, experiment="cluster",
                    **{"tracking.log_model": "true", "tracking.registered_model": "ran-cluster"}),
              env=env)
    workers = {a: n for a, n in train_workers(two_nodes).items() if a not in before}
    return Submitted(submission_id(out.stdout), out, env, root, db, workers)


def test_submit_demo_succeeds_logs_come_back_and_mlflow_has_the_run(
        two_nodes: LocalCluster, client, demo: Submitted, synth_data: str, tmp_path: Path):
    env, url, job_id = demo.env, two_nodes.dashboard_url, demo.job_id
    nodes = node_ids(two_nodes)
    status = two_nodes.local_sh("status")
    assert status.returncode == 0 and f"dashboard {url} is up" in status.stdout, status.stdout

    assert re.search(rf"^job {job_id} SUCCEEDED$", demo.out.stdout, re.M), demo.out.stdout
    assert "epoch 1/1 done" in demo.out.stdout  # the job's own output, streamed
    for noise in ("working_dir.py", "packaging.py"):  # Ray's upload lines: only with -v
        assert noise not in demo.out.stdout + demo.out.stderr, noise

    # One CPU per node and one per worker: the two training workers ran on different nodes.
    assert sorted(demo.workers.values()) == sorted(nodes.values())

    status = ran("jobs", "status", job_id, "--address", url, env=env).stdout
    assert re.search(r"^status\s+SUCCEEDED$", status, re.M), status
    assert re.search(r"^ran\.job\s+jobs/demo\.yaml$", status, re.M), status
    logs = ran("jobs", "logs", job_id, "--address", url, env=env).stdout
    assert "epoch 1/1 done" in logs and "final validation" in logs
    listed = ran("jobs", "list", "--address", url, env=env).stdout
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s", listed, re.M), listed

    mlflow, run = mlflow_run(demo.db, "cluster", job_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == synth_data
    assert epochs_logged(mlflow, run.info.run_id) == [1]
    assert run.info.artifact_uri.startswith(str(demo.root / "mlartifacts"))  # beside the store
    assert run.data.tags["ran.registered_version"] == "ran-cluster/1"

    # A second job, stopped while it runs; submitted to RAY_ADDRESS this time.
    out = ran("submit", DEMO, *tiny(synth_data, tmp_path / "runs", epochs=50, experiment="cluster"),
              env={**env, "RAY_ADDRESS": url})
    second = submission_id(out.stdout)
    wait_for("the second job to run", lambda: str(client.get_job_status(second)) == "RUNNING",
             timeout=60)
    stopped = ran("jobs", "stop", second, "--address", url, env=env).stdout
    assert stopped.strip() == f"job {second} STOPPED"
    assert str(client.get_job_status(second)) == "STOPPED"


def found_in(values: dict[str, str], text: str | bytes) -> list[str]:
    """The names of ``values`` whose value occurs in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    return sorted(k for k, v in values.items() if v.encode() in data)


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: path relative to it -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_credential_reaches_job_details_logs_mlflow_or_console(two_nodes: LocalCluster,
                                                                  demo: Submitted):
    ray_token = {"RAY_AUTH_TOKEN": two_nodes.env["RAY_AUTH_TOKEN"]}
    everything = {**CLIENT_SECRETS, **{f"node {k}": v for k, v in NODE_CREDENTIALS.items()},
                  **ray_token}
    # The nodes do hold their credentials and the token: the job runs among them.
    raylet = next(p for p in map(psutil.Process, two_nodes.pids("head")) if p.name() == "raylet")
    head = raylet.environ()
    assert {k: head.get(k) for k in NODE_CREDENTIALS} == NODE_CREDENTIALS
    assert head["RAY_AUTH_TOKEN"] == ray_token["RAY_AUTH_TOKEN"]

    # The job's stored details (what anyone who can list jobs reads), through the Jobs API.
    details = json.dumps(two_nodes.get(f"/api/jobs/{demo.job_id}"))
    assert found_in(everything, details) == []
    env_vars = json.loads(details)["runtime_env"]["env_vars"]
    assert env_vars[NAMED[0]] == NAMED[1]  # what the user named travels, and is seen here
    assert sorted(env_vars) == sorted([NAMED[0], "MLFLOW_TRACKING_URI", "RAY_JOB_SUBMISSION_ID"])

    # Its logs, through the Jobs API, and the console of `ran submit --wait`.
    logs = two_nodes.get(f"/api/jobs/{demo.job_id}/logs")["logs"]
    assert "epoch 1/1 done" in logs
    assert found_in(everything, logs) == []
    console = demo.out.stdout + demo.out.stderr
    assert found_in(everything, console) == []
    assert f"warning: --env {NAMED[0]} looks like a secret: its value is stored with the job" in \
        demo.out.stderr

    # The MLflow run: params and tags, every artifact (config, curves, the model and its extra
    # files), and the store itself. MLflow records the node's MLFLOW_TRACKING_USERNAME as the
    # logged model's user (tag mlflow.user), as it records who made any run: a name, not a secret.
    secret = {k: v for k, v in everything.items() if k != "node MLFLOW_TRACKING_USERNAME"}
    _, run = mlflow_run(demo.db, "cluster", demo.job_id)
    assert found_in(everything, json.dumps([run.data.params, run.data.tags])) == []
    artifacts = files_under(demo.root / "mlartifacts")
    names = {Path(p).name for p in artifacts}
    assert {"config.yaml", "training_curves.png", "MLmodel", "classes.json", "state_dict.pt"} <= names
    assert {p: found_in(everything, data) for p, data in artifacts.items()
            if found_in(everything, data)} == {}
    store = demo.db.read_bytes()
    assert demo.job_id.encode() in store  # the search sees what the store holds
    assert found_in(secret, store) == []

    # The client's secrets never reached the cluster: nowhere in its nodes' files (logs, session
    # data, the uploaded package), where a runtime env's values do land (runtime_env_agent.log).
    cluster_files = files_under(two_nodes.root)
    assert [p for p, data in cluster_files.items() if NAMED[1].encode() in data]
    assert {p: found_in(CLIENT_SECRETS, data) for p, data in cluster_files.items()
            if found_in(CLIENT_SECRETS, data)} == {}


def test_without_the_token_ran_jobs_says_how_to_give_it(two_nodes: LocalCluster, demo: Submitted,
                                                        tmp_path: Path):
    url = two_nodes.dashboard_url
    (tmp_path / "home").mkdir()  # no ~/.ray/auth_token
    env = {k: v for k, v in demo.env.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path / "home")
    missing = ran("jobs", "list", "--address", url, env=env, check=False)
    assert (missing.returncode, missing.stderr) == (2, (
        f"error: Ray dashboard at {url} needs the cluster's Ray token: set RAY_AUTH_TOKEN to the "
        f"cluster's token (`ray get-auth-token` on the head prints it)\n"))
    wrong = ran("jobs", "list", "--address", url, env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                check=False)
    assert (wrong.returncode, wrong.stderr) == (2, (
        f"error: Ray dashboard at {url} refused the Ray token sent: set RAY_AUTH_TOKEN to the "
        f"cluster's token (`ray get-auth-token` on the head prints it)\n"))
    given = ran("jobs", "list", "--address", url,
                env={**env, "RAY_AUTH_TOKEN": two_nodes.env["RAY_AUTH_TOKEN"]})
    assert re.search(rf"^{demo.job_id}\s+SUCCEEDED\s", given.stdout, re.M), given.stdout


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
