"""Runs: one training run (:class:`RunTracker`), its metrics off the training path
(:class:`RunLogger`), its node's system metrics (:class:`SystemMetrics`), its data
(:func:`shard_datasets`), its curves, and the runs that are not training runs (evaluation,
explanation, a search and its trials).

A :class:`RunTracker` is addressed by run id, so the driver, rank 0 of any worker group and a
resumed driver all write to the same run. Every metric is logged at the global optimizer step
(MLflow's convention, so all of a run's charts share one x-axis); epoch metrics carry ``epoch``
as a metric of their own. Nothing is logged twice: after a restart from a checkpoint, steps and
epochs that were already logged are skipped, so MLflow holds each epoch exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ran.tracking import store
from ran.tracking.names import (
    CONFIG_ARTIFACT, CURVES_ARTIFACT, DATASET_CONTEXTS, EPOCH_METRIC, REPORT_UNLOGGED, TAG_KIND,
    TAG_METRICS_GAP, TAG_PARENT, TAG_SEARCH, TAG_STORAGE, TAG_TRIAL,
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
        self._last_epoch: float | None = None  # the latest epoch whose metrics are logged

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
                        uri: str | None = None,
                        manifest: dict[str, Any] | None = None) -> "RunTracker":
        """A training run: params are the flattened config, ``config.yaml`` its artifact, and,
        given the data's ``manifest``, its train and val splits its dataset inputs."""
        tracker = cls.create(cfg.tracking.experiment, run_name=run_name, tags=tags, uri=uri)
        tracker.log_params(cfg.applicable())
        tracker.log_text(cfg.to_yaml(), CONFIG_ARTIFACT)
        if manifest is not None:
            tracker.log_datasets(cfg.data.path, manifest,
                                 {cfg.data.train_split: DATASET_CONTEXTS[0],
                                  cfg.data.val_split: DATASET_CONTEXTS[1]})
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

    def log_datasets(self, path: str, manifest: dict[str, Any], contexts: dict[str, str]) -> None:
        """Log splits of the shards at ``path`` as the run's dataset inputs: ``contexts`` maps a
        split to its MLflow context (``training``, ``validation``); see :func:`shard_datasets`."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from mlflow.exceptions import MlflowException

        datasets = shard_datasets(path, manifest, list(contexts))
        inputs = [DatasetInput(d._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, contexts[split])])
                  for split, d in zip(contexts, datasets)]
        # Runs of one experiment on the same shards (the trials of a search) share one dataset
        # row; when two create it at once, the store refuses the second insert. The row exists
        # then, so logging again links it.
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as e:
                shared_row = any(word in str(e).upper() for word in ("UNIQUE", "DUPLICATE"))
                if attempt == 2 or not shared_row:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_artifact(self, path: str | Path, directory: str | None = None) -> None:
        """Upload a local file under ``directory`` of the run's artifacts."""
        self.client.log_artifact(self.run_id, str(path), directory)

    def last_steps(self) -> dict[str, int]:
        """Highest step logged so far for each metric of the run (read once, then kept)."""
        if self._last_step is None:
            metrics = self.client.get_run(self.run_id).data.metrics
            self._last_epoch = metrics.get(EPOCH_METRIC)
            self._last_step = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in metrics
            }
        return self._last_step

    def log_metrics(self, metrics: dict[str, float], step: int) -> int:
        """Log ``metrics`` at ``step`` (the global optimizer step). An epoch's metrics (those
        carrying :data:`EPOCH_METRIC`) are skipped when that epoch is already logged; other metrics skip any
        key already logged at this or a later step.

        Returns the number of values logged. This is what keeps a run restarted from a checkpoint
        free of duplicated epochs: the replayed epochs' values were logged before the failure,
        and when the restart re-planned the run for another world size, a replayed epoch ends at
        another step but is still the same epoch.
        """
        from mlflow.entities import Metric

        last = self.last_steps()
        epoch = metrics.get(EPOCH_METRIC)
        if epoch is not None and self._last_epoch is not None and epoch <= self._last_epoch:
            return 0
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and (epoch is not None or step > last.get(k, -1))]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                last[m.key] = step
            if epoch is not None:
                self._last_epoch = epoch
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
                         ("train/loss", "eval/loss", "eval/top1", "eval/top5", "train/step_lr", "train/lr")}, path)
            self.log_artifact(path)


# Seconds rank 0 waits at the end of training for its last metrics to reach MLflow, so that
# its final report says exactly what did not (a server that answers takes milliseconds).
FLUSH_S = 30.0
# Seconds a single MLflow client call may take while the server does not answer: the client
# retries by itself (7 tries, backoff factor 2: about 64 s of waiting) before it raises. The final
# flush waits for a call in flight for up to this long, so that what it names as missing is what
# the server lacks, not what the client was still about to write.
CLIENT_RETRY_S = 70.0


class RunLogger:
    """Rank 0's metrics, params and tags, written to MLflow from a background thread: the
    training loop only enqueues (microseconds), so no rank waits on MLflow I/O at the ``report``
    barrier.

    Writes that fail (the server went away) are retried, in order, every second; metric values
    still unlogged after ``retry_s`` seconds are dropped and counted. The count is reported on the
    run as the ``ran.metrics_gap`` tag once the server answers again, and on stderr at once;
    :meth:`unlogged` says which values are not (yet) in MLflow, for the run's final summary.
    """

    def __init__(self, run_id: str, uri: str | None = None, retry_s: float = 600.0) -> None:
        self.run_id, self.uri, self.retry_s = run_id, uri, retry_s
        self.dropped = 0  # metric values given up on
        self._lost: dict[str, list[int]] = {}  # metric -> steps given up on
        self._pending: list[tuple[str, Any, int, float]] = []  # queued or failed, in order
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # held while a write to MLflow is in flight
        self._queue: queue.Queue[tuple[str, Any, int, float] | None] = queue.Queue()
        self._final_report = False  # gap_report ran: values given up later are not in it
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

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until everything queued so far is written; False if
        some of it is not (the server does not answer)."""
        done = threading.Event()
        self._queue.put(("flush", done, 0, time.monotonic()))
        return done.wait(timeout)

    def unlogged(self) -> dict[str, list[int]]:
        """Metric -> steps whose values are not in MLflow: given up on, or still waiting for the
        server. Empty when everything queued has been written."""
        with self._lock:
            found = {k: list(v) for k, v in self._lost.items()}
            for key, steps in _metric_steps(self._pending).items():
                found.setdefault(key, []).extend(steps)
        return {k: sorted(set(v)) for k, v in found.items()}

    def gap_report(self, timeout: float = FLUSH_S,
                   in_flight: float = CLIENT_RETRY_S) -> dict[str, str]:
        """For rank 0's last report: ``{REPORT_UNLOGGED: "<what MLflow lacks>"}`` after waiting up
        to ``timeout`` seconds for what is queued to be written; {} when nothing is missing.

        When that wait runs out, the write in flight (inside the MLflow client's own retries) is
        waited for too, up to ``in_flight`` seconds, and every metric value still unwritten is
        then given up on: never written later, counted in ``ran.metrics_gap``, so that the report
        names exactly the values the server lacks."""
        if not self.flush(timeout) and self._writing.acquire(timeout=in_flight):
            try:  # nothing in flight now, and nothing starts until this is decided
                with self._lock:
                    lost = [p for p in self._pending if p[0] == "metrics"]
                self._give_up(lost)
            finally:
                self._writing.release()
        unlogged = self.unlogged()
        self._final_report = True
        return {REPORT_UNLOGGED: describe_unlogged(unlogged)} if unlogged else {}

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued (waiting up to ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self, tracker: RunTracker, kind: str, payload: Any, step: int) -> None:
        if kind == "metrics":
            tracker.log_metrics(payload, step)
        elif kind == "params":
            tracker.log_params(payload)
        elif kind == "tags":
            tracker.set_tags(payload)
        else:  # a flush marker: everything before it is written
            payload.set()

    def _give_up(self, lost: list[tuple[str, Any, int, float]]) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p not in lost]
            for kind, payload, step, _ in lost:
                if kind == "metrics":
                    values = [k for k, v in payload.items() if v is not None]
                    self.dropped += len(values)
                    for key in values:
                        self._lost.setdefault(key, []).append(step)

    def _run(self) -> None:
        tracker: RunTracker | None = None
        done = reported = down = False
        while not done or self._pending:
            try:
                item = self._queue.get(timeout=1.0 if self._pending else None)
                while True:  # take everything queued, then write it in order
                    if item is None:
                        done = True
                    else:
                        with self._lock:
                            self._pending.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                tracker = tracker or RunTracker(self.run_id, self.uri)
                while True:
                    with self._writing:
                        with self._lock:
                            if not self._pending:
                                break
                            head = self._pending[0]
                        self._write(tracker, *head[:3])
                        with self._lock:
                            self._pending.remove(head)
                if self.dropped and not reported:
                    tracker.set_tags({TAG_METRICS_GAP: f"{self.dropped} metric values not logged"})
                    reported = True
                down = False
            except Exception as err:  # noqa: BLE001 - MLflow unreachable: training goes on
                if not down and not done:  # once an outage, not at every retry
                    down = True
                    _warn(f"MLflow at {store.shown(self.uri)} does not answer ({_reason(err)}): "
                          "training goes on, rank 0 keeps retrying its metrics and the summary "
                          "names any it could not log")
                now = time.monotonic()
                lost = list(self._pending) if done else \
                    [p for p in self._pending if now - p[3] > self.retry_s]
                if lost:
                    before, values = self.dropped, _metric_steps(lost)
                    self._give_up(lost)
                    reported = False
                    if values and self._final_report:  # logged after it: the summary lacks them
                        _warn(f"MLflow at {store.shown(self.uri)} ({_reason(err)}): "
                              f"{describe_unlogged(values)} not logged either")
                    elif self.dropped > before:  # not for params or tags
                        _warn(f"MLflow at {store.shown(self.uri)} ({_reason(err)}): "
                              f"{self.dropped} metric values not logged so far")
                if not done:
                    time.sleep(1.0)


def _metric_steps(items: list[tuple[str, Any, int, float]]) -> dict[str, list[int]]:
    """Metric -> steps of the queued metric values among ``items``."""
    found: dict[str, list[int]] = {}
    for kind, payload, step, _ in items:
        if kind == "metrics":
            for key, value in payload.items():
                if value is not None:
                    found.setdefault(key, []).append(step)
    return {key: sorted(set(steps)) for key, steps in found.items()}


def _warn(text: str) -> None:
    """One ``warning:`` line on stderr, written once (inside a Ray Train worker ``print`` is
    patched to log and print)."""
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


def _reason(err: BaseException) -> str:
    """The short cause of a failed MLflow call: the OS error inside the client's long text
    (``[Errno 111] Connection refused``), else the error's first line (at most 200 characters)."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\"()\n]+", text)
    if found:
        return found.group(0).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def describe_unlogged(unlogged: dict[str, list[int]], limit: int = 6) -> str:
    """One line naming metric values not in MLflow, metrics with the same steps together:
    ``"eval/top1, train/loss at step 2; train/step_loss, train/step_lr at steps 16, 20, 24"``."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, steps in sorted(unlogged.items()):
        groups.setdefault(tuple(steps), []).append(key)
    parts = []
    for steps, keys in sorted(groups.items()):
        shown = ", ".join(str(s) for s in steps[:limit])
        more = f" and {len(steps) - limit} more" if len(steps) > limit else ""
        parts.append(f"{', '.join(keys)} at step{'s' if len(steps) > 1 else ''} {shown}{more}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# What the run page shows beside the metrics: system metrics per node, the data


class SystemMetrics:
    """MLflow's own system metrics of this node (CPU, memory, disk, network through psutil; GPU
    utilisation and memory through nvidia-ml-py where there is an NVIDIA GPU), logged to a run
    by MLflow's monitor thread every ``every_s`` seconds as ``system/<node>/<metric>``.

    One per node (Ray Train's local rank 0 starts it), so that a multi-node run shows each node
    apart. The monitor continues a run's system-metric steps after a restart. It stops for good
    if the server goes away (MLflow's behaviour); training is not affected.
    """

    def __init__(self, run_id: str, uri: str | None, node: str, every_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
        self.node = node
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s,
                                            samples_before_logging=1, resume_logging=True,
                                            node_id=node, tracking_uri=uri or store.tracking_uri())
        self.monitor.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop sampling and write what was sampled, waiting at most ``timeout`` seconds (MLflow's
        monitor waits for its thread, which may be retrying a server that is gone)."""
        closing = threading.Thread(target=self.monitor.finish, name="ran-system-metrics", daemon=True)
        closing.start()
        closing.join(timeout)


def dataset_digest(manifest: dict[str, Any], split: str) -> str:
    """The digest of one split as the manifest describes it: dataset, classes, and each shard's
    name, sample count and size. Shards rebuilt the same way give the same digest."""
    info = manifest["splits"][split]
    described = {"dataset": manifest.get("dataset"), "classes": manifest["classes"], "split": split,
                 "shards": [[s["name"], s["samples"], s.get("bytes")] for s in info["shards"]]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def shard_datasets(path: str, manifest: dict[str, Any], splits: list[str]) -> list[Any]:
    """MLflow datasets (``mlflow.data`` MetaDatasets) of ``splits`` of the shards at ``path``:
    name ``<dataset>/<split>``, source the shards' directory or URI, digest
    :func:`dataset_digest`, and a profile with sample, class and shard counts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        def __init__(self, profile: dict[str, int], **kwargs: Any) -> None:
            self._profile = profile
            super().__init__(**kwargs)

        @property
        def profile(self) -> dict[str, int]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    with warnings.catch_warnings():  # a local path matches two equal source kinds: either does
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path)
    return [ShardDataset(
        source=source, name=f"{manifest.get('dataset') or 'shards'}/{split}",
        digest=dataset_digest(manifest, split),
        profile={"num_samples": int(manifest["splits"][split]["total"]),
                 "num_classes": int(manifest["num_classes"]),
                 "num_shards": len(manifest["splits"][split]["shards"])})
        for split in splits]


# ---------------------------------------------------------------------------------------------
# Curves


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Three panels, each over the global optimizer step: loss, top-1/top-5, lr."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _panel(axes[0], series, ("train/loss", "eval/loss"), "loss", "step")
    _panel(axes[1], series, ("eval/top1", "eval/top5"), "accuracy", "step")
    lr_key = "train/step_lr" if series.get("train/step_lr") else "train/lr"
    _panel(axes[2], series, (lr_key,), "learning rate", "step")
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
