"""MLflow: where runs go, one run per training job, its metrics and artifacts, the final model.

Layout of this module:

- *Where*: :func:`tracking_uri` (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory, artifacts in ``./mlartifacts``) and :func:`ensure_experiment`.
- *One run*: :class:`RunTracker`, addressed by run id so that the driver, rank 0 of any worker
  group and a resumed driver all write to the same run. Metrics are logged with a step (the global
  optimizer step for ``step_*`` metrics, the epoch for epoch metrics) and never twice for the same
  step: after a restart from a checkpoint, steps that were already logged are skipped, so MLflow
  holds each epoch exactly once.
- *The model*: :meth:`RunTracker.log_final_model` logs it with ``mlflow.pytorch.log_model`` (pt2
  format, input example of batch 2, signature) plus ``config.yaml``, ``classes.json`` and
  ``state_dict.pt`` as extra files, registers it and tags the version with the final validation
  metrics; :func:`load_ran_model` rebuilds our own module class from those files.

Only the driver and rank 0 import this module; ``ran.models`` and ``ran.data`` never do.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from ran.config import JobConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
CURVES_ARTIFACT = "training_curves.png"
CONFIG_ARTIFACT = "config.yaml"
MODEL_NAME = "model"  # artifact name of the logged model

# Run tags set by `ran train`.
TAG_MODEL = "ran.model"
TAG_DATASET = "ran.dataset"
TAG_GIT = "mlflow.source.git.commit"
TAG_RAY_JOB = "ray.job_id"
TAG_RAY_SUBMISSION = "ray.submission_id"
TAG_STORAGE = "ran.storage"  # storage path/name of the Ray Train run: the key --resume looks up
TAG_JOB = "ran.job"
TAG_VERSION = "ran.registered_version"

# Epoch metrics (step = epoch) and step metrics (step = global optimizer step).
EPOCH_METRICS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s",
                 "data_wait_frac", "skipped", "epoch_time_s")
STEP_METRICS = ("step_loss", "step_lr")


# ---------------------------------------------------------------------------------------------
# Where runs go


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded ``sqlite:///mlflow.db``, made absolute.

    Ray Train workers run in their own working directory, so relative sqlite and file URIs are
    resolved against the caller's working directory before they are handed to workers.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def default_artifact_location(experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside it in ``mlartifacts/<experiment>``; None lets a
    server (or any other store) decide."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS / experiment)


def _client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created (artifacts in ``./mlartifacts``) if missing."""
    client = _client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(name))


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the source tree of ``ran`` (or ``path``), None outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def ray_job_tags() -> dict[str, str]:
    """Ray job id (when Ray is initialised) and Ray Jobs submission id (when submitted)."""
    tags = {}
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        tags[TAG_RAY_SUBMISSION] = os.environ["RAY_JOB_SUBMISSION_ID"]
    try:
        import ray

        if ray.is_initialized():
            tags[TAG_RAY_JOB] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - tags are best effort
        pass
    return tags


# ---------------------------------------------------------------------------------------------
# One run


class RunTracker:
    """One MLflow run addressed by id; safe to create in any process (driver or rank 0)."""

    def __init__(self, run_id: str, uri: str | None = None) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.client = _client(self.uri)
        self._last_step: dict[str, int] | None = None

    # -- creating and finding runs

    @classmethod
    def create(cls, cfg: "JobConfig", *, run_name: str, tags: dict[str, str],
               uri: str | None = None) -> "RunTracker":
        """Start a new run in ``cfg.tracking.experiment``; log params and the config artifact."""
        client = _client(uri)
        experiment_id = ensure_experiment(cfg.tracking.experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        tracker = cls(run.info.run_id, uri)
        tracker.log_params(cfg.flat())
        tracker.log_config(cfg)
        return tracker

    @classmethod
    def find(cls, experiment: str, storage: str, uri: str | None = None) -> "RunTracker | None":
        """The newest run of ``experiment`` tagged with Ray Train storage ``storage``, if any."""
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        escaped = storage.replace("'", "\\'")
        runs = client.search_runs([found.experiment_id], f"tags.`{TAG_STORAGE}` = '{escaped}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return cls(runs[0].info.run_id, uri) if runs else None

    @property
    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def tag(self, key: str) -> str | None:
        return self.client.get_run(self.run_id).data.tags.get(key)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def reopen(self) -> None:
        """Mark a run that was interrupted (driver killed, failed) as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # -- params, metrics, artifacts

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values as strings); a key already logged with the same value is fine."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)) for k, v in params.items() if existing.get(k) != str(v)]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_config(self, cfg: "JobConfig") -> None:
        """The resolved config as ``config.yaml``: every run can be repeated exactly."""
        self.log_text(cfg.to_yaml(), CONFIG_ARTIFACT)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def last_steps(self) -> dict[str, int]:
        """Highest step logged so far for each metric of the run."""
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
        import time

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
        """Redraw ``training_curves.png`` (loss, top-1/top-5, lr) from the run's own history."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CURVES_ARTIFACT
            plot_curves({k: self.history(k) for k in
                         ("train_loss", "val_loss", "val_top1", "val_top5", "step_lr", "lr")}, path)
            self.client.log_artifact(self.run_id, str(path))

    # -- the final model

    def log_final_model(self, model: "nn.Module", cfg: "JobConfig", class_names: list[str],
                        input_example: "np.ndarray", metrics: dict[str, float]) -> "ModelVersion | None":
        """Log the trained model and register it under ``cfg.tracking.registered_model``.

        The pt2 model (torch.export, needs the input example; batch 2 keeps the batch dimension
        dynamic) serves predictions; ``config.yaml``, ``classes.json`` and ``state_dict.pt``
        travel with it so :func:`load_ran_model` can rebuild the real module. Returns the
        registered version (tagged with ``metrics``), or None when no name is configured.
        """
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        name = cfg.tracking.registered_model
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            extra = _model_side_files(Path(tmp), model, cfg, class_names)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model, name=MODEL_NAME, input_example=input_example,
                    signature=infer_signature(input_example, output), extra_files=extra,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    registered_model_name=name,
                )
        if not name:
            return None
        version = self.client.get_model_version(name, str(info.registered_model_version))
        for key, value in {**metrics, "run_id": self.run_id, "model": cfg.model.name}.items():
            self.client.set_model_version_tag(name, version.version, key, str(value))
        self.set_tags({TAG_VERSION: f"{name}/{version.version}"})
        return version


def _model_side_files(tmp: Path, model: "nn.Module", cfg: "JobConfig",
                      class_names: list[str]) -> list[str]:
    import torch

    (tmp / "config.yaml").write_text(cfg.to_yaml())
    (tmp / "classes.json").write_text(json.dumps(class_names))
    torch.save(model.state_dict(), tmp / "state_dict.pt")
    return [str(tmp / n) for n in ("config.yaml", "classes.json", "state_dict.pt")]


@dataclass
class RanModel:
    """Our own module rebuilt from a logged model, with what it was trained with."""

    model: "nn.Module"
    config: "JobConfig"
    class_names: list[str]


def load_ran_model(model_uri: str) -> RanModel:
    """Rebuild the trained ``ResidualAttentionNet`` from ``models:/name/version`` (or any model URI).

    ``mlflow.pytorch.load_model`` returns the exported graph; this returns our class (with
    ``forward(x, return_masks=True)``), in eval mode, with its config and class names.
    """
    import mlflow
    import torch
    import yaml

    from ran.config import parse_config
    from ran.train.worker import build_model

    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    files = next((p.parent for p in local.rglob("state_dict.pt")), None)
    if files is None:
        raise FileNotFoundError(f"{model_uri}: no state_dict.pt beside the model; was it logged by ran?")
    cfg = parse_config(yaml.safe_load((files / "config.yaml").read_text()), model_uri)
    model = build_model(cfg)
    model.load_state_dict(torch.load(files / "state_dict.pt", weights_only=True, map_location="cpu"))
    return RanModel(model.eval(), cfg, json.loads((files / "classes.json").read_text()))


# ---------------------------------------------------------------------------------------------
# Curves


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Three panels: loss per epoch, top-1/top-5 per epoch, lr per step (or per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _panel(axes[0], series, ("train_loss", "val_loss"), "loss", "epoch")
    _panel(axes[1], series, ("val_top1", "val_top5"), "accuracy", "epoch")
    lr_key = "step_lr" if series.get("step_lr") else "lr"
    _panel(axes[2], series, (lr_key,), "learning rate", "step" if lr_key == "step_lr" else "epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
