"""Fault injection for tests and drills: kill a worker or the driver from outside, as a node
failure or a crashed laptop would.

:class:`KillWorker` is a Ray Train ``UserCallback``: it runs on the controller, not in the
training loop. After the report of epoch ``after_epoch`` has been handled (the controller's
checkpoint manager sees each report before user callbacks, so that epoch's checkpoint is
registered), it sends SIGKILL to

- rank ``rank``'s process, found by the ``worker_pid`` every worker reports. The worker group
  fails and Ray Train restarts it from that checkpoint. No later checkpoint can be registered
  first when two or more epochs remain: a worker holds at most one unread report (Ray Train's
  result queue has size 1) and blocks on the next.
- or the driver (``target="driver"``, the ``ran train`` process). The callback then holds the
  controller until Ray ends it with its owner, so nothing after that epoch is registered, and
  ``--resume`` continues from exactly that checkpoint.

A marker file makes the fault happen once per run, across restarts. ``ran train`` installs it
from ``RAN_FAIL_AFTER_EPOCH`` (+ ``RAN_FAIL_RANK``, ``RAN_FAIL_TARGET``, ``RAN_FAIL_MARKER``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from ray.train import UserCallback


@dataclass(frozen=True)
class Fault:
    """Kill rank ``rank`` (or the driver) once, right after epoch ``after_epoch``'s report."""

    after_epoch: int  # 1-based
    rank: int = 0  # the worker to kill (target "worker")
    marker: str = str(Path(tempfile.gettempdir()) / "ran-fault-marker")
    target: str = "worker"  # "worker" or "driver"
    driver_pid: int = 0  # the driver's process (target "driver"); taken where the Fault is made

    @classmethod
    def from_env(cls) -> "Fault | None":
        """``RAN_FAIL_AFTER_EPOCH`` [+ ``RAN_FAIL_RANK``, ``RAN_FAIL_TARGET``, ``RAN_FAIL_MARKER``],
        or None. Call it in the driver: a driver fault kills the calling process."""
        if not os.environ.get("RAN_FAIL_AFTER_EPOCH"):
            return None
        target = os.environ.get("RAN_FAIL_TARGET", "worker")
        if target not in ("worker", "driver"):
            raise ValueError(f"RAN_FAIL_TARGET={target!r}: worker or driver")
        return cls(int(os.environ["RAN_FAIL_AFTER_EPOCH"]), int(os.environ.get("RAN_FAIL_RANK", "0")),
                   os.environ.get("RAN_FAIL_MARKER") or cls.marker, target, os.getpid())


class KillWorker(UserCallback):
    """The Ray Train callback that carries out a :class:`Fault`."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        f = self.fault
        marker = Path(f.marker)
        if marker.exists() or f.rank >= len(metrics):
            return
        if int(metrics[f.rank].get("epoch", -1)) != f.after_epoch:
            return
        if f.target == "driver":
            marker.write_text(f"driver (pid {f.driver_pid}) killed after epoch {f.after_epoch}\n")
            psutil.Process(f.driver_pid).kill()
            while True:  # hold the controller until Ray ends it with its owner
                time.sleep(1.0)
        pid = int(metrics[f.rank]["worker_pid"])
        marker.write_text(f"rank {f.rank} (pid {pid}) killed after epoch {f.after_epoch}\n")
        process = psutil.Process(pid)
        process.kill()
        process.wait(30)
