"""The Launcher: config -> pre-flight -> a Ray Train ``TorchTrainer``, tracked in MLflow: what
``ran train`` and every ``ran tune`` trial do.

Order of events (:class:`Launcher`):

1. *Pre-flight* (:func:`preflight`), before any worker starts: the config is valid (pydantic, once),
   the manifest and every shard of both splits exist, the model builds (on the meta device), the
   run directory is fresh or being resumed (:mod:`ran.train.rundir`), and the Ray cluster can place
   ``num_workers`` (an elastic group: its minimum) x (``cpus_per_worker`` CPUs [+ 1 GPU]). Each
   failure is a :class:`~ran.config.ConfigError` (or DataError) with a one-line message.
2. The MLflow run is created (or, with ``--resume``, found by its storage tag and reopened), while
   a local Ray starts (:mod:`ran.train.localray`).
3. ``TorchTrainer(...).fit()``: workers run :func:`ran.train.raytrain.train_fn_per_worker`.
   ``FailureConfig(max_failures=scaling.max_failures)`` restarts the worker group from the latest
   checkpoint when a worker dies (an elastic group with as many workers as can be placed, the
   rest of the run re-planned: :mod:`ran.train.schedule`); the MLflow run id travels in the
   checkpoint.
4. The driver loads the final checkpoint, logs and registers the model, draws the curves, closes
   the MLflow run and prints where to look.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import ray
import torch
from ray.train import (
    CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from ran import runtime, tracking
from ran.config import ConfigError, JobConfig, check_placeholders, load_config
from ran.data import DataError
from ran.data import storage as data_storage
from ran.data.read import read_manifest, split_shards
from ran.tracking.models import (
    Registration, nonfinite_tensors, record_registration, registration_gate,
)
from ran.tracking.validate import check_names
from ran.train import console, localray, schedule
from ran.train.rundir import Storage, latest_checkpoint, storage_for
from ran.train.raytrain import SigtermNotice, attempts, train_fn_per_worker


class FinalizeError(RuntimeError):
    """Training finished and checkpointed, but logging or registering the model failed."""


class RunFailed(TrainingFailedError):
    """Ray Train's failure after its restarts, in one line that says what the run directory
    holds: the latest checkpoint (``checkpoint``, its path) and how to continue from it, or that
    there is none (:func:`run_failed`)."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint

    def __reduce__(self) -> tuple[Any, ...]:  # a trial's error travels to Tune pickled
        return type(self), (str(self), self.checkpoint)


def run_failed(cause: str, checkpoint: str | None, max_failures: int,
               started: int | None) -> RunFailed:
    """The :class:`RunFailed` of a run that failed with ``cause`` (one line) after ``started``
    worker groups (None: not known)."""
    kept = (f"the latest checkpoint {checkpoint} is kept: fix the cause and run the same command "
            "with --resume" if checkpoint else
            "no checkpoint is kept: fix the cause and run the command again")
    restarts = (f"after {started - 1} restart(s) (scaling.max_failures={max_failures})"
                if started else f"(scaling.max_failures allows {max_failures} restart(s))")
    return RunFailed(f"training failed {restarts}: {cause}; {kept}", checkpoint)


class TrainingInterrupted(KeyboardInterrupt):
    """``ran train`` got SIGINT and the workers checkpointed the step they reached and ended:
    ``checkpoint`` (its path, or None when the run ended before one was registered) and
    ``step``. A KeyboardInterrupt, so the MLflow run ends KILLED."""

    def __init__(self, checkpoint: str | None, step: int | None) -> None:
        super().__init__(f"interrupted at step {step}: checkpoint {checkpoint} is kept")
        self.checkpoint, self.step = checkpoint, step


class DivergedError(RuntimeError):
    """Training stopped because a loss or the weights stopped being finite (one line: the step,
    the last finite checkpoint, what to do); nothing was registered and the run is FAILED."""


@dataclass
class TrainOutcome:
    """What a finished ``ran train`` produced."""

    config: JobConfig  # the resolved config the workers ran
    run_dir: str  # Ray Train run directory (local path or s3:// URI)
    checkpoint: str | None  # final checkpoint directory (local path or URI)
    run_id: str | None  # MLflow run id
    tracking_uri: str  # MLflow tracking URI
    metrics: dict[str, float] = field(default_factory=dict)  # final epoch metrics
    registered: str | None = None  # "name/version" of the registered model
    resumed: bool = False  # continued an earlier run
    registration: str = ""  # the registration gate's reason (one line), "" when none applies
    unlogged: str = ""  # metric values MLflow lacks (the server went away), "" when none
    mlflow_unreachable: bool = False  # MLflow did not answer at the end: model and run end not written


# ---------------------------------------------------------------------------------------------
# Pre-flight


def resolve_config(cfg: JobConfig) -> tuple[JobConfig, dict[str, Any]]:
    """The run's config (absolute paths, ``model.num_classes`` from the manifest, ``model.init_from``
    checked and pinned: :func:`ran.runtime.resolve_init`) and the manifest.

    Raises:
        ConfigError: no such data directory, a ``model.num_classes`` the data contradicts, or a
            ``model.init_from`` that is missing or does not fit the model.
        DataError: the manifest cannot be read.
    """
    check_placeholders(cfg)
    data_path = cfg.data.path
    data_storage.require_dir(data_path, "data.path")
    if not data_storage.is_remote(data_path):
        data_path = str(Path(data_path).resolve())
    manifest = read_manifest(data_path)
    storage_path = cfg.storage.path
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    resolved = cfg.resolve(data_path=data_path, num_classes=int(manifest["num_classes"]),
                           storage_path=storage_path)
    return runtime.resolve_init(resolved), manifest  # model.init_from checked and pinned


def check_shards(cfg: JobConfig, manifest: dict[str, Any]) -> None:
    """Every shard of the train and val splits exists (DataError naming the first missing ones)."""
    for split in (cfg.data.train_split, cfg.data.val_split):
        shards = split_shards(cfg.data.path, manifest, split)
        if not shards:
            raise DataError(f"{cfg.data.path}: split {split!r} has no shards")
        missing = [url for url, _ in shards if data_storage.size(url) is None]
        if missing:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise DataError(f"{len(missing)} of {len(shards)} {split} shards missing: {listed} — "
                            "rebuild the shards or fix data.path")


def check_sizes(cfg: JobConfig, manifest: dict[str, Any]) -> None:
    """The splits and the batch fit the data: validation is on another split than training; one
    optimizer step (``data.batch_size`` x the most workers ``scaling.num_workers`` allows x
    ``train.grad_accum``) takes no more samples than the train split holds, and the val split
    has samples to validate on. Numbers from the manifest.

    Raises:
        ConfigError: one line with the numbers and what to lower.
    """
    d, workers, accum = cfg.data, cfg.scaling.max_workers, cfg.train.grad_accum
    if d.train_split == d.val_split:
        raise ConfigError(f"data.train_split and data.val_split are both {d.val_split!r}: "
                          "validation (and the registration gate) would score the training data; "
                          "set data.val_split to a held-out split")
    train = sum(n for _, n in split_shards(d.path, manifest, d.train_split))
    step = d.batch_size * workers * accum
    if step > train:
        fits = train // (workers * accum)
        fix = (f"set data.batch_size to at most {fits}" if fits else
               "use fewer workers (scaling.num_workers) or a smaller train.grad_accum")
        raise ConfigError(
            f"one optimizer step takes data.batch_size {d.batch_size} x {workers} workers x "
            f"train.grad_accum {accum} = {step} samples, more than the {train} of split "
            f"{d.train_split!r} in {d.path}; {fix}")
    val = sum(n for _, n in split_shards(d.path, manifest, d.val_split))
    if val < 1:
        raise ConfigError(f"split {d.val_split!r} in {d.path} has no samples to validate on; "
                          "set data.val_split to a split with samples")


def check_model(cfg: JobConfig) -> None:
    """The model builds with these options (on the meta device: no memory).

    Raises:
        ConfigError: an option the model cannot take, or an impossible layout.
    """
    if cfg.model.num_classes is None:  # not resolved yet (`ran submit`): the layout is the same
        cfg = cfg.with_values({"model.num_classes": 2})
    try:
        with torch.device("meta"):
            runtime.build_model(cfg)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def check_job(cfg: JobConfig, *, model: bool = True) -> None:
    """The pre-flight's first stage, needing neither data nor Ray (``ran submit`` runs it on the
    submitting machine): names MLflow takes as tags and params, and (``model``) the model builds.

    Raises:
        ConfigError: one line naming the key.
    """
    check_names(cfg)
    if model:
        check_model(cfg)


def check_data(cfg: JobConfig) -> tuple[JobConfig, dict[str, Any]]:
    """The pre-flight's data stage: the resolved config (:func:`resolve_config`) and the manifest,
    every shard of both splits there (:func:`check_shards`) and the batch fitting the splits
    (:func:`check_sizes`).

    Raises:
        ConfigError, DataError: one line each.
    """
    cfg, manifest = resolve_config(cfg)
    check_shards(cfg, manifest)
    check_sizes(cfg, manifest)
    return cfg, manifest


def preflight(cfg: JobConfig, *, resume: bool,
              resume_from_nothing: bool = False) -> tuple[JobConfig, dict[str, Any], Storage]:
    """Everything checked before Ray starts (:func:`check_job`, :func:`check_data`, the run
    directory); returns the resolved config (with its run directory name), the manifest and the
    run directory.

    Raises:
        ConfigError: ... and ``resume`` of a run directory that holds no checkpoint (unless
            ``resume_from_nothing``: a Tune trial restored before its first checkpoint).
    """
    check_job(cfg)
    cfg, manifest = check_data(cfg)
    storage = storage_for(cfg, resume=resume)
    if resume and not resume_from_nothing and latest_checkpoint(storage) is None:
        fresh = (f"set storage.name to a new name (or remove {storage.run_uri}) to start again"
                 if cfg.storage.name else "run the same command without --resume to start again")
        raise ConfigError(f"nothing to resume: {storage.run_uri} holds no checkpoint (the run "
                          f"stopped before its first); {fresh}")
    return cfg.with_values({"storage.name": storage.name}), manifest, storage


# ---------------------------------------------------------------------------------------------
# The trainer


def build_trainer(cfg: JobConfig, storage: Storage, loop_config: dict[str, Any],
                  callbacks: list[Any] | None = None) -> Any:
    """The ``TorchTrainer`` for a resolved config (``callbacks``: Ray Train ``UserCallback`` s,
    e.g. the ``TuneReportCallback`` of a ``ran tune`` trial). An elastic ``scaling.num_workers``
    ([min, max]) becomes Ray Train's elastic ``(min, max)``; every worker gets
    :class:`~ran.train.raytrain.SigtermNotice` (checkpoint and stop on SIGTERM)."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    workers = (s.min_workers, s.max_workers) if s.elastic else s.max_workers
    return _trainer_class()(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=storage.name,
            storage_path=storage.ray_path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=s.max_failures),
            callbacks=[*(callbacks or []), SigtermNotice()],
            # Ray Train's INFO lines repeat every report's metrics from every rank; ours say more.
            logging_config=LoggingConfig(log_level=console.ray_log_level()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="eval/top1",
                                               checkpoint_score_order="max"),
        ),
    )


# Ray Train V2 controller callbacks that a lean local Ray (no dashboard, one job, no Ray Data
# datasets) has no use for. Each starts an actor, that is a Python process importing Ray, while
# the workers start: on a small machine, seconds before the first step.
#   PlacementGroupCleanerCallback: frees the workers' placement group if the controller dies,
#     polling the State API (the dashboard) every second; a lean Ray ends with its job.
#   DatasetsCallback: a DatasetManager actor that hands out Ray Data shards; ours are WebDataset.
LEAN_SKIPPED_CALLBACKS = ("PlacementGroupCleanerCallback", "DatasetsCallback")


def _trainer_class() -> type:
    # Ray Train 2.60 offers no public way to leave out default controller callbacks, nor to
    # change what Ctrl-C does to fit(): this overrides TorchTrainer's private
    # _create_default_callbacks (a unit test pins the names) and _register_sigint_handler.
    """``TorchTrainer`` whose SIGINT checkpoints and ends the run (:func:`on_sigint`); on a lean
    local Ray, also without :data:`LEAN_SKIPPED_CALLBACKS`."""
    # _create_default_callbacks is Ray Train V2's (2.4x-2.60); without it, the stock callbacks.
    lean = (os.environ.get("RAN_RAY_NO_DASHBOARD") == "1"
            and hasattr(TorchTrainer, "_create_default_callbacks"))

    class RanTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            on_sigint(controller, (self.train_loop_config or {}).get("stop_key"))

        if lean:
            def _create_default_callbacks(self) -> list[Any]:
                return [cb for cb in super()._create_default_callbacks()
                        if type(cb).__name__ not in LEAN_SKIPPED_CALLBACKS]

    return RanTorchTrainer


def stop_key(run_id: str) -> str:
    """The key in Ray's internal KV that asks the workers of MLflow run ``run_id`` to end."""
    return f"ran-stop/{run_id}"


def request_stop(key: str | None, value: bool = True) -> None:
    """Set (or, ``value`` False, clear) a stop request read by every worker every
    ``PREEMPTION_POLL_STEPS`` steps (:meth:`ran.train.raytrain.RayReporter.stop_requested`)."""
    from ray.experimental import internal_kv  # private (2.60); shared by the driver and its workers

    if key and internal_kv._internal_kv_initialized():
        if value:
            internal_kv._internal_kv_put(key, b"SIGINT", overwrite=True)
        else:
            internal_kv._internal_kv_del(key)


def on_sigint(controller: Any, key: str | None) -> None:
    """While ``fit()`` runs: the first SIGINT asks the workers to checkpoint the step they reach
    and end (``key``, :func:`request_stop`); a second one aborts the run at once, as Ray does."""
    import signal

    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        if count == 1 and key:
            request_stop(key)
            print("interrupt: checkpointing the step reached, then stopping (Ctrl-C again stops "
                  "at once, without a checkpoint)", file=sys.stderr, flush=True)
            return
        with contextlib.suppress(ray.exceptions.RayActorError):
            ray.get(controller.abort.remote())
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------------------------------------
# The run


class Launcher:
    """One training run, in four steps: :meth:`preflight` -> :meth:`open_run` -> :meth:`fit` ->
    :meth:`finalize`; :meth:`run` does all four (``ran train``, and every ``ran tune`` trial).
    ``ran tune`` opens its search run and ``ran submit`` checks a job with the same steps
    (:func:`check_job`, :func:`check_data`, :func:`open_run`).

    Args:
        cfg: the job config (relative paths are taken from the working directory).
        resume: continue the job's run directory (:mod:`ran.train.rundir`) instead of a new one.
        address: Ray address (:func:`ran.train.localray.ray_address`), else a local Ray started
            (and stopped) here. An already initialised Ray (``ray.init`` by the caller) is used as is.
        callbacks: extra Ray Train callbacks (``ran tune`` passes a ``TuneReportCallback``; tests
            a fault injector).
        run_tags: extra tags for a new MLflow run (``ran tune`` nests trial runs under the search
            run with ``mlflow.parentRunId``).
        launched_at: ``time.time()`` when the user asked for this run (default: now); the first
            epoch reports ``perf/startup_s``, the seconds from then to the first optimizer step.
        resume_from_nothing: with ``resume``, continue a run directory that holds no checkpoint
            (from step 0, in its MLflow run) instead of refusing it (a restored Tune trial).
    """

    def __init__(self, cfg: JobConfig, *, resume: bool = False, address: str | None = None,
                 callbacks: list[Any] | None = None, run_tags: dict[str, str] | None = None,
                 launched_at: float | None = None, resume_from_nothing: bool = False) -> None:
        self.cfg = cfg
        self.resume, self.resume_from_nothing = resume, resume_from_nothing
        self.address = address
        self.callbacks = list(callbacks or [])
        self.run_tags = dict(run_tags or {})
        self.launched_at = launched_at or time.time()
        self.manifest: dict[str, Any] = {}
        self.storage: Storage | None = None
        self.uri = ""

    def preflight(self) -> None:
        """Everything checked before Ray starts (:func:`preflight`), then that the tracking server
        answers, takes our credentials and lets us write there.

        Raises:
            ConfigError, DataError: one line each.
        """
        self.cfg, self.manifest, self.storage = preflight(
            self.cfg, resume=self.resume, resume_from_nothing=self.resume_from_nothing)
        self.uri = tracking.tracking_uri()
        t = self.cfg.tracking
        tracking.check_server(self.uri, experiment=t.experiment,
                              registered_model=t.registered_model if t.log_model else None)

    def open_run(self) -> tracking.RunTracker:
        """The MLflow run of this job: found and reopened (``resume``) or created. Needs no Ray:
        it runs while Ray starts, and the Ray job tags come later (:meth:`fit`)."""
        cfg, storage = self.cfg, self.storage
        assert storage is not None, "preflight first"
        stem, description = run_identity(cfg, self.manifest)
        tags = {tracking.TAG_DATASET: f"{self.manifest.get('dataset', '?')} ({cfg.data.path})",
                tracking.TAG_DESCRIPTION: description, **runtime.init_tags(cfg), **self.run_tags}

        def create(all_tags: dict[str, Any]) -> tracking.RunTracker:
            tracker = tracking.RunTracker.create_training(
                cfg, run_name=cfg.tracking.run_name or stem, tags=all_tags, uri=self.uri,
                manifest=self.manifest)
            if not cfg.tracking.run_name:  # unique in the runs table, and the id's start to search by
                tracker.set_tags({tracking.TAG_RUN_NAME: f"{stem}-{tracker.run_id[:6]}"})
            return tracker

        return open_run(cfg, storage.run_uri, self.uri, resume=self.resume, tags=tags, create=create)

    def run(self) -> TrainOutcome:
        """Pre-flight, open the run while Ray connects or starts, fit, finalize.

        Raises:
            ConfigError, DataError: a problem found before any worker started.
            RunFailed: workers kept failing beyond ``scaling.max_failures`` (a
                ``ray.train.TrainingFailedError`` naming the latest checkpoint, if any).
            DivergedError: a loss or the weights stopped being finite (the run is FAILED, tagged
                ``ran.diverged``; nothing is registered).
            TrainingInterrupted: SIGINT; the step reached is checkpointed (the run is KILLED).
        """
        self.preflight()
        local = localray.starts_local_ray(self.address)
        if local:  # before anything starts; the local Ray then gets exactly these resources
            self.cfg = localray.resolve_gpu(self.cfg, [localray.local_resources()])
            localray.check_resources(self.cfg, [localray.local_resources()])
        started, tracker = None, None
        try:
            if local:
                # Opening the MLflow run (importing mlflow, maybe creating the store) takes seconds
                # of CPU; starting Ray mostly waits for its processes. Both at once.
                with ThreadPoolExecutor(1, thread_name_prefix="ran-mlflow") as pool:
                    opening = pool.submit(self.open_run)
                    try:
                        started = localray.connect(None, lean=True)
                    finally:
                        if opening.exception() is None:
                            tracker = opening.result()
                tracker = opening.result()  # raises what opening the run met, if Ray started well
            else:
                localray.connect(self.address)
                self.cfg = localray.resolve_gpu(self.cfg)
                localray.check_resources(self.cfg)
                tracker = self.open_run()
            return self.fit(tracker)
        except BaseException as err:
            if tracker is not None:
                close_run(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if started is not None:
                started.stop()

    def fit(self, tracker: tracking.RunTracker) -> TrainOutcome:
        """Fit on the connected Ray, :meth:`finalize`, finish the MLflow run."""
        cfg, storage = self.cfg, self.storage
        assert storage is not None, "preflight first"
        outcome = TrainOutcome(cfg, storage.run_uri, None, tracker.run_id, tracker.uri, resumed=self.resume)
        if tracker.status == "FINISHED":
            print(f"{storage.run_uri} already finished (MLflow run {tracker.run_id}); nothing to do")
            outcome.registered = tracker.tag(tracking.TAG_VERSION)
            return outcome
        tracker.set_tags(tracking.ray_job_tags(ray.get_runtime_context().get_job_id()))
        print(f"run directory {storage.run_uri}; MLflow run {tracker.run_id} "
              f"({tracking.shown(tracker.uri)})", flush=True)
        key, counted = stop_key(tracker.run_id), f"ran-attempts/{tracker.run_id}"
        loop_config = {"job": cfg.model_dump(), "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                       "launched_at": self.launched_at, "stop_key": key, "attempts_key": counted}
        request_stop(key, False)  # an earlier interrupted attempt of this run asked its workers to stop
        attempts(counted, clear=True)  # worker groups of this fit only
        try:
            result = build_trainer(cfg, storage, loop_config, self.callbacks).fit()
        except TrainingFailedError as err:
            text = str(err).strip()
            cause = text.splitlines()[-1] if text else type(err).__name__
            cause = re.sub(r"^ran\.[\w.]+Error: ", "", cause)  # ran's own errors say what they are
            try:
                kept: str | None = latest_checkpoint(storage)
            except OSError:  # the storage does not answer either: say where checkpoints would be
                kept = f"(if any) under {storage.run_uri}"
            raise run_failed(cause, kept, cfg.scaling.max_failures, attempts(counted)) from err
        finally:
            request_stop(key, False)
            attempts(counted, clear=True)
        outcome.metrics = {k: v for k, v in (result.metrics or {}).items() if k != "worker_pid"}
        outcome.unlogged = str(outcome.metrics.pop(tracking.REPORT_UNLOGGED, "") or "")
        if result.checkpoint is not None:
            outcome.checkpoint = _checkpoint_uri(storage, result.checkpoint.path)
        returned = getattr(result, "return_value", None)
        if isinstance(returned, dict) and returned.get("diverged"):
            raise _diverged(cfg, tracker, str(returned["diverged"]), outcome.checkpoint)
        if isinstance(returned, dict) and returned.get("stopped"):
            raise TrainingInterrupted(outcome.checkpoint, int(returned.get("step", 0)))
        if not tracking.answers(tracker.uri):  # gone: say so (where_to_look), not minutes of retries
            outcome.mlflow_unreachable = True
            return outcome
        try:
            if outcome.unlogged:  # the workers' logger could not say so itself: the server was away
                tracker.set_tags({tracking.TAG_METRICS_GAP: f"not logged: {outcome.unlogged}"[:5000]})
            if result.checkpoint is not None:
                registration = self.finalize(tracker, result.checkpoint)
                outcome.registered, outcome.registration = registration.version, registration.reason
            tracker.log_curves()
        except Exception as err:  # noqa: BLE001 - MLflow's many kinds: one line, the checkpoint kept
            text = str(err).strip().splitlines()
            raise FinalizeError(
                f"training finished (checkpoint {outcome.checkpoint}) but logging the model to MLflow "
                f"at {tracking.shown(tracker.uri)} failed: {text[0] if text else type(err).__name__}; fix that and run "
                "the same command with --resume to log and register it") from err
        tracker.finish("FINISHED")
        return outcome

    def finalize(self, tracker: tracking.RunTracker, checkpoint: Any) -> Registration:
        """Log (and register, if it passes the gate) the model of the final checkpoint."""
        return finalize(self.cfg, self.manifest, tracker, checkpoint)


def run_training(cfg: JobConfig, **options: Any) -> TrainOutcome:
    """The whole of ``ran train``: ``Launcher(cfg, **options).run()`` (:class:`Launcher`)."""
    return Launcher(cfg, **options).run()


def open_run(cfg: JobConfig, storage_uri: str, uri: str, *, resume: bool, tags: dict[str, Any],
             create: Callable[[dict[str, Any]], tracking.RunTracker],
             reopen_finished: bool = False) -> tracking.RunTracker:
    """The MLflow run of a run directory (a training run's, a search's), in ``cfg``'s experiment:
    with ``resume``, the one tagged with ``storage_uri``, reopened unless it finished (with
    ``reopen_finished``, always); else ``create(tags)``, the tags completed with the storage, the
    job, the model and the git commit."""
    if resume:
        found = tracking.RunTracker.find(cfg.tracking.experiment, storage_uri, uri)
        if found is not None:
            if reopen_finished or found.status != "FINISHED":
                found.reopen()
            return found
    tags = {tracking.TAG_MODEL: cfg.model.name, tracking.TAG_STORAGE: storage_uri,
            tracking.TAG_JOB: cfg.name, **tags}
    commit = tracking.git_commit()
    if commit:
        tags[tracking.TAG_GIT] = commit
    return create(tags)


def close_run(tracker: Any, status: str) -> None:
    """End an open (RUNNING) MLflow run with ``status`` as an error propagates: a run that
    ``--resume`` found finished stays so, and a failure to reach MLflow never hides that error."""
    try:
        if tracker.status == "RUNNING":
            tracker.finish(status)
    except Exception as err:  # noqa: BLE001 - the error being raised matters more
        print(f"warning: could not mark MLflow run {tracker.run_id} {status}: {err}", file=sys.stderr)


def _diverged(cfg: JobConfig, tracker: tracking.RunTracker, reason: str,
              checkpoint: str | None) -> DivergedError:
    """The one line of a diverged run, also set as the run's ``ran.diverged`` tag (the caller's
    error handling then ends the run FAILED)."""
    kept = (f"the last finite checkpoint {checkpoint} is kept" if checkpoint
            else "no checkpoint was written before it")
    message = (f"training diverged: {reason}; {kept}; nothing is registered; lower optim.lr "
               f"({cfg.optim.lr:g}) or check the data, and start a fresh run")
    try:
        tracker.set_tags({tracking.TAG_DIVERGED: message})
    except Exception as err:  # noqa: BLE001 - the divergence matters more than the tag
        print(f"warning: could not tag MLflow run {tracker.run_id}: {err}", file=sys.stderr)
    return DivergedError(message)


def _checkpoint_uri(storage: Storage, path: str) -> str:
    if storage.filesystem is not None and not path.startswith("s3://"):
        return "s3://" + path
    return path


def run_identity(cfg: JobConfig, manifest: dict[str, Any]) -> tuple[str, str]:
    """What a training run is called and how it is described in MLflow: the name's stem
    ``<model>-<dataset>-e<epochs>`` (e.g. ``attention56-synthetic-e3``; the run id's first 6
    characters follow it) and a one-paragraph description (MLflow's run description)."""
    train = sum(n for _, n in split_shards(cfg.data.path, manifest, cfg.data.train_split))
    val = sum(n for _, n in split_shards(cfg.data.path, manifest, cfg.data.val_split))
    plan = schedule.plan_run(cfg, train, cfg.scaling.min_workers)
    dataset = str(manifest.get("dataset") or cfg.data.recipe)
    m, s = cfg.model, cfg.scaling
    options = ", ".join(f"{k} {v}" for k, v in (("mask", m.mask_activation),
                                                 ("combination", m.combination),
                                                 ("init from", m.init_from)) if v)
    description = (
        f"{m.name} ({cfg.resolved_stem()} stem{', ' + options if options else ''}) trained on "
        f"{dataset} ({train} train / {val} {cfg.data.val_split} images, "
        f"{manifest.get('num_classes', '?')} classes, {cfg.data.path}) for {plan.epochs} epochs: "
        f"global batch {plan.global_batch} on {s.num_workers} "
        f"{'GPU' if s.use_gpu is True else 'CPU'} worker(s), peak lr {plan.peak_lr:.4g} "
        f"{cfg.schedule.kind}, eval crop {runtime.eval_crop(cfg)}. Job {cfg.name}. Validation is "
        "the eval/ section of Model metrics; the model, if logged, is under Artifacts.")
    return f"{m.name}-{dataset}-e{plan.epochs}", description


def finalize(cfg: JobConfig, manifest: dict[str, Any], tracker: tracking.RunTracker,
             checkpoint: Any) -> Registration:
    """Log the model of the final checkpoint, and register it if it passes the registration gate
    (:func:`ran.tracking.models.registration_gate`, whose reason also tags the run).

    The final checkpoint is loaded as a :class:`ran.runtime.ModelBundle` (on the CPU); its model
    is logged with ``cfg`` (whose tracking settings name the registered model), the bundle's eval
    crop pinned in it. The input example is 2 random uint8 images at
    the bundle's eval crop, normalised as the recipe does.
    """
    if not cfg.tracking.log_model:
        return Registration(False, "")
    with checkpoint.as_directory() as directory:
        bundle = runtime.ModelBundle.load(directory, device=torch.device("cpu"))
    crop, state = bundle.crop, bundle.model.state_dict()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, crop, crop), dtype=torch.uint8, generator=generator)
    example = bundle.normalize(images).numpy().astype(np.float32)
    metrics = dict(bundle.progress.get("last_val") or {})
    metrics.update(epoch=bundle.progress["epoch"], step=bundle.progress["step"])
    gate = registration_gate(cfg, metrics, nonfinite_tensors(state), len(state))
    # The job's config (its tracking settings: a search's best trial was trained without them)
    # with the bundle's eval crop pinned, so the logged model is served at the crop it validated at.
    logged = cfg.with_values({"data.eval_crop": crop})
    gate.version = tracking.log_final_model(tracker, bundle.model, logged,
                                            list(manifest["classes"]), example, metrics,
                                            register=gate.register, quiet=not console.verbose())
    if gate.version:
        name, version = gate.version.rsplit("/", 1)
        top1 = metrics.get("eval/top1")
        tracking.describe_version(
            name, version, top1=top1, eval_crop=crop,
            data_digest=tracking.dataset_digest(manifest, cfg.data.val_split),
            description=f"{run_identity(cfg, manifest)[1]} Registered from run {tracker.run_id} "
                        f"at eval/top1 {'-' if top1 is None else format(top1, '.4f')} "
                        f"(epoch {bundle.progress['epoch']}).")
    if not gate.register and gate.reason:
        gate.reason += f"; the model is logged in MLflow run {tracker.run_id}"
    record_registration(tracker, gate)
    return gate


def mlflow_command() -> str:
    """``mlflow`` if the shell finds it, else the full path of the one beside this Python (a venv
    that is not activated), so that the printed command can be pasted as it is."""
    if shutil.which("mlflow"):
        return "mlflow"
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else "mlflow"


def where_to_look(outcome: TrainOutcome) -> str:
    """Where the run's results are: MLflow UI command, run id, registered version, checkpoints."""
    m = outcome.metrics
    lines = []
    if "eval/top1" in m:
        lines.append(f"final validation: top-1 {m['eval/top1']:.4f}, top-5 {m.get('eval/top5', 0):.4f} "
                     f"after {int(m.get('epoch', 0))} epochs")
    lines.append(f"checkpoints:      {outcome.run_dir}")
    lines.append(f"MLflow run:       {outcome.run_id} (experiment {outcome.config.tracking.experiment!r})")
    if outcome.registered:
        name, version = outcome.registered.rsplit("/", 1)
        lines.append(f"registered model: {name} version {version} (models:/{name}/{version})")
    uri = tracking.shown(outcome.tracking_uri)  # no password on the console
    if uri.startswith("sqlite:///"):
        lines.append(f"look:             {mlflow_command()} ui --backend-store-uri {uri} --workers 1"
                     "  (what `make mlflow-ui` runs), then http://127.0.0.1:5000: Model training")
    else:
        lines.append(f"look:             {uri}")
    if outcome.registration and not outcome.registered:
        lines.append(outcome.registration)  # why it was not registered: the last line
    if outcome.unlogged:
        lines.append(f"not in MLflow:    {outcome.unlogged} (the server did not answer)")
    if outcome.mlflow_unreachable:
        lines.append(f"MLflow at {uri} did not answer at the end: the model is not logged and the "
                     "run is still open; when it answers, run the same command with --resume")
    return "\n".join(lines)


def process_start_time(pid: int | None = None) -> float:
    """When process ``pid`` (default: this one) started, on the ``time.time()`` scale."""
    return psutil.Process(pid).create_time()


def cli_train(args: argparse.Namespace) -> int:
    """``ran train JOB.yaml [--set k=v]... [--address RAY] [--resume]``."""
    started = process_start_time()  # startup_s counts the command's imports too
    tracking.refuse_password(tracking.tracking_uri(), "ran train")
    cfg = load_config(args.job, args.overrides)
    try:
        outcome = run_training(cfg, resume=args.resume, address=args.address, launched_at=started)
    except TrainingInterrupted as err:
        again = shlex.join(["ran", "train", args.job,
                            *(a for o in args.overrides for a in ("--set", o)), "--resume"])
        print(f"interrupted at step {err.step}: checkpoint {err.checkpoint} is kept; continue "
              f"with: {again}" if err.checkpoint else
              f"interrupted at step {err.step} before a checkpoint was kept", file=sys.stderr)
        return 130
    except (RunFailed, FinalizeError, DivergedError) as err:  # one line each, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(where_to_look(outcome), flush=True)
    return 1 if outcome.mlflow_unreachable else 0
