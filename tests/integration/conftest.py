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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_s3 import S3_ENV  # noqa: E402
from processes import running, stop_processes  # noqa: E402


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM ``pid`` and all its descendants, SIGKILL those left after ``grace`` seconds; raises
    if any is still running after that."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    left = stop_processes(lambda: [p for p in tree if running(p)], grace)
    if left:
        raise RuntimeError(f"processes survived SIGKILL: {[p.pid for p in left]}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(argv: list[str], *, port: int, ready: str | Callable[[], bool], log: Path,
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> Iterator[str]:
    """Run ``argv`` (a server told to listen on 127.0.0.1:``port``) for the block; yields
    ``http://127.0.0.1:PORT`` once GET ``ready`` (a path) answers 200, or the callable ``ready``
    returns True (servers that do not speak HTTP); ``env``: its environment (default: ours). Its output goes to ``log``;
    a server that exits or does not answer in ``timeout`` seconds fails with the log's tail. At the
    end it and its descendants are stopped."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        # A session of its own: Ctrl-C in the terminal reaches pytest, which then stops the server.
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not (ready() if callable(ready) else _answers(f"{url}{ready}")):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited with {proc.returncode}" if proc.poll() is not None else \
                    f"did not answer at {url}{ready} within {timeout:.0f}s"
                raise RuntimeError(f"{Path(argv[0]).name} {what}; {log}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop_tree(proc.pid)
        proc.wait(5)


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
