"""Reading what a run logged as the tests check them: every metric is logged at the global
optimizer step, and an epoch's metrics carry ``train/epoch`` at the same step (ran.tracking.runs)."""

from __future__ import annotations

from typing import Any


def _client(where: Any) -> Any:
    from mlflow.tracking import MlflowClient

    return where if isinstance(where, MlflowClient) else MlflowClient(where)


def history(where: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value of ``key``, by step; ``where`` a tracking URI or client."""
    return sorted((m.step, m.value) for m in _client(where).get_metric_history(run_id, key))


def epochs(where: Any, run_id: str, key: str) -> list[int]:
    """The epoch each value of ``key`` belongs to, by step: the ``train/epoch`` metric logged at the
    value's step (a value at a step with no epoch fails the lookup: it is not an epoch metric)."""
    epoch_at = {step: int(value) for step, value in history(where, run_id, "train/epoch")}
    return [epoch_at[step] for step, _ in history(where, run_id, key)]
