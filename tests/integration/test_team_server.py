"""`ran` against the MLflow a team runs, started as cluster/tracking/ ships it: PostgreSQL
(postgres.sh), `mlflow server --app-name basic-auth` on it with artifacts proxied to S3 (a
moto_server bucket) (mlflow-server.sh), all on 127.0.0.1, stopped at the end.

One module-scoped server stack and one tiny training run as a plain user (alice) whose environment
holds her MLflow login and nothing of S3: it registers a model that is promoted, evaluated,
explained and loaded through ``models:/NAME@ALIAS``. A second, short run loses its server in the
middle. Wrong credentials, a user without permission and an unreachable server fail at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import boto3
import numpy as np
import pytest
import torch

from conftest import BIN, free_port, local_server, stop_tree
from processes import postgres_server
from ran import tracking
from ran.cli import main
from ran.data.read import read_manifest

pytestmark = pytest.mark.integration

TRACKING = Path(__file__).resolve().parents[2] / "cluster" / "tracking"
ADMIN = ("admin", "admin-password-1")  # MLflow 3.17 wants 12 characters or more
ALICE = ("alice", "alice-password-1")  # trains, registers, promotes
BOB = ("bob", "bob-password-12")  # READ on what he did not create (the server's default)
DB_PASSWORD = "db-password-1"
BUCKET = "team-mlflow"
EXPERIMENT = "team"
MODEL = "team-ran"
SYSTEM = ("cpu_utilization_percentage", "system_memory_usage_megabytes",
          "system_memory_usage_percentage", "disk_usage_percentage", "disk_usage_megabytes",
          "network_receive_megabytes", "network_transmit_megabytes")


@dataclass
class Stack:
    url: str  # the MLflow server
    server_env: dict[str, str]  # what mlflow-server.sh was started with (to start another)
    root: Path


def user_env(user: tuple[str, str], url: str, **extra: str) -> dict[str, str]:
    """A user's environment: this one without S3 credentials or Ray address, plus an MLflow login."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return {**env, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user[0],
            "MLFLOW_TRACKING_PASSWORD": user[1], **extra}


@contextlib.contextmanager
def as_user(user: tuple[str, str], url: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in user_env(user, url).items():
            mp.setenv(key, value)
        yield


def mlflow_server(env: dict[str, str], log: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    return local_server([str(TRACKING / "mlflow-server.sh")], port=port, ready="/health", log=log,
                        env={**env, "RAN_MLFLOW_PORT": str(port)}, timeout=240)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """PostgreSQL from postgres.sh on 127.0.0.1; yields ``postgresql://mlflow:PW@127.0.0.1:PORT``."""
    with postgres_server(DB_PASSWORD, tmp_path_factory.mktemp("postgres") / "postgres.log") as base:
        yield base


@pytest.fixture(scope="module")
def stack(postgres: str, moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The team's server (mlflow-server.sh: PostgreSQL, S3, basic-auth) with users alice and bob."""
    from mlflow.server.auth.client import AuthServiceClient

    root = tmp_path_factory.mktemp("team-server")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"{postgres}/mlflow",
           "MLFLOW_AUTH_DATABASE_URI": f"{postgres}/mlflow_auth",
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
           "MLFLOW_S3_ENDPOINT_URL": moto_server, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
           "RAN_MLFLOW_WORKERS": "1", "RAN_MLFLOW_BIN": str(BIN / "mlflow"), "TMPDIR": str(root)}
    with mlflow_server(env, root / "server.log") as url:
        with as_user(ADMIN, url):
            for name, password in (ALICE, BOB):
                AuthServiceClient(url).create_user(name, password)
        yield Stack(url, env, root)


def run_ran(args: list[str], env: dict[str, str], cwd: Path,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ran.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@dataclass
class Trained:
    run: Any  # the MLflow Run
    done: subprocess.CompletedProcess[str]
    workdir: Path
    ray_tmp: Path


@pytest.fixture(scope="module")
def trained(stack: Stack, synth_data: str, tiny_job, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """`ran train` as alice: registers version 1 of team-ran; system metrics every second."""
    workdir = tmp_path_factory.mktemp("alice")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths live under it
    job = workdir / "job.yaml"
    job.write_text(tiny_job(synth_data, workdir / "runs", **{
        "tracking.experiment": EXPERIMENT, "tracking.registered_model": MODEL,
        "tracking.log_model": True, "tracking.system_metrics_every_s": 1.0}).to_yaml())
    done = run_ran(["train", str(job)], user_env(ALICE, stack.url, RAY_TMPDIR=str(ray_tmp)), workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with as_user(ADMIN, stack.url):
        client = tracking.client(stack.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        run = client.search_runs([experiment.experiment_id], max_results=1)[0]
    try:
        yield Trained(run, done, workdir, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_model_registered_there_loads_through_its_alias_from_elsewhere(trained, stack, synth_data,
                                                                          tmp_path, capsys):
    assert f"registered model: {MODEL} version 1 (models:/{MODEL}/1)" in trained.done.stdout
    with as_user(ALICE, stack.url):
        assert main(["promote", MODEL, "--version", "1", "--alias", "champion"]) == 0
        assert f"promoted: {MODEL}@champion -> version 1" in capsys.readouterr().out
        assert main(["registry", MODEL]) == 0
        assert "champion" in capsys.readouterr().out
        assert main(["eval", f"models:/{MODEL}@champion", "--data", synth_data]) == 0
        evaluated = capsys.readouterr().out
        recorded = tracking.client().get_model_version(MODEL, "1").tags["eval/top1"]
        image = tmp_path / "one.png"
        from PIL import Image
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(image)
        assert main(["explain", f"models:/{MODEL}@champion", str(image), "--out",
                     str(tmp_path / "masks")]) == 0
    # The same top-1 the version was registered with, measured through the server.
    assert f"top-1   {float(recorded):.4f}" in evaluated
    assert sorted(p.suffix for p in (tmp_path / "masks").iterdir()) == [".png"]

    # Another machine: a fresh directory, MLflow's login and nothing else (no S3 credentials, no
    # path of the training machine), plain mlflow.pytorch.load_model.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.save(elsewhere / "x.npy", x.numpy())
    script = ("import mlflow.pytorch, numpy as np, torch\n"
              f"model = mlflow.pytorch.load_model('models:/{MODEL}@champion')\n"
              "x = torch.from_numpy(np.load('x.npy'))\n"
              "np.save('y.npy', model(x).detach().numpy())\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(elsewhere),
           **{k: v for k, v in user_env(ALICE, stack.url).items() if k.startswith("MLFLOW_")}}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from ran.runtime import ModelBundle
    run_dir, = (trained.workdir / "runs").iterdir()
    ours = ModelBundle.load(str(run_dir), device=torch.device("cpu")).model  # its final checkpoint
    with torch.no_grad():
        expected = ours(x).numpy()
    np.testing.assert_allclose(np.load(elsewhere / "y.npy"), expected, rtol=1e-4, atol=1e-4)


def test_artifacts_are_in_the_bucket_not_on_local_disk(trained):
    run_id = trained.run.info.run_id
    assert trained.run.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="mlflow/") for o in page.get("Contents", [])]
    run_keys = {k.split(f"{run_id}/artifacts/", 1)[1] for k in keys if f"/{run_id}/artifacts/" in k}
    assert {tracking.CONFIG_ARTIFACT, tracking.CURVES_ARTIFACT} <= run_keys
    model_files = {k.rsplit("/", 1)[1] for k in keys if "/models/" in k}
    assert {"MLmodel", "state_dict.pt", "config.yaml", "classes.json"} <= model_files
    # Nothing of MLflow's beside the training: only the job and Ray Train's checkpoints.
    assert sorted(p.name for p in trained.workdir.iterdir()) == ["job.yaml", "runs"]
    assert not list(trained.workdir.rglob("MLmodel"))


def test_a_finished_run_has_system_metrics_by_node_and_its_two_datasets(trained, stack, synth_data):
    metrics = trained.run.data.metrics
    assert {f"system/node_0/{name}" for name in SYSTEM} <= set(metrics)
    assert not [k for k in metrics if k.startswith("system/") and not k.startswith("system/node_0/")]
    assert not [k for k in metrics if "gpu" in k]  # no GPU on this machine
    manifest = read_manifest(synth_data)
    inputs = {i.tags[0].value: i.dataset for i in trained.run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    for context, split, samples in (("training", "train", 384), ("validation", "val", 128)):
        dataset = inputs[context]
        assert dataset.name == f"synthetic/{split}"
        assert dataset.digest == tracking.dataset_digest(manifest, split)
        assert json.loads(dataset.source) == {"uri": synth_data}
        assert json.loads(dataset.profile) == {"num_samples": samples, "num_classes": 4,
                                               "num_shards": samples // 128}
    assert inputs["training"].digest != inputs["validation"].digest
    # Another run on the same shards names the same data.
    with as_user(ALICE, stack.url):
        cfg = trained_config(trained)
        again = tracking.RunTracker.create_training(cfg, run_name="same shards", tags={},
                                                    manifest=manifest)
        again.finish()
        digests = {i.dataset.name: i.dataset.digest
                   for i in again.client.get_run(again.run_id).inputs.dataset_inputs}
    assert digests == {d.name: d.digest for d in inputs.values()}


def trained_config(trained: Trained) -> Any:
    from ran.config import load_config
    return load_config(str(trained.workdir / "job.yaml"), [])


def test_wrong_password_fails_at_once_without_starting_ray(trained, stack, tmp_path, capsys):
    refused = (f"error: MLflow server {stack.url} refused user 'alice' (401 Unauthorized): check "
               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    job = str(trained.workdir / "job.yaml")
    space = str(Path(__file__).resolve().parents[2] / "tune_spaces" / "optim.yaml")
    for verb in (["train", job], ["tune", space, "--job", job]):
        ray_tmp = Path(tempfile.mkdtemp(prefix="rt-"))
        try:
            env = user_env((ALICE[0], "not-her-password"), stack.url, RAY_TMPDIR=str(ray_tmp))
            done = run_ran(verb, env, tmp_path)
            started_ray = (ray_tmp / "ray").exists()
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert (done.returncode, done.stderr.strip()) == (2, refused), verb
        assert not started_ray, verb
    assert (trained.ray_tmp / "ray").is_dir()  # where the run that did start put its Ray
    with as_user((ALICE[0], "not-her-password"), stack.url):
        for verb in (["registry"], ["promote", MODEL, "--version", "1", "--alias", "x"],
                     ["eval", f"models:/{MODEL}/1", "--data", str(trained.workdir)]):
            assert main(verb) == 2
            assert capsys.readouterr().err.strip() == refused, verb


def test_no_login_no_permission_no_server_are_one_line_errors(trained, stack):
    cfg = trained_config(trained)
    with as_user(BOB, stack.url):
        with pytest.raises(PermissionError) as refused:
            tracking.check_server(experiment=cfg.tracking.experiment)
        assert main(["promote", MODEL, "--version", "1", "--alias", "bobs"]) == 2
    assert str(refused.value) == (
        f"MLflow server {stack.url}: user 'bob' has READ on experiment 'team', and writing there "
        "needs EDIT: ask its owner or an admin for EDIT, or set tracking.experiment to one of yours")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stack.url)
        mp.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        with pytest.raises(PermissionError) as anonymous:
            tracking.check_server()
    assert str(anonymous.value) == (f"MLflow server {stack.url} needs a login: set "
                                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    nothing = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as unreachable:
        tracking.check_server(nothing)
    assert str(unreachable.value) == (
        f"MLflow server {nothing} does not answer (ConnectionRefusedError): start it "
        "(cluster/tracking/README.md) or point MLFLOW_TRACKING_URI at a running one")


def test_the_database_as_the_tracking_uri_is_checked_first(trained, postgres, capsys):
    """MLFLOW_TRACKING_URI may name the database itself (as `mlflow server` is given it): the
    registry reads through it, and a database that does not answer is one line after one
    connection attempt (MLflow alone retries for about 2 minutes, then raises a traceback), the
    password shown as ***."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"{postgres}/mlflow")
        assert tracking.check_server() is None
        assert main(["registry", MODEL]) == 0
        assert re.search(rf"^{MODEL}\s+1\s", capsys.readouterr().out, re.M)
        closed = f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:{free_port()}/mlflow"
        mp.setenv("MLFLOW_TRACKING_URI", closed)
        assert main(["registry"]) == 2
    err = capsys.readouterr().err
    shown = closed.replace(DB_PASSWORD, "***")
    assert err.startswith(f"error: MLflow store {shown} does not answer (") and \
        err.rstrip().endswith("start the database, or set MLFLOW_TRACKING_URI to a store or server "
                              "that is up"), err
    assert len(err.strip().splitlines()) == 1 and DB_PASSWORD not in err


def parse_unlogged(text: str) -> dict[str, list[int]]:
    """The inverse of tracking.describe_unlogged (at most 6 steps a metric: no "and N more")."""
    found: dict[str, list[int]] = {}
    for part in text.split("; "):
        keys, steps = part.split(" at step")
        for key in keys.split(", "):
            found[key] = [int(s) for s in steps.lstrip("s ").split(", ")]
    return found


def opened_run(proc: subprocess.Popen) -> tuple[str | None, str]:
    """The MLflow run id ``ran train`` prints once its run is open and Ray is up, before any
    worker starts (``run directory ...; MLflow run <id> (...)``), read from its output as it comes
    (the event, not a poll), and the output read so far; None if it ended first."""
    read = []
    for line in proc.stdout:
        read.append(line)
        found = re.search(r"; MLflow run ([0-9a-f]{32}) \(", line)
        if found:
            return found.group(1), "".join(read)
    return None, "".join(read)


def test_server_gone_mid_run_training_finishes_and_says_what_was_not_logged(
        stack, synth_data, tiny_job, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "name": "outage", "tracking.experiment": EXPERIMENT}).to_yaml())  # steps 4, 8, .. 24
    with mlflow_server(stack.server_env, tmp_path / "b.log") as b:
        # MLflow's own retries (7, backing off to 2 min) would hold each call to the stopped
        # server for minutes; rank 0's logger retries by itself.
        env = user_env(ALICE, b, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        proc = subprocess.Popen([sys.executable, "-m", "ran.cli", "train", str(job)], cwd=tmp_path,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            run_id, before = opened_run(proc)
            assert run_id is not None, (before, proc.communicate())
        except BaseException:
            stop_tree(proc.pid)
            raise
    # Server B is gone from here on: the run is open, and every value training logs is lost.
    try:
        out, err = proc.communicate(timeout=600)
        out = before + out
    finally:
        stop_tree(proc.pid)
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "final validation:" in out and "after 2 epochs" in out
    assert sorted(p.name for p in (tmp_path / "runs").glob("outage*/epoch=*")) == \
        ["epoch=0001_step=0000012", "epoch=0002_step=0000024"]  # checkpoints as always
    lines = [line for line in out.splitlines() if line.startswith("not in MLflow:")]
    assert len(lines) == 1
    text = lines[0][len("not in MLflow:"):].strip().removesuffix(" (the server did not answer)")
    named = parse_unlogged(text)
    assert tracking.describe_unlogged(named) == text
    with as_user(ADMIN, stack.url):
        client = tracking.client()
        logged = {key: {m.step for m in client.get_metric_history(run_id, key)}
                  for key in named}
        status = client.get_run(run_id).info.status
    # Exactly what is missing: nothing named was logged, and all of the last epoch is named.
    assert {k: [s for s in steps if s in logged[k]] for k, steps in named.items()} == \
        {k: [] for k in named}
    for key in ("train/epoch", "train/loss", "eval/loss", "eval/top1", "eval/top5", "train/lr",
                "perf/epoch_time_s"):
        assert 24 in named.get(key, []), (key, text)  # epoch 2 ends at global step 24
    assert named["train/step_loss"][-1] == 24 and named["train/step_lr"][-1] == 24
    assert f"MLflow at {b} did not answer at the end" in out
    assert status == "RUNNING"  # the driver could not close it; --resume will


def test_no_password_on_any_command_line_while_the_server_starts(postgres, moto_server, tmp_path):
    """`ps` (what every local user can run) never shows the database or admin password while
    mlflow-server.sh upgrades the schema and starts the server."""
    import threading

    boto3.client("s3").create_bucket(Bucket="ps-check")
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"{postgres}/mlflow",
           "MLFLOW_AUTH_DATABASE_URI": f"{postgres}/mlflow_auth",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://ps-check/mlflow", "MLFLOW_S3_ENDPOINT_URL": moto_server,
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "RAN_MLFLOW_WORKERS": "1",
           "RAN_MLFLOW_BIN": str(BIN / "mlflow"), "TMPDIR": str(tmp_path)}
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            listing = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True)
            seen.update(line for line in listing.stdout.splitlines() if "mlflow" in line)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with mlflow_server(env, tmp_path / "server.log") as url:
            time.sleep(1.0)  # the workers, started once the server answers, are sampled too
            with as_user(ADMIN, url):  # the store the server took from its environment is ours
                tracking.client(url).create_experiment("ps-check")
    finally:
        stop.set()
        watcher.join()
    assert any(" db upgrade postgresql://mlflow@127.0.0.1:" in line for line in seen), seen
    assert any(" server --app-name basic-auth" in line for line in seen), seen
    leaked = [line for line in seen if DB_PASSWORD in line or ADMIN[1] in line]
    assert leaked == []
    import psycopg

    with psycopg.connect(f"{postgres}/mlflow") as db:
        assert ("ps-check",) in db.execute("SELECT name FROM experiments").fetchall()
