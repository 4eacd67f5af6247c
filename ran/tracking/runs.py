"""Runs: one training run (:class:`RunTracker`), its metrics off the training path
(:class:`RunLogger`), its curves, and the runs that are not training runs (evaluation,
explanation, a search and its trials).

A :class:`RunTracker` is addressed by run id, so the driver, rank 0 of any worker group and a
resumed driver all write to the same run. Metrics are logged with a step (the global optimizer
step for ``step_*`` metrics, the epoch for epoch metrics) and never twice for the same step: after
a restart from a checkpoint, steps that were already logged are skipped, so MLflow holds each
epoch exactly once.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ran.tracking import store
from ran.tracking.names import (
    CONFIG_ARTIFACT, CURVES_ARTIFACT, TAG_KIND, TAG_METRICS_GAP, TAG_PARENT, TAG_SEARCH,
    TAG_STORAGE, TAG_TRIAL,
)

if TYPE_CHECKING:
    from ran.config import JobConfig


class RunTracker:
    """One MLflow run addressed by id; safe to create in any process (driver or rank 0)."""

    def __init__(self, run_id: str, uri: str | None = None) -> None:
        self.run_id = run_id
        self.uri = uri or store.tracking_uri()
        self.client = store.client(self.uri)
        self._last_step: dict[str, int] | None = None

    # -- creating and finding runs

    @classmethod
    def create(cls, experiment: str, *, run_name: str, tags: dict[str, str],
               uri: str | None = None) -> "RunTracker":
        """Start a new run in ``experiment`` (created if missing) with ``tags``."""
        experiment_id = store.ensure_experiment(experiment, uri)
        run = store.client(uri).create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(run.info.run_id, uri)

    @classmethod
    def create_training(cls, cfg: "JobConfig", *, run_name: str, tags: dict[str, str],
                        uri: str | None = None) -> "RunTracker":
        """A training run: params are the flattened config, ``config.yaml`` its artifact."""
        tracker = cls.create(cfg.tracking.experiment, run_name=run_name, tags=tags, uri=uri)
        tracker.log_params(cfg.flat())
        tracker.log_text(cfg.to_yaml(), CONFIG_ARTIFACT)
        return tracker

    @classmethod
    def find(cls, experiment: str, storage: str, uri: str | None = None) -> "RunTracker | None":
        """The newest run of ``experiment`` tagged with Ray Train storage ``storage``, if any."""
        mlflow_client = store.client(uri)
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is None:
            return None
        escaped = storage.replace("'", "\\'")
        runs = mlflow_client.search_runs([found.experiment_id], f"tags.`{TAG_STORAGE}` = '{escaped}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
        return cls(runs[0].info.run_id, uri) if runs else None

    @property
    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def tag(self, key: str) -> str | None:
        """The run's tag ``key``, or None."""
        return self.client.get_run(self.run_id).data.tags.get(key)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set tags (values as strings)."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def reopen(self) -> None:
        """Mark a run that was interrupted (driver killed, failed) as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(self.run_id, status=status)

    # -- params, metrics, artifacts

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values as strings); a key already logged with the same value is fine."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)) for k, v in params.items() if existing.get(k) != str(v)]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, directory: str | None = None) -> None:
        """Upload a local file under ``directory`` of the run's artifacts."""
        self.client.log_artifact(self.run_id, str(path), directory)

    def last_steps(self) -> dict[str, int]:
        """Highest step logged so far for each metric of the run (read once, then kept)."""
        if self._last_step is None:
            metrics = self.client.get_run(self.run_id).data.metrics
            self._last_step = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in metrics
            }
        return self._last_step

    def log_metrics(self, metrics: dict[str, float], step: int) -> int:
        """Log ``metrics`` at ``step``, skipping any key already logged at this or a later step.

        Returns the number of values logged. This is what keeps a run restarted from a checkpoint
        free of duplicated epochs: the replayed epochs' values were logged before the failure.
        """
        from mlflow.entities import Metric

        last = self.last_steps()
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step > last.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                last[m.key] = step
        return len(fresh)

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of a metric, sorted by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_curves(self) -> None:
        """Draw ``training_curves.png`` (loss, top-1/top-5, lr) from the run's history: once, at
        the end of a run, by the driver (never on the training path)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CURVES_ARTIFACT
            plot_curves({k: self.history(k) for k in
                         ("train_loss", "val_loss", "val_top1", "val_top5", "step_lr", "lr")}, path)
            self.log_artifact(path)


class RunLogger:
    """Rank 0's metrics, params and tags, written to MLflow from a background thread: the
    training loop only enqueues (microseconds), so no rank waits on MLflow I/O at the ``report``
    barrier.

    Writes that fail (the server went away) are retried, in order, every second; metric values
    still unlogged after ``retry_s`` seconds are dropped and counted. The count is reported on the
    run as the ``ran.metrics_gap`` tag once the server answers again, and on stderr at once.
    """

    def __init__(self, run_id: str, uri: str | None = None, retry_s: float = 600.0) -> None:
        self.run_id, self.uri, self.retry_s = run_id, uri, retry_s
        self.dropped = 0  # metric values given up on
        self._queue: queue.Queue[tuple[str, Any, int, float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ran-mlflow", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (see :meth:`RunTracker.log_metrics`); returns at once."""
        self._queue.put(("metrics", dict(metrics), step, time.monotonic()))

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (see :meth:`RunTracker.log_params`); returns at once."""
        self._queue.put(("params", dict(params), 0, time.monotonic()))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue tags; returns at once."""
        self._queue.put(("tags", dict(tags), 0, time.monotonic()))

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued (waiting up to ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self, tracker: RunTracker, kind: str, payload: Any, step: int) -> None:
        if kind == "metrics":
            tracker.log_metrics(payload, step)
        elif kind == "params":
            tracker.log_params(payload)
        else:
            tracker.set_tags(payload)

    def _run(self) -> None:
        tracker: RunTracker | None = None
        pending: list[tuple[str, Any, int, float]] = []
        done = reported = False
        while not done or pending:
            try:
                item = self._queue.get(timeout=1.0 if pending else None)
                while True:  # take everything queued, then write it in order
                    if item is None:
                        done = True
                    else:
                        pending.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                tracker = tracker or RunTracker(self.run_id, self.uri)
                while pending:
                    self._write(tracker, *pending[0][:3])
                    pending.pop(0)
                if self.dropped and not reported:
                    tracker.set_tags({TAG_METRICS_GAP: f"{self.dropped} metric values not logged"})
                    reported = True
            except Exception as err:  # noqa: BLE001 - MLflow unreachable: training goes on
                now = time.monotonic()
                lost = pending if done else [p for p in pending if now - p[3] > self.retry_s]
                if lost:
                    self.dropped += sum(len(p[1]) for p in lost if p[0] == "metrics")
                    pending = [p for p in pending if p not in lost]
                    reported = False
                    print(f"warning: MLflow at {self.uri}: {type(err).__name__}: {err}; "
                          f"{self.dropped} metric values not logged so far", file=sys.stderr)
                if not done:
                    time.sleep(1.0)


# ---------------------------------------------------------------------------------------------
# Curves


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Three panels: loss per epoch, top-1/top-5 per epoch, lr per step (or per epoch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _panel(axes[0], series, ("train_loss", "val_loss"), "loss", "epoch")
    _panel(axes[1], series, ("val_top1", "val_top5"), "accuracy", "epoch")
    lr_key = "step_lr" if series.get("step_lr") else "lr"
    _panel(axes[2], series, (lr_key,), "learning rate", "step" if lr_key == "step_lr" else "epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _panel(ax: Any, series: dict[str, list[tuple[int, float]]], keys: Iterable[str],
           title: str, xlabel: str) -> None:
    for key in keys:
        points = series.get(key) or []
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50
                    else None, label=key)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


# ---------------------------------------------------------------------------------------------
# Runs that are not training runs


@contextlib.contextmanager
def linked_run(experiment: str, *, kind: str, run_name: str, tags: dict[str, str],
               params: dict[str, Any] | None = None) -> Iterator[RunTracker]:
    """A new run (``ran.kind`` = ``kind``: evaluation, explain) tagged with where its model came
    from; FINISHED when the body returns, FAILED when it raises."""
    tracker = RunTracker.create(experiment, run_name=run_name, tags={TAG_KIND: kind, **tags})
    tracker.log_params(params or {})
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.finish(status)


def log_model_metrics(tracker: RunTracker, metrics: dict[str, float], model_id: str | None) -> None:
    """Log ``metrics`` on the run and, when the logged model is known, on the model too."""
    import mlflow

    store.use_uri(tracker.uri)
    mlflow.log_metrics(metrics, run_id=tracker.run_id, model_id=model_id)


def child_runs(parent_run_id: str, experiment: str, uri: str) -> dict[str, str]:
    """Trial id -> MLflow run id, for the trial runs of a search run."""
    mlflow_client = store.client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = mlflow_client.search_runs([found.experiment_id],
                                     f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000)
    return {r.data.tags[TAG_TRIAL]: r.info.run_id for r in runs if TAG_TRIAL in r.data.tags}


def trial_run(experiment: str, parent_run_id: str, search: str, trial_id: str,
              uri: str) -> RunTracker:
    """A run for a trial that failed before its own run started (so every trial is in MLflow)."""
    return RunTracker.create(experiment, run_name=f"{search}/{trial_id}", uri=uri, tags={
        TAG_PARENT: parent_run_id, TAG_SEARCH: search, TAG_TRIAL: trial_id})
