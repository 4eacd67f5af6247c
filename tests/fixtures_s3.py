"""The shared S3 endpoint for integration tests: a real ``moto_server`` subprocess on loopback.

``moto_server`` (session-scoped) starts ``moto_server`` on a free 127.0.0.1 port, sets
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID=testing, AWS_SECRET_ACCESS_KEY=testing and
AWS_DEFAULT_REGION=us-east-1 in ``os.environ`` for the session (restored afterwards), yields the
endpoint URL, and stops the server at the end. ``enforce_s3_auth(url)`` makes the server check
credentials (so the dummy keys are rejected) until the context exits.
"""

from __future__ import annotations

import contextlib
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

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto_server at {url} did not answer within {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint (``moto_server``) on 127.0.0.1 for the session; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    binary = Path(sys.executable).parent / "moto_server"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, **S3_ENV}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _stop(proc)


@contextlib.contextmanager
def enforce_s3_auth(url: str) -> Iterator[None]:
    """Within the block the server checks signatures against its IAM users: unknown keys get 403."""
    def set_count(count: str) -> None:
        request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")
