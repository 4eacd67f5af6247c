"""Starting and stopping the processes a test or a benchmark starts (servers, Ray nodes), with
psutil: one way for every fixture and benchmark (benchmarks/ put this folder on sys.path).

- ``local_server``: a server subprocess on 127.0.0.1 for a block, waited for until it answers,
  stopped with its descendants at the end; ``free_port``: a port for it.
- ``stop_tree`` / ``stop_processes``: SIGTERM, a grace period, SIGKILL, and a check that nothing
  is left.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil


def running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an exited process nobody reaped is gone for our purposes)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_processes(find: Callable[[], list[psutil.Process]], grace: float = 10.0,
                   poll: float = 0.1) -> list[psutil.Process]:
    """SIGTERM what ``find()`` returns and wait up to ``grace`` seconds (skipped when ``grace`` is
    0), then SIGKILL what is left plus what ``find()`` returns since (orphans of a killed parent no
    longer descend from it) and wait 5 s. Returns the processes still running."""
    procs: list[psutil.Process] = []
    steps = [(psutil.Process.terminate, grace)] if grace > 0 else []
    for send, wait in steps + [(psutil.Process.kill, 5.0)]:
        procs = list({p.pid: p for p in [*procs, *find()]}.values())
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                send(proc)
        deadline = time.monotonic() + wait
        while (procs := [p for p in procs if running(p)]) and time.monotonic() < deadline:
            time.sleep(poll)
        if not procs and not find():
            return []
    return procs


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


TRACKING = Path(__file__).resolve().parents[1] / "cluster" / "tracking"


@contextlib.contextmanager
def postgres_server(password: str, log: Path, timeout: float = 300.0) -> Iterator[str]:
    """PostgreSQL from cluster/tracking/postgres.sh on a free 127.0.0.1 port for the block, its
    data in a new temporary directory (not under pytest's: PostgreSQL runs as the postgres user,
    who cannot enter it), removed afterwards; yields ``postgresql://mlflow:PASSWORD@127.0.0.1:PORT``
    once its ``mlflow`` database takes a connection."""
    import shutil
    import tempfile

    import psycopg

    data = Path(tempfile.mkdtemp(prefix="ran-pg-"))
    port = free_port()
    base = f"postgresql://mlflow:{password}@127.0.0.1:{port}"

    def ready() -> bool:
        try:
            psycopg.connect(f"{base}/mlflow", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    env = {**os.environ, "RAN_PG_PASSWORD": password, "RAN_PG_PORT": str(port)}
    try:
        with local_server([str(TRACKING / "postgres.sh"), str(data)], port=port, ready=ready,
                          log=log, env=env, timeout=timeout):
            yield base
    finally:
        shutil.rmtree(data, ignore_errors=True)
