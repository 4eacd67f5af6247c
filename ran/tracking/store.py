"""Where runs go: the tracking URI, the one MLflow client helper, experiments, run context tags.

``mlflow`` is imported inside functions, not at the top: importing it costs every Ray Train
worker process a second of CPU before its first step (see :data:`MLFLOW_IMPORT_NOTE`), and only
the driver and rank 0 talk to MLflow.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ran.tracking.names import TAG_RAY_JOB, TAG_RAY_SUBMISSION

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Measured on the 2-core CI machine (python -X importtime, torch already imported):
MLFLOW_IMPORT_NOTE = "import mlflow + MlflowClient after torch: 0.96 s per process (-X importtime)"


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


def client(uri: str | None = None) -> Any:
    """The ``MlflowClient`` of ``uri`` (default :func:`tracking_uri`): the one way ``ran`` reaches
    MLflow."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def use_uri(uri: str | None = None) -> None:
    """Point MLflow's fluent API (``mlflow.log_model``, artifact downloads) at ``uri``."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri or tracking_uri())


def default_artifact_location(experiment: str, uri: str | None = None) -> str | None:
    """Artifacts of a sqlite store live beside it in ``mlartifacts/<experiment>``; None lets a
    server (or any other store) decide."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS / experiment)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created (artifacts in ``./mlartifacts``) or restored if
    deleted."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(name, uri))


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the source tree of ``ran`` (or ``path``), None outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def ray_job_tags(job_id: str | None = None) -> dict[str, str]:
    """Tags linking a run to its Ray job (``job_id``, given by the caller that has Ray up) and to
    its Ray Jobs submission (``RAY_JOB_SUBMISSION_ID``, set by Ray in a submitted job)."""
    tags = {}
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        tags[TAG_RAY_SUBMISSION] = os.environ["RAY_JOB_SUBMISSION_ID"]
    if job_id:
        tags[TAG_RAY_JOB] = job_id
    return tags
