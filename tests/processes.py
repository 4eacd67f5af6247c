"""Stopping the processes a test started (servers, Ray nodes), with psutil: one way for every
fixture."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

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
