"""Shared fixtures for integration tests: the real services on loopback, small and shut down after.

- ``ray_local``: one local Ray for the session (2 CPUs, dashboard on: Ray Train V2's placement-group
  cleaner polls the State API it serves; ``RAY_ADDRESS`` names it meanwhile, so State API calls
  find it among other developers' Ray instances); shut down at the end.
- ``mlflow_sqlite``: ``MLFLOW_TRACKING_URI`` pointing at a fresh sqlite file in ``tmp_path`` (and the
  working directory moved there, so nothing lands in the checkout).
- ``mlflow_server``: an ``mlflow server`` subprocess on a free 127.0.0.1 port for the session.
- ``synth_data``: a tiny synthetic shard set (4 classes, 16x16 px) written once per session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group started for ``proc``, SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A local Ray (2 CPUs) for the whole session; yields its address for subprocesses."""
    from ran.train.launch import start_local_ray, stop_local_ray

    saved = os.environ.get("RAY_ADDRESS")
    address = start_local_ray(num_cpus=2, include_dashboard=True, dashboard_port=free_port())
    try:
        yield address
    finally:
        stop_local_ray()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture
def mlflow_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``MLFLOW_TRACKING_URI`` = a fresh sqlite store in ``tmp_path`` (also the working directory)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120, proc=proc)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 classes of 16x16 synthetic images: 384 train, 128 val, in shards of 128."""
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), classes=4, train=384, val=128, size=16, seed=0,
                    samples_per_shard=128, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_job():
    """Factory of tiny training jobs: ``tiny_job(data, storage, **{"dotted.key": value})``."""
    from ran.config import load_config

    def make(data: str, storage: str | Path, **overrides):
        base = {
            "name": "tiny", "model.name": "attention56", "model.stem": "cifar",
            "data.path": data, "data.batch_size": 16, "data.workers": 1, "data.crop": 16,
            "optim.lr": 0.1, "optim.reference_batch_size": 32, "schedule.kind": "cosine",
            "train.epochs": 2, "train.log_every": 4, "scaling.num_workers": 2,
            "scaling.max_failures": 1, "storage.path": str(storage),
            "tracking.registered_model": None, "tracking.log_model": False,
        }
        return load_config(None, {**base, **overrides})

    return make


# The S3 endpoint (`moto_server`, session-scoped: yields its URL, sets AWS_* for the session) is
# shared by all integration tests; it lives in tests/fixtures_s3.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_s3 import moto_server  # noqa: E402,F401
