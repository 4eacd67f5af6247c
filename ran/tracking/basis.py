"""What a recorded top-1 was measured on, by content.

Two recorded top-1 values are comparable when they were measured on the same validation data.
"The same data" is the digest of the validation split as its manifest describes it
(:func:`ran.tracking.runs.dataset_digest`: dataset, classes and each shard's name, sample count
and size), which every training run logs as its MLflow dataset input of context ``validation``.
The digest does not depend on where the shards lie, so a moved checkout or a copy of the shards
on S3 compares as the same data; a path comparison would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ran.tracking import store
from ran.tracking.names import DATASET_CONTEXTS, METRIC_TAGS, version_metric

VALIDATION = DATASET_CONTEXTS[1]
TOP1 = METRIC_TAGS[0]


@dataclass(frozen=True)
class Basis:
    """The validation data a top-1 was measured on.

    ``digest``: the split's content digest (16 hex characters), None for a run that logged no
    dataset input; ``where``: ``<source> [<split>]``, for messages only (never compared).
    """

    digest: str | None
    where: str

    def same_data(self, other: "Basis") -> bool:
        """Whether both were measured on the same validation data (equal, known digests)."""
        return self.digest is not None and self.digest == other.digest


def run_basis(run_id: str | None) -> Basis:
    """The validation data of training run ``run_id``, from its logged dataset inputs.

    Returns ``Basis(None, "?")`` for None or a run that logged no validation dataset.

    Raises:
        mlflow.exceptions.MlflowException: no such run.
    """
    if not run_id:
        return Basis(None, "?")
    run = store.client().get_run(run_id)
    params = run.data.params
    where = f"{params.get('data.path', '?')} [{params.get('data.val_split', '?')}]"
    # ^ the run's own path: MLflow keeps one dataset row per experiment, name and digest, whose
    # source is where the first run found it.
    for entry in (run.inputs.dataset_inputs if run.inputs else []) or []:
        contexts = {t.key: t.value for t in entry.tags or []}
        if contexts.get("mlflow.data.context") == VALIDATION:
            return Basis(entry.dataset.digest, where)
    return Basis(None, where)


def recorded_top1(mv: Any) -> float | None:
    """The top-1 recorded with registered version ``mv`` (its ``eval/top1`` tag, or the
    ``val_top1`` of a version registered before the metric scheme), None if absent or not a
    finite number."""
    text = version_metric(mv.tags or {}, TOP1)
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def best_on(versions: list[Any], basis: Basis) -> tuple[Any, float] | None:
    """Of registered ``versions``, the one with the highest recorded top-1 measured on the same
    data as ``basis`` (ties: the oldest), with that top-1; None when no version qualifies."""
    best = None
    for mv in sorted(versions, key=lambda v: int(v.version)):
        top1 = recorded_top1(mv)
        if top1 is None or not run_basis(mv.run_id).same_data(basis):
            continue
        if best is None or top1 > best[1]:
            best = (mv, top1)
    return best
