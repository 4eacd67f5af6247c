"""One training run on Ray Train.

- :mod:`ran.train.schedule` — the run plan and lr schedules (imports no Ray).
- :mod:`ran.train.trainer` — the per-worker :class:`~ran.train.trainer.Trainer` (no Ray, no MLflow).
- :mod:`ran.train.raytrain` — the Ray glue: what Ray Train runs on every worker.
- :mod:`ran.train.launch` — the :class:`~ran.train.launch.Launcher`: pre-flight -> open run ->
  fit -> finalize (:func:`~ran.train.launch.run_training`).
- :mod:`ran.train.rundir` — run directories and ``--resume``.
- :mod:`ran.train.localray` — an address, or a local Ray for one job.

Nothing is imported here eagerly, so ``import ran.train.schedule`` does not import Ray.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Launcher": "ran.train.launch",
    "run_training": "ran.train.launch",
    "TrainOutcome": "ran.train.launch",
    "Trainer": "ran.train.trainer",
    "plan_run": "ran.train.schedule",
    "RunPlan": "ran.train.schedule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ran.train' has no attribute {name!r}")
