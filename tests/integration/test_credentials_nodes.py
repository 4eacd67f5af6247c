"""How the AWS cluster's nodes get MLflow server credentials: cluster/aws-gpu.yaml's setup command,
run as a node runs it (bash, the node's HOME), against a real Secrets Manager endpoint
(``moto_server``), writes ~/.mlflow/credentials where MLflow reads it, readable by its owner only;
without the secret it says so and setup goes on."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def node_shell(command: str, home: Path) -> subprocess.CompletedProcess:
    """``bash -c command`` as a node runs a setup command: its own HOME, `python` on PATH, no
    MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_aws_setup_command_writes_mlflow_credentials_from_secrets_manager(moto_server,
                                                                              tmp_path: Path):
    import boto3

    aws = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    (command,) = [c for c in aws["setup_commands"] if ".mlflow" in c]
    home = tmp_path / "home"
    home.mkdir()
    credentials = home / ".mlflow" / "credentials"

    missing = node_shell(command, home)
    assert (missing.returncode, missing.stdout) == \
        (0, "no secret ran/mlflow readable: MLflow without credentials\n")
    assert "ResourceNotFoundException" in missing.stderr  # what was missing, in the setup log
    assert not credentials.exists()

    user, password = f"node-user-{secrets.token_hex(4)}", f"node-password-{secrets.token_hex(8)}"
    boto3.client("secretsmanager", region_name=aws["provider"]["region"]).create_secret(
        Name="ran/mlflow", SecretString=json.dumps({"username": user, "password": password}))
    written = node_shell(command, home)
    assert (written.returncode, written.stdout, written.stderr) == (0, "", "")
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials.parent.stat().st_mode) == 0o700
    assert password not in written.stdout + written.stderr

    # MLflow finds them there: what its REST client sends to the tracking server.
    read = node_shell(f"{BIN / 'python'} -c 'from mlflow.utils.credentials import "
                      f"get_default_host_creds as c; h = c(\"http://mlflow:5000\"); "
                      f"print(h.username, h.password)'", home)
    assert (read.returncode, read.stdout) == (0, f"{user} {password}\n"), read.stderr


def test_the_checkpoint_filesystem_carries_no_keys_to_the_workers(moto_server, tiny_job, tmp_path,
                                                                  monkeypatch):
    """With an S3 endpoint of its own (MinIO, moto), the run storage's filesystem is pickled to
    every Ray Train worker: it holds none of the driver's keys, and a process that unpickles it
    uses its own credentials (here its environment's) to write checkpoints."""
    import pickle

    import boto3

    from ran.train.rundir import storage_for

    keys = {"AWS_ACCESS_KEY_ID": "AKIADRIVERKEY0000001", "AWS_SECRET_ACCESS_KEY": "driver-secret-xyz",
            "AWS_SESSION_TOKEN": "driver-session-token-xyz"}
    for key, value in keys.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="no-keys")
    storage = storage_for(tiny_job("data", "s3://no-keys/runs"), resume=False)
    pickled = pickle.dumps(storage.filesystem)
    assert not [v for v in keys.values() if v.encode() in pickled]
    blob = tmp_path / "fs.pkl"
    blob.write_bytes(pickled)
    worker = subprocess.run([sys.executable, "-c", (
        "import pickle\n"
        "import pyarrow.fs\n"
        f"fs = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        "with fs.open_output_stream('no-keys/runs/probe.txt') as out:\n"
        "    out.write(b'written by a worker')\n"
        "del fs, out\n"
        "pyarrow.fs.finalize_s3()\n")],
        env={**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWORKERKEY0000001",
             "AWS_SECRET_ACCESS_KEY": "worker-secret"}, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr[-2000:]
    body = boto3.client("s3", endpoint_url=moto_server).get_object(Bucket="no-keys", Key="runs/probe.txt")
    assert body["Body"].read() == b"written by a worker"
