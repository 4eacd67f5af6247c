"""Config -> a Ray Train ``TorchTrainer`` run, tracked in MLflow: what ``ran train`` does.

Order of events (:func:`run_training`):

1. *Pre-flight*, before any worker starts: the config is valid (pydantic), the manifest and every
   shard of both splits exist, the model builds (on the meta device), the options fit the hardware
   (fp16 and SyncBatchNorm need GPUs), the storage run directory is fresh or being resumed, and the
   Ray cluster can place ``num_workers`` x (``cpus_per_worker`` CPUs [+ 1 GPU]). Each failure is a
   :class:`~ran.config.ConfigError` (or DataError) with a one-line message.
2. The MLflow run is created (or, with ``--resume``, found by its storage tag and reopened).
3. ``TorchTrainer(...).fit()``: workers run :func:`ran.train.worker.train_fn_per_worker`.
   ``FailureConfig(max_failures=scaling.max_failures)`` restarts the worker group from the latest
   checkpoint when a worker dies; the MLflow run id travels in the checkpoint.
4. The driver loads the final checkpoint, logs and registers the model, closes the MLflow run and
   prints where to look.

Run directories and resuming. A run lives in ``storage.path/<name>``. Without ``storage.name`` each
``ran train`` starts a new directory ``<job name>-<UTC timestamp>``, so a fresh run never picks up
an old one's checkpoints; ``--resume`` continues the newest ``<job name>-*`` directory. With an
explicit ``storage.name``, a fresh run refuses to start when that directory already holds a run,
and ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ran.config import ConfigError, JobConfig, load_config

_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


@dataclass
class Storage:
    """Where Ray Train keeps one run: ``path`` (as Ray wants it) + ``name`` on ``filesystem``."""

    uri: str  # storage.path as the user sees it: an absolute directory or s3://bucket/prefix
    name: str  # run directory name
    ray_path: str  # storage_path handed to RunConfig (no s3:// when a filesystem is given)
    filesystem: Any = None  # pyarrow filesystem, or None to let Ray resolve the URI

    @property
    def run_uri(self) -> str:
        """The run directory, e.g. ``/abs/runs/demo-20250101-120000`` or ``s3://b/p/demo-...``."""
        return f"{self.uri.rstrip('/')}/{self.name}"

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self.filesystem is not None:
            return self.filesystem, self.ray_path
        return pyarrow.fs.FileSystem.from_uri(self.uri)

    def exists(self, name: str | None = None) -> bool:
        """Whether the run directory ``name`` (default: this run) holds a Ray Train run."""
        import pyarrow.fs

        fs, base = self._fs()
        path = f"{base.rstrip('/')}/{name or self.name}"
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def list_runs(self) -> list[str]:
        """Names of the run directories under the storage path."""
        import pyarrow.fs

        fs, base = self._fs()
        if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


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


# ---------------------------------------------------------------------------------------------
# Pre-flight


def resolve_config(cfg: JobConfig) -> tuple[JobConfig, dict[str, Any]]:
    """Absolute local paths and ``model.num_classes`` from the manifest; returns (config, manifest)."""
    from ran.data import storage as data_storage
    from ran.data.read import read_manifest

    data_path = cfg.data.path
    if not data_storage.is_remote(data_path):
        data_path = str(Path(data_path).resolve())
        if not Path(data_path).is_dir():
            raise ConfigError(f"data.path {cfg.data.path}: no such directory (write shards with "
                              "`ran data synth --output DIR` or `ran data build`)")
    manifest = read_manifest(data_path)
    classes = int(manifest["num_classes"])
    if cfg.model.num_classes not in (None, classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {data_path} has {classes} "
                          "classes; leave model.num_classes unset to take it from the manifest")
    storage_path = cfg.storage.path
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    raw = cfg.model_dump()
    raw["data"]["path"] = data_path
    raw["model"]["num_classes"] = classes
    raw["storage"]["path"] = storage_path
    return JobConfig.model_validate(raw), manifest


def check_shards(cfg: JobConfig, manifest: dict[str, Any]) -> None:
    """Every shard of the train and val splits exists (DataError naming the first missing ones)."""
    from ran.data import DataError
    from ran.data import storage as data_storage
    from ran.data.read import split_shards

    for split in (cfg.data.train_split, cfg.data.val_split):
        shards = split_shards(cfg.data.path, manifest, split)
        if not shards:
            raise DataError(f"{cfg.data.path}: split {split!r} has no shards")
        missing = [url for url, _ in shards if data_storage.size(url) is None]
        if missing:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise DataError(f"{len(missing)} of {len(shards)} {split} shards missing: {listed} — "
                            "rebuild the shards or fix data.path")


def check_model_and_options(cfg: JobConfig) -> None:
    """The model builds with these options (on the meta device: no memory) and fits the hardware."""
    import torch

    from ran.train.worker import build_model

    try:
        with torch.device("meta"):
            build_model(cfg)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if cfg.train.sync_batchnorm and not cfg.scaling.use_gpu:
        raise ConfigError("train.sync_batchnorm needs scaling.use_gpu=true (PyTorch's SyncBatchNorm "
                          "is GPU-only)")
    if cfg.data.batch_size * cfg.scaling.num_workers < 2 and cfg.train.sync_batchnorm:
        raise ConfigError("train.sync_batchnorm needs more than one image per step")


def storage_for(cfg: JobConfig, *, resume: bool) -> Storage:
    """The run directory of this job: a new one, or the one ``--resume`` continues (see module doc)."""
    base = _storage_base(cfg.storage.path, cfg.name)
    if cfg.storage.name:
        base.name = cfg.storage.name
        exists = base.exists()
        if exists and not resume:
            raise ConfigError(f"{base.run_uri} already holds a run: pass --resume to continue it, or "
                              "set storage.name to a new name")
        if resume and not exists:
            raise ConfigError(f"nothing to resume: {base.run_uri} does not exist")
        return base
    if resume:
        runs = [n for n in base.list_runs() if n.startswith(cfg.name + "-") and _STAMP.search(n)]
        if not runs:
            raise ConfigError(f"nothing to resume: no run of job {cfg.name!r} under {base.uri} "
                              "(start one without --resume)")
        base.name = max(runs, key=lambda n: (_STAMP.search(n).group(0)[:16], n))  # type: ignore[union-attr]
        return base
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base.name = f"{cfg.name}-{stamp}"
    suffix = 1
    while base.exists():
        suffix += 1
        base.name = f"{cfg.name}-{stamp}-{suffix}"
    return base


def _storage_base(path: str, job: str) -> Storage:
    if not path.startswith("s3://"):
        return Storage(uri=path, name=job, ray_path=path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return Storage(uri=path, name=job, ray_path=path)
    import pyarrow.fs
    from urllib.parse import urlparse

    parsed = urlparse(endpoint)
    # Keys from the driver's environment travel with the (pickled) filesystem to the workers.
    keys = {"access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": os.environ.get("AWS_SESSION_TOKEN")}
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        **({k: v for k, v in keys.items() if v} if keys["access_key"] else {}),
    )
    return Storage(uri=path, name=job, ray_path=path[len("s3://"):].rstrip("/"), filesystem=fs)


# ---------------------------------------------------------------------------------------------
# Ray


def starts_local_ray(address: str | None) -> bool:
    """Whether :func:`connect_ray` would start a local Ray: no Ray yet, no address given."""
    import ray

    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def connect_ray(address: str | None, *, lean: bool = False) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS``, else start a local Ray; True if we started it.

    ``lean``: a local Ray started here serves one ``ran train`` (see :func:`start_local_ray`).
    ``ran tune`` starts a full one: Tune stops trials, and only the placement-group cleaner frees
    what a stopped trial's workers held.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise ConnectionError(f"cannot connect to Ray at {address}: {err}{_auth_hint()}") from None
        return False
    start_local_ray(lean=lean)
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError unless something listens at a ``host:port`` Ray address (``auto`` and
    ``ray://`` client addresses are left to Ray). Ray itself retries an unanswered address for
    minutes before it gives up."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ConnectionError(f"cannot connect to Ray at {address}: nothing answers there ({err}); "
                              "is the cluster up? (`cluster/local.sh status` for a head on this "
                              "machine)") from None


def _auth_hint() -> str:
    """What to try when a connection failed, maybe for want of the auth token.

    ``ray start`` turns token auth on when a token exists (Ray 2.60 writes ``~/.ray/auth_token``
    the first time a local Ray starts), but Ray sends the token to an explicit address only with
    ``RAY_AUTH_MODE=token``: it will not hand a local token to any address it is given.
    """
    from ran.cluster import auth_token

    if os.environ.get("RAY_AUTH_MODE") is None and auth_token():
        return ("; if the cluster uses token auth (`ray start` turns it on when ~/.ray/auth_token "
                "exists), set RAY_AUTH_MODE=token to send the token")
    return ""


# Environment a lean local Ray sets for its own processes (they inherit it), and stop removes.
_LEAN_ENV = {
    # Tells build_trainer that no dashboard serves the State API (so: no placement-group cleaner).
    "RAN_RAY_NO_DASHBOARD": "1",
    # One machine that we start and stop ourselves: nothing to be preempted.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
_lean_env_set: list[str] = []


def local_resources() -> dict[str, int]:
    """The CPUs and GPUs a local Ray started here gets (cgroup limits respected, as Ray does)."""
    import torch

    try:
        from ray._private.utils import get_num_cpus

        cpus = int(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private helper; the plain count is a fine fallback
        cpus = os.cpu_count() or 1
    return {"CPU": cpus, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def start_local_ray(*, lean: bool = False, **init_kwargs: Any) -> str:
    """Start a Ray instance in this process and return its GCS address.

    Never attaches to another ``ray start`` cluster found on this machine (``address="local"``).
    ``RAY_ADDRESS`` is set to it for every process of this instance (they inherit this
    environment), with a GCS port chosen up front: State API calls, such as the polls of Ray Train
    V2's placement-group cleaner, find their cluster through it and fail when several Ray
    instances run on one machine.

    ``lean=True`` is the Ray of one ``ran train``: it lives as long as the job, on one machine, so
    it starts without the dashboard (a dozen Python processes competing for the CPUs the job is
    about to need), without idle workers started ahead, and tells Ray Train so: no preemption
    watcher and no placement-group cleaner (:func:`build_trainer`), whose work ends with this Ray
    anyway. The CPUs and GPUs are those of :func:`local_resources`, so that the pre-flight check
    and Ray agree.
    """
    import socket

    import ray
    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    if lean:
        resources = local_resources()
        init_kwargs = {"include_dashboard": False, "num_cpus": resources["CPU"],
                       "num_gpus": resources["GPU"],
                       # Idle workers started ahead go unused: Ray Train's actors carry a
                       # runtime env of their own, so each gets a new worker process anyway.
                       "_system_config": {"enable_worker_prestart": False,
                                          "prestart_worker_first_driver": False},
                       **init_kwargs}
        for key, value in _LEAN_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _lean_env_set.append(key)
    try:
        ray.init(address="local", log_to_driver=True, **init_kwargs)
    except BaseException:
        _forget_lean_env()
        raise
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
    return address


def _forget_lean_env() -> None:
    while _lean_env_set:
        os.environ.pop(_lean_env_set.pop(), None)


def stop_local_ray() -> None:
    """Shut down the Ray started by :func:`start_local_ray` and forget its address."""
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    _forget_lean_env()


def check_resources(cfg: JobConfig, nodes: list[dict[str, float]] | None = None) -> None:
    """The cluster can place every worker (CPUs per worker, one GPU each when asked).

    ``nodes``: each node's resources; default: the live Ray cluster's.
    """
    s = cfg.scaling
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    placeable = 0
    for res in nodes:
        fit = int(res.get("CPU", 0) // s.cpus_per_worker)
        if s.use_gpu:
            fit = min(fit, int(res.get("GPU", 0)))
        placeable += fit
    if placeable < s.num_workers:
        cpus = sum(r.get("CPU", 0) for r in nodes)
        gpus = sum(r.get("GPU", 0) for r in nodes)
        need = f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU" + (" + 1 GPU" if s.use_gpu else "")
        raise ConfigError(
            f"the Ray cluster cannot place {need}: it has {cpus:g} CPUs and {gpus:g} GPUs on "
            f"{len(nodes)} node(s), room for {placeable} worker(s); lower scaling.num_workers or "
            "scaling.cpus_per_worker, or add nodes"
        )


def build_trainer(cfg: JobConfig, storage: Storage, loop_config: dict[str, Any],
                  callbacks: list[Any] | None = None) -> Any:
    """The ``TorchTrainer`` for a resolved config (``callbacks``: Ray Train ``UserCallback`` s,
    e.g. the ``TuneReportCallback`` of a ``ran tune`` trial)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from ran.train.worker import train_fn_per_worker

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    return _trainer_class()(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=storage.name,
            storage_path=storage.ray_path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=s.max_failures),
            callbacks=list(callbacks or []),
            # Ray Train's INFO lines repeat every report's metrics from every rank; ours say more.
            logging_config=LoggingConfig(log_level="WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
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
    """``TorchTrainer``; on a lean local Ray, one without :data:`LEAN_SKIPPED_CALLBACKS`."""
    from ray.train.torch import TorchTrainer

    # _create_default_callbacks is Ray Train V2's (2.4x-2.60); without it, the stock trainer.
    if os.environ.get("RAN_RAY_NO_DASHBOARD") != "1" or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [cb for cb in super()._create_default_callbacks()
                    if type(cb).__name__ not in LEAN_SKIPPED_CALLBACKS]

    return LeanTorchTrainer


def fault_from_env() -> dict[str, Any] | None:
    """Fault injection for tests: ``RAN_FAIL_AT_STEP`` (+ ``RAN_FAIL_RANK``, ``RAN_FAIL_MARKER``)."""
    if not os.environ.get("RAN_FAIL_AT_STEP"):
        return None
    return {"step": int(os.environ["RAN_FAIL_AT_STEP"]), "rank": int(os.environ.get("RAN_FAIL_RANK", "0")),
            "marker": os.environ.get("RAN_FAIL_MARKER")}


# ---------------------------------------------------------------------------------------------
# The run


def run_training(cfg: JobConfig, *, resume: bool = False, address: str | None = None,
                 fault: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
                 run_tags: dict[str, str] | None = None,
                 launched_at: float | None = None) -> TrainOutcome:
    """Pre-flight, train on Ray, log and register the model; the whole of ``ran train``.

    Args:
        cfg: the job config (relative paths are taken from the working directory).
        resume: continue the job's run directory (see the module docstring) instead of a new one.
        address: Ray address; default ``RAY_ADDRESS``, else a local Ray started (and stopped) here.
            An already initialised Ray (``ray.init`` by the caller) is used as is.
        fault: fault injection for tests (see :mod:`ran.train.worker`).
        callbacks: extra Ray Train callbacks (``ran tune`` passes a ``TuneReportCallback``).
        run_tags: extra tags for a new MLflow run (``ran tune`` nests trial runs under the search
            run with ``mlflow.parentRunId``).
        launched_at: ``time.time()`` when the user asked for this run (default: now); the first
            epoch reports ``startup_s``, the seconds from then to the first optimizer step.

    Raises:
        ConfigError, DataError: a problem found before any worker started.
        ray.train.TrainingFailedError: workers kept failing beyond ``scaling.max_failures``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ran import tracking

    launched_at = launched_at or time.time()
    cfg, manifest = resolve_config(cfg)
    check_shards(cfg, manifest)
    check_model_and_options(cfg)
    storage = storage_for(cfg, resume=resume)
    cfg = JobConfig.model_validate(_with(cfg.model_dump(), storage={"name": storage.name}))
    uri = tracking.tracking_uri()
    local = starts_local_ray(address)
    if local:  # before anything starts; the local Ray then gets exactly these resources
        check_resources(cfg, [local_resources()])
    started, tracker = False, None
    try:
        if local:
            # Opening the MLflow run (importing mlflow, maybe creating the store) takes seconds of
            # CPU; starting Ray mostly waits for its processes. Both at once.
            with ThreadPoolExecutor(1, thread_name_prefix="ran-mlflow") as pool:
                opening = pool.submit(_open_run, cfg, manifest, storage, uri, resume, run_tags)
                try:
                    started = connect_ray(None, lean=True)
                finally:
                    if opening.exception() is None:
                        tracker = opening.result()
            tracker = opening.result()  # raises what opening the run met, if Ray started well
        else:
            connect_ray(address)
            check_resources(cfg)
            tracker = _open_run(cfg, manifest, storage, uri, resume, run_tags)
        return _train(cfg, manifest, storage, tracker, resume, fault, launched_at, callbacks)
    except BaseException as err:
        if tracker is not None:
            close_run(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            stop_local_ray()


def close_run(tracker: Any, status: str) -> None:
    """End an open (RUNNING) MLflow run with ``status`` as an error propagates: a run that
    ``--resume`` found finished stays so, and a failure to reach MLflow never hides that error."""
    import sys

    try:
        if tracker.status == "RUNNING":
            tracker.finish(status)
    except Exception as err:  # noqa: BLE001 - the error being raised matters more
        print(f"warning: could not mark MLflow run {tracker.run_id} {status}: {err}", file=sys.stderr)


def _with(raw: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def _train(cfg: JobConfig, manifest: dict[str, Any], storage: Storage, tracker: Any, resume: bool,
           fault: dict[str, Any] | None, launched_at: float,
           callbacks: list[Any] | None = None) -> TrainOutcome:
    """Fit on the connected Ray, log and register the model, finish the MLflow run."""
    from ran import tracking

    outcome = TrainOutcome(cfg, storage.run_uri, None, tracker.run_id, tracker.uri, resumed=resume)
    if tracker.status == "FINISHED":
        print(f"{storage.run_uri} already finished (MLflow run {tracker.run_id}); nothing to do")
        outcome.registered = tracker.tag(tracking.TAG_VERSION)
        return outcome
    tracker.set_tags(tracking.ray_job_tags())  # known now that Ray is up
    print(f"run directory {storage.run_uri}; MLflow run {tracker.run_id} ({tracker.uri})", flush=True)
    loop_config = {"job": cfg.model_dump(), "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                   "fault": fault, "launched_at": launched_at}
    result = build_trainer(cfg, storage, loop_config, callbacks).fit()
    outcome.metrics = dict(result.metrics or {})
    if result.checkpoint is not None:
        outcome.checkpoint = _checkpoint_uri(storage, result.checkpoint.path)
        outcome.registered = finalize(cfg, manifest, tracker, result.checkpoint)
    tracker.finish("FINISHED")
    return outcome


def _checkpoint_uri(storage: Storage, path: str) -> str:
    if storage.filesystem is not None and not path.startswith("s3://"):
        return "s3://" + path
    return path


def _open_run(cfg: JobConfig, manifest: dict[str, Any], storage: Storage, uri: str,
              resume: bool, extra_tags: dict[str, str] | None = None) -> Any:
    """The MLflow run of this job: found and reopened (``--resume``) or created. Needs no Ray:
    it runs while Ray starts, and the Ray job tags come later (:func:`_train`)."""
    from ran import tracking

    if resume:
        found = tracking.RunTracker.find(cfg.tracking.experiment, storage.run_uri, uri)
        if found is not None:
            if found.status != "FINISHED":
                found.reopen()
            return found
    tags = {
        tracking.TAG_MODEL: cfg.model.name,
        tracking.TAG_DATASET: f"{manifest.get('dataset', '?')} ({cfg.data.path})",
        tracking.TAG_STORAGE: storage.run_uri,
        tracking.TAG_JOB: cfg.name,
        **(extra_tags or {}),
    }
    commit = tracking.git_commit()
    if commit:
        tags[tracking.TAG_GIT] = commit
    return tracking.RunTracker.create(cfg, run_name=cfg.tracking.run_name or storage.name,
                                      tags=tags, uri=uri)


def finalize(cfg: JobConfig, manifest: dict[str, Any], tracker: Any, checkpoint: Any) -> str | None:
    """Log (and register) the model of the final checkpoint; returns ``name/version`` or None."""
    import numpy as np
    import torch

    from ran.data.transforms import normalizer
    from ran.train.worker import build_model, eval_crop, load_checkpoint

    if not cfg.tracking.log_model:
        return None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    crop = eval_crop(cfg)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, crop, crop), dtype=torch.uint8, generator=generator)
    example = normalizer(cfg.data.recipe)(images).numpy().astype(np.float32)
    metrics = {k: v for k, v in (state.get("last_val") or {}).items()}
    metrics.update(epoch=state["epoch"], step=state["step"])
    version = tracker.log_final_model(model, cfg, list(manifest["classes"]), example, metrics)
    return f"{version.name}/{version.version}" if version is not None else None


def where_to_look(outcome: TrainOutcome) -> str:
    """Where the run's results are: MLflow UI command, run id, registered version, checkpoints."""
    m = outcome.metrics
    lines = []
    if "val_top1" in m:
        lines.append(f"final validation: top-1 {m['val_top1']:.4f}, top-5 {m.get('val_top5', 0):.4f} "
                     f"after {int(m.get('epoch', 0))} epochs")
    lines.append(f"checkpoints:      {outcome.run_dir}")
    lines.append(f"MLflow run:       {outcome.run_id} (experiment {outcome.config.tracking.experiment!r})")
    if outcome.registered:
        name, version = outcome.registered.rsplit("/", 1)
        lines.append(f"registered model: {name} version {version} (models:/{name}/{version})")
    uri = outcome.tracking_uri
    if uri.startswith("sqlite:///"):
        db = os.path.relpath(uri[len("sqlite:///"):])
        lines.append(f"look:             mlflow ui --backend-store-uri sqlite:///{db}")
    else:
        lines.append(f"look:             {uri}")
    return "\n".join(lines)


def process_start_time(pid: int | str = "self") -> float:
    """When process ``pid`` (default: this one) started (``time.time()`` scale); now where /proc
    is not available."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def cli_train(args: argparse.Namespace) -> int:
    """``ran train JOB.yaml [--set k=v]... [--address RAY] [--resume]``."""
    started = process_start_time()  # startup_s counts the command's imports too
    cfg = load_config(args.job, args.overrides)
    try:
        outcome = run_training(cfg, resume=args.resume, address=args.address, fault=fault_from_env(),
                               launched_at=started)
    except Exception as err:  # Ray's failure after retries: one line, not a traceback
        from ray.train import TrainingFailedError

        if isinstance(err, TrainingFailedError):
            print(f"error: training failed after {cfg.scaling.max_failures} restart(s): "
                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
            return 1
        raise
    print(where_to_look(outcome), flush=True)
    return 0
