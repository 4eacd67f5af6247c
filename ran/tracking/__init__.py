"""The only package that talks to MLflow.

- :mod:`~ran.tracking.names`: every tag, artifact and metric name, defined once.
- :mod:`~ran.tracking.store`: the tracking URI, the one client helper, experiments, the
  pre-flight check of a tracking server (:func:`~ran.tracking.store.check_server`).
- :mod:`~ran.tracking.runs`: training runs (:class:`RunTracker`), metrics logged off the training
  path (:class:`RunLogger`), system metrics per node, dataset inputs, curves,
  evaluation/explain/search runs.
- :mod:`~ran.tracking.models`: logging and registering models, model references, the registry
  (versions, aliases, the promotion gate's reads and writes).

It imports nothing of ``ran`` but the config (for types) and never Ray; ``ran.runtime``,
``ran.train`` and the verbs above them call it.
"""

from ran.tracking.models import (
    MODELS_URI, RUN_ID, ModelSource, ModelRefError, alias_holder,
    log_final_model, model_version, model_versions, move_alias,
    nonfinite_reason, nonfinite_tensors, registered_model, registered_models, registry_source,
    describe_version, run_params, run_source, tag_version,
    version_source,
)
from ran.tracking.provenance import (
    ModelFiles, ProvenanceError, check_ran_model, download_checked, download_model_files,
)
from ran.tracking.names import *  # noqa: F401,F403 - the names are this package's vocabulary
from ran.tracking.runs import (
    RunLogger, RunTracker, SystemMetrics, child_runs, dataset_digest, describe_unlogged,
    linked_run, log_model_metrics, plot_curves, shard_datasets, trial_run,
)
from ran.tracking.store import (
    answers, check_server, client, default_artifact_location, ensure_experiment, existing_store,
    git_commit, is_server, ray_job_tags, refuse_password, shown, tracking_uri, use_uri,
)

__all__ = [
    "MODELS_URI", "RUN_ID", "ModelFiles", "ModelSource", "ModelRefError", "alias_holder",
    "download_model_files", "log_final_model", "model_version", "model_versions", "move_alias",
    "nonfinite_reason", "nonfinite_tensors",
    "registered_model", "registered_models", "registry_source", "describe_version", "run_params", "run_source", "tag_version",
    "version_source", "RunLogger", "RunTracker", "child_runs", "linked_run",
    "log_model_metrics", "plot_curves", "trial_run", "client", "default_artifact_location",
    "ensure_experiment", "existing_store", "git_commit", "ray_job_tags", "tracking_uri", "use_uri",
    "SystemMetrics", "dataset_digest", "describe_unlogged", "shard_datasets", "answers",
    "check_server", "is_server", "shown", "refuse_password", "ProvenanceError", "check_ran_model",
    "download_checked",
]
