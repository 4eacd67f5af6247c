"""The Ray glue of a training run: what Ray Train runs on every worker
(:func:`train_fn_per_worker`), around the :class:`~ran.train.trainer.Trainer`, which knows
neither Ray nor MLflow.

- :class:`RayReporter`: the Trainer's reporter on Ray Train (``ray.train.get_checkpoint`` /
  ``report``, checkpoints uploaded asynchronously, Ray's preemption notice, the launcher's stop
  request through Ray's internal KV).
- :class:`TrackedRun`: the Trainer's run log on MLflow (rank 0's ``ran.tracking.RunLogger``,
  with ran's tag names).
- :class:`SigtermNotice`: a SIGTERM to a worker becomes the Trainer's notice (checkpoint, stop).
- :func:`note_attempt` / :func:`attempts`: how many times the worker group started.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import tempfile
import threading
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.execution.callback import WorkerCallback  # DeveloperAPI (SigtermNotice)

from ran import tracking
from ran.config import JobConfig, parse_config
from ran.train.console import Console
from ran.train.rundir import storage_full
from ran.train.trainer import Diverged, Snapshot, Stopped, Trainer

# A SIGTERM reached this process (set by :class:`SigtermNotice`'s handler; the Trainer's notice).
NOTICE = threading.Event()


class TrackedRun:
    """The Trainer's :class:`~ran.train.trainer.RunLog` on MLflow: rank 0's
    ``tracking.RunLogger`` (off the training path), the attempt and notices as ran's tags."""

    def __init__(self, logger: "tracking.RunLogger") -> None:
        self.logger = logger

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step)

    def log_attempt(self, attempt: dict[str, Any]) -> None:
        """``ran.plan.*`` tags (the latest attempt's), precision and compile, and on a restart
        ``ran.resumed_from`` and ``ran.replanned.step_<N>``. Never params: they would change."""
        tags = {f"{tracking.TAG_PLAN}.{k}": v for k, v in attempt["plan"].items()}
        tags[tracking.TAG_PRECISION] = attempt["precision"]
        tags[tracking.TAG_PRECISION_REASON] = attempt["precision_reason"]
        tags[tracking.TAG_COMPILE] = attempt["compile"]
        if "resumed_from" in attempt:
            tags[tracking.TAG_RESUMED_FROM] = attempt["resumed_from"]
        if "replanned" in attempt:
            step, change = attempt["replanned"]
            tags[f"{tracking.TAG_REPLANNED}.step_{step}"] = change
        self.logger.set_tags(tags)

    def log_notice(self, message: str) -> None:
        self.logger.set_tags({tracking.TAG_NOTICE: message})

    def unlogged(self) -> dict[str, str]:
        """``{REPORT_UNLOGGED: ...}`` after waiting for what is queued (``RunLogger.gap_report``)."""
        return self.logger.gap_report()


class RayReporter:
    """Checkpoints and metrics through Ray Train (``ray.train.get_checkpoint`` / ``report``).

    Rank 0's checkpoint is a host-memory :class:`Snapshot`; Ray Train's upload (``upload``:
    ``async``, its ``CheckpointUploadMode.ASYNC``, in a background thread of the worker; ``sync``,
    in the training thread) writes it to a local directory and persists that to the run's storage
    (:func:`_write_and_persist`), then registers it. Before a new checkpoint the previous one must
    be registered (``ray.train.get_all_reported_checkpoints(COMMITTED)``), so at most one is in
    flight. Ray Train's controller takes one report per worker per health check
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s): checkpoints closer together than that wait.

    Every report carries the worker's ``worker_pid``, so that a Ray Train callback on the
    controller can find a worker's process (the tests' fault injection, ``tests/integration/
    fault_injection.py``).
    """

    def __init__(self, upload: str = "async", stop_key: str | None = None) -> None:
        self.pid = os.getpid()
        self.stop_key = stop_key  # Ray's internal KV key the launcher sets to end the run
        self.mode = (ray.train.CheckpointUploadMode.ASYNC if upload == "async"
                     else ray.train.CheckpointUploadMode.SYNC)
        self.pending = False  # a checkpoint was reported and is not known to be registered
        # Ray's preemption watcher is off on the lean local Ray (ran.train.localray): don't poll.
        self.watch_preemption = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None, name: str) -> None:
        unlisted = (set(metrics) - set(tracking.EPOCH_METRICS) - set(tracking.VALIDATION_METRICS)
                    - {tracking.REPORT_UNLOGGED})
        assert not unlisted, f"reported metrics {sorted(unlisted)} are not in tracking.EPOCH_METRICS"
        checkpoint, upload = None, None
        if snapshot is not None:
            if self.pending:  # at most one checkpoint in flight
                self.wait_committed()
            checkpoint = ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="ran-ckpt-"))
            upload = functools.partial(_write_and_persist, snapshot)
            self.pending = True
        ray.train.report({**metrics, "worker_pid": self.pid}, checkpoint=checkpoint,
                         checkpoint_dir_name=name if checkpoint else None,
                         checkpoint_upload_mode=self.mode, checkpoint_upload_fn=upload,
                         delete_local_checkpoint_after_upload=True)

    def wait_committed(self) -> None:
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        self.pending = False

    def preempted(self) -> bool:
        """Ray Train's preemption notice (a drained node), the same on every rank."""
        return self.watch_preemption and ray.train.get_preemption_info() is not None

    def stop_requested(self) -> bool:
        """Whether the launcher set :attr:`stop_key` in Ray's internal KV (``ran train`` got
        SIGINT: :func:`ran.train.launch.request_stop`)."""
        from ray.experimental import internal_kv  # private (2.60); what a driver and its workers share

        return bool(self.stop_key) and internal_kv._internal_kv_get(self.stop_key) is not None


def note_attempt(key: str | None) -> None:
    """Count one start of the worker group under ``key`` in Ray's internal KV (rank 0 calls it
    once per attempt; attempts follow each other): :func:`attempts` tells the launcher how many
    restarts happened, which Ray Train does not."""
    from ray.experimental import internal_kv  # private (2.60); shared by the driver and its workers

    if key and internal_kv._internal_kv_initialized():
        count = int(internal_kv._internal_kv_get(key) or 0) + 1
        internal_kv._internal_kv_put(key, str(count).encode(), overwrite=True)


def attempts(key: str, clear: bool = False) -> int | None:
    """How many worker groups :func:`note_attempt` counted under ``key`` (None: unknown); with
    ``clear``, forget them (a new ``fit``)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    found = internal_kv._internal_kv_get(key)
    if clear:
        internal_kv._internal_kv_del(key)
    return int(found) if found is not None else None


def _write_and_persist(snapshot: Snapshot, checkpoint: ray.train.Checkpoint,
                       name: str) -> ray.train.Checkpoint:
    """Ray Train's ``checkpoint_upload_fn``: write the snapshot into the (empty) local checkpoint
    directory, drop it from memory, and persist the directory as Ray Train does by default."""
    snapshot.write(checkpoint.path)
    snapshot.release()
    storage = ray.train.get_context().get_storage()
    try:
        return storage.persist_current_checkpoint(checkpoint, name)
    except OSError as err:  # a full disk names the checkpoint (pyarrow's text does not)
        raise storage_full(err, storage.build_checkpoint_path_from_name(name)) from err


class SigtermNotice(WorkerCallback):
    """Turns a SIGTERM to a Ray Train worker (spot reclaim, Kubernetes eviction, ``kill PID``)
    from an immediate exit into a notice: it sets :data:`NOTICE`, on which the Trainer checkpoints
    the current step, waits until it is registered, and stops the worker group for a restart.

    Ray's worker sets its own handler (raise ``SystemExit``) on its main thread, where signal
    handlers run; the training function runs in another thread. Ray Train calls this callback's
    ``after_init_train_context`` on each worker's main thread, before the training function
    starts. ``WorkerCallback`` is a Ray Train DeveloperAPI (2.60): ``RunConfig.callbacks`` passes
    it through to the workers.
    """

    def after_init_train_context(self) -> None:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    NOTICE.set()


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """What Ray Train runs on every worker: build a Trainer from the launcher's
    ``train_loop_config`` (``job``, ``run_id``, ``tracking_uri``, ``launched_at``) and fit.

    Returns None, or on divergence (:class:`Diverged`, raised on every rank at the same step)
    ``{"diverged": reason, "step": step}`` once the last checkpoint reported is registered: the
    group ends without an error, so that Ray Train does not restart it into the same divergence,
    and rank 0's return value tells the launcher (``Result.return_value``). On the launcher's stop
    request (``stop_key``, :class:`Stopped`) ``{"stopped": checkpoint name, "step": step}``."""
    Console.use_stdout_logger()
    cfg = parse_config(config["job"], "<train_loop_config>")
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times and keeps the fastest kernels
    if config.get("tracking_uri"):  # the driver's store, for a registered model.init_from
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
    rank0 = ray.train.get_context().get_world_rank() == 0
    if rank0:
        note_attempt(config.get("attempts_key"))
    run_log = (TrackedRun(tracking.RunLogger(config["run_id"], config.get("tracking_uri")))
               if rank0 and config.get("run_id") else None)
    system = _system_metrics(cfg, config)
    try:
        trainer = Trainer(cfg, device=device, run_id=config.get("run_id"), run_log=run_log,
                          launched_at=config.get("launched_at"), notice=NOTICE)
        reporter = RayReporter(cfg.train.checkpoint_upload, config.get("stop_key"))
        try:
            trainer.fit(reporter)
        except Stopped as err:
            return {"stopped": err.checkpoint, "step": err.step}
        except Diverged as err:
            if reporter.pending:  # the last finite checkpoint is registered before the group ends
                reporter.wait_committed()
            if run_log is not None:
                run_log.logger.set_tags({tracking.TAG_DIVERGED: str(err)})
            return {"diverged": str(err), "step": err.step}
        return None
    finally:
        if system is not None:
            system.close()
        if run_log is not None:
            run_log.logger.close()


def _system_metrics(cfg: JobConfig, config: dict[str, Any]) -> "tracking.SystemMetrics | None":
    """MLflow's system metrics of this node, sampled by its local rank 0 (one per node, labelled
    ``node_<node rank>``); None elsewhere or when ``tracking.system_metrics_every_s`` is 0."""
    context = ray.train.get_context()
    if not (config.get("run_id") and cfg.tracking.system_metrics_every_s > 0
            and context.get_local_rank() == 0):
        return None
    node = tracking.SYSTEM_METRICS_NODE.format(rank=context.get_node_rank())
    return tracking.SystemMetrics(config["run_id"], config.get("tracking_uri"), node,
                                  cfg.tracking.system_metrics_every_s)
