"""Fault injection for tests (not shipped in ``ran``): kill a worker, its node or the driver from
outside, or send a worker the SIGTERM of a spot reclaim, as a node failure or a crashed laptop
would.

:class:`KillWorker` is a Ray Train controller callback (a ``ReportCallback``, Ray Train V2's
DeveloperAPI): it runs on the controller, not in the training loop. After the report of epoch
``after_epoch`` (or of optimizer step ``after_step``, a step-cadence checkpoint) has been handled
(the controller's checkpoint manager sees each report before other callbacks, so that report's
checkpoint is registered), it acts on

- rank ``rank``'s process, found by the ``worker_pid`` every worker reports: SIGKILL (``signal``
  ``KILL``, a crash), and the worker group fails and Ray Train restarts it from that checkpoint. No
  later checkpoint can be registered first: a report is registered only once every rank made it,
  and the killed rank makes no more.
  With ``signal`` ``TERM`` it sends SIGTERM instead and returns: the worker group checkpoints at
  its next step boundary and stops for a restart (:class:`ran.train.raytrain.SigtermNotice`).
- or rank ``rank``'s node (``target="node"``): its worker and the raylet that started it (the
  worker's parent), SIGKILLed, as a lost machine. The rank chosen is ``rank``, unless that one
  runs on the controller's own node: then the lowest rank that does not. Without its raylet the
  node's resources leave the cluster, so an elastic group continues with fewer workers.
- or the driver (``target="driver"``, the ``ran train`` process). The callback then holds the
  controller until Ray ends it with its owner, so nothing after that report is registered, and
  ``--resume`` continues from exactly that checkpoint.

A marker file makes the fault happen once per run, across restarts.

In this process: ``Launcher(cfg, callbacks=[KillWorker(Fault(...))])``. In a ``ran train``
subprocess: the environment of :func:`fault_env`, through which Ray Train itself builds the
callback (``RAY_TRAIN_CALLBACKS``, read when ``fit`` starts) from ``RAN_FAIL_*``.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray.cloudpickle
from ray.train.v2._internal.execution.callback import ReportCallback  # DeveloperAPI (2.60)

# The callback travels to Ray Train's controller by value: its process need not find this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TARGETS = ("worker", "node", "driver")
SIGNALS = ("KILL", "TERM")


@dataclass(frozen=True)
class Fault:
    """Act on rank ``rank`` (its process or node) or the driver once, right after the report of
    epoch ``after_epoch`` or, when that is 0, of optimizer step ``after_step``."""

    after_epoch: int = 0  # 1-based; 0: after_step decides
    rank: int = 0  # the worker (target "worker") or whose node (target "node")
    marker: str = str(Path(tempfile.gettempdir()) / "ran-fault-marker")
    target: str = "worker"  # "worker", "node" or "driver"
    driver_pid: int = 0  # the driver's process (target "driver"); taken where the Fault is made
    after_step: int = 0  # the optimizer step whose report triggers it (when after_epoch is 0)
    signal: str = "KILL"  # target "worker": KILL (a crash) or TERM (a notice: spot reclaim)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"fault target {self.target!r}: one of {', '.join(TARGETS)}")
        if self.signal not in SIGNALS:
            raise ValueError(f"fault signal {self.signal!r}: one of {', '.join(SIGNALS)}")
        if (self.after_epoch > 0) == (self.after_step > 0):
            raise ValueError("a fault needs one of after_epoch or after_step (>= 1)")

    @classmethod
    def from_env(cls) -> "Fault | None":
        """``RAN_FAIL_AFTER_EPOCH`` or ``RAN_FAIL_AFTER_STEP`` [+ ``RAN_FAIL_RANK``,
        ``RAN_FAIL_TARGET``, ``RAN_FAIL_SIGNAL``, ``RAN_FAIL_MARKER``] (:func:`fault_env`), or
        None. Call it in the driver: a driver fault kills the calling process."""
        epoch, step = os.environ.get("RAN_FAIL_AFTER_EPOCH"), os.environ.get("RAN_FAIL_AFTER_STEP")
        if not (epoch or step):
            return None
        return cls(after_epoch=int(epoch or 0), after_step=int(step or 0),
                   rank=int(os.environ.get("RAN_FAIL_RANK", "0")),
                   marker=os.environ.get("RAN_FAIL_MARKER") or cls.marker,
                   target=os.environ.get("RAN_FAIL_TARGET", "worker"),
                   signal=os.environ.get("RAN_FAIL_SIGNAL", "KILL"), driver_pid=os.getpid())

    def due(self, report: dict[str, Any]) -> bool:
        """Whether ``report`` (rank ``rank``'s) is the one this fault follows."""
        if self.after_epoch:
            return int(report.get("epoch", -1)) == self.after_epoch and _epoch_end(report)
        return int(report.get("step", -1)) == self.after_step

    @property
    def when(self) -> str:
        return f"epoch {self.after_epoch}" if self.after_epoch else f"step {self.after_step}"


def _epoch_end(report: dict[str, Any]) -> bool:
    """An epoch's report (it has train/loss), not a mid-epoch checkpoint's."""
    return "train/loss" in report


def fault_env(**fault: str) -> dict[str, str]:
    """Environment variables that make a ``ran train`` subprocess carry out a :class:`Fault`
    (``after_epoch="1"``, ``target="driver"``, ...: ``RAN_FAIL_<KEY>``): Ray Train builds
    :class:`KillWorker` from them (``RAY_TRAIN_CALLBACKS``), importing this module, which
    ``PYTHONPATH`` then finds."""
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {"RAY_TRAIN_CALLBACKS": f"{Path(__file__).stem}.KillWorker", "PYTHONPATH": path,
            **{f"RAN_FAIL_{k.upper()}": str(v) for k, v in fault.items()}}


class KillWorker(ReportCallback):
    """The Ray Train callback that carries out a :class:`Fault` (default: the environment's,
    :meth:`Fault.from_env`, when Ray Train builds it from ``RAY_TRAIN_CALLBACKS``)."""

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault or Fault.from_env()

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        if self.fault is None:
            return
        f = self.fault
        marker = Path(f.marker)
        if marker.exists() or f.rank >= len(metrics) or not f.due(metrics[f.rank]):
            return
        if f.target == "driver":
            marker.write_text(f"driver (pid {f.driver_pid}) killed after {f.when}\n")
            psutil.Process(f.driver_pid).kill()
            while True:  # hold the controller until Ray ends it with its owner
                time.sleep(1.0)
        if f.target == "node":
            self._kill_node(metrics, marker)
            return
        pid = int(metrics[f.rank]["worker_pid"])
        process = psutil.Process(pid)
        if f.signal == "TERM":
            marker.write_text(f"rank {f.rank} (pid {pid}) sent SIGTERM after {f.when}\n")
            process.send_signal(signal.SIGTERM)
            return
        marker.write_text(f"rank {f.rank} (pid {pid}) killed after {f.when}\n")
        process.kill()
        process.wait(30)

    def _kill_node(self, metrics: list[dict[str, Any]], marker: Path) -> None:
        """SIGKILL a worker and its raylet (not the controller's node: that would end the run)."""
        f = self.fault
        own = psutil.Process().parent().pid  # the raylet of the controller's node
        ranks = [f.rank, *(r for r in range(len(metrics)) if r != f.rank)]
        for rank in ranks:
            worker = psutil.Process(int(metrics[rank]["worker_pid"]))
            raylet = worker.parent()
            if raylet is not None and raylet.pid != own:
                break
        else:
            raise RuntimeError("fault target node: every worker runs on the controller's node")
        marker.write_text(f"rank {rank} (pid {worker.pid}) and its node's raylet (pid {raylet.pid}) "
                          f"killed after {f.when}\n")
        raylet.kill()
        worker.kill()
        worker.wait(30)
