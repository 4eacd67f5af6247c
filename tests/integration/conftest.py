"""Shared fixtures for integration tests: the real services on loopback, small and shut down after.

- ``ray_local``: one local Ray for the session (2 CPUs, dashboard on: Ray Train V2's placement-group
  cleaner polls the State API it serves; ``RAY_ADDRESS`` names it meanwhile, so State API calls
  find it among other developers' Ray instances); shut down at the end.
- ``mlflow_sqlite``: ``MLFLOW_TRACKING_URI`` pointing at a fresh sqlite file in ``tmp_path`` (and the
  working directory moved there, so nothing lands in the checkout).
- ``mlflow_server``: an ``mlflow server`` subprocess (fresh sqlite store, proxied artifacts) for the
  session; yields its URL.
- ``serve_mlflow``: ``serve_mlflow(store_uri, root) -> URL``, an ``mlflow server`` over a store a
  test already has, stopped when the test ends.
- ``moto_server``: an S3 endpoint (``moto_server`` subprocess) for the session; yields its URL, with
  AWS_ENDPOINT_URL and dummy credentials (``fixtures_s3.S3_ENV``) set for the session.
- ``synth_data``: a tiny synthetic shard set (4 classes, 16x16 px) written once per session.

Every server goes through ``local_server``: a subprocess on a free 127.0.0.1 port, waited for
until it answers, stopped with its descendants (found with psutil) at the end. The job factory
``tiny_job`` is in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_s3 import S3_ENV  # noqa: E402
from processes import free_port, local_server, stop_tree  # noqa: E402, F401 (tests import them from here)


def mlflow_server_argv(store_uri: str, port: int, artifacts: Path | None = None) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port`` over ``store_uri``, one worker; artifacts proxied
    to ``artifacts`` when given."""
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", store_uri, "--workers", "1"]
    return argv + (["--artifacts-destination", str(artifacts)] if artifacts else [])


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A local Ray (2 CPUs) for the whole session; yields its address for subprocesses."""
    from ran.train.localray import LocalRay

    with LocalRay(num_cpus=2, include_dashboard=True, dashboard_port=free_port()) as local:
        yield local.address


@pytest.fixture
def mlflow_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``MLFLOW_TRACKING_URI`` = a fresh sqlite store in ``tmp_path`` (also the working directory)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 (fresh sqlite store, proxied artifacts); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = mlflow_server_argv(f"sqlite:///{root}/mlflow.db", port, artifacts=root / "artifacts")
    with local_server(argv, port=port, ready="/health", log=root / "server.log", cwd=root) as url:
        yield url


@pytest.fixture
def serve_mlflow() -> Iterator[Callable[[str, Path], str]]:
    """``serve_mlflow(store_uri, root) -> URL``: an ``mlflow server`` over an existing store,
    running in ``root`` (its log there too) until the test ends."""
    with contextlib.ExitStack() as stack:
        def serve(store_uri: str, root: Path) -> str:
            port = free_port()
            return stack.enter_context(local_server(
                mlflow_server_argv(store_uri, port), port=port, ready="/health",
                log=Path(root) / f"mlflow-server-{port}.log", cwd=Path(root)))

        yield serve


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint (``moto_server``) on 127.0.0.1 for the session; yields its URL and sets
    AWS_ENDPOINT_URL and the dummy credentials of ``S3_ENV`` until the session ends."""
    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with local_server(argv, port=port, ready="/moto-api/", log=root / "moto.log") as url, \
            pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": url, **S3_ENV}.items():
            mp.setenv(key, value)
        yield url


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 classes of 16x16 synthetic images: 384 train, 128 val, in shards of 128."""
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), classes=4, train=384, val=128, size=16, seed=0,
                    samples_per_shard=128, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def train_registered(ray_local: str, synth_data: str, tiny_job,
                     tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], dict]:
    """``train_registered(name, model)``: the tiny job ``name`` (experiment ``name``) trained on
    ``synth_data`` into its own sqlite store and registered as ``model`` version 1; returns
    ``{"uri", "root", "outcome", "data"}`` (the store's URI, its directory, the TrainOutcome, the
    shards)."""
    from ran.train.launch import run_training

    def train(name: str, model: str) -> dict:
        root = tmp_path_factory.mktemp(name)
        uri = f"sqlite:///{root}/mlflow.db"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.chdir(root)
            outcome = run_training(tiny_job(synth_data, root / "runs", **{
                "name": name, "tracking.experiment": name, "tracking.registered_model": model,
                "tracking.log_model": True}))
        assert outcome.registered == f"{model}/1"
        return {"uri": uri, "root": root, "outcome": outcome, "data": synth_data}

    return train
