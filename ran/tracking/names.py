"""Every MLflow name ``ran`` writes, defined once: run tags, artifact names, metric names.

Tags are read back by ``--resume`` (``TAG_STORAGE``), ``ran eval`` of a run id (``TAG_VERSION``),
``ran tune`` (its nesting tags) and the promotion gate (the version tags in ``METRIC_TAGS``).
"""

from __future__ import annotations

# Artifacts
CURVES_ARTIFACT = "training_curves.png"
CONFIG_ARTIFACT = "config.yaml"
MODEL_NAME = "model"  # artifact name of the logged model
RESULTS_CSV = "results.csv"  # on a search run
PLOT_PNG = "metric_vs_params.png"  # on a search run
BEST_CONFIG = "best_config.yaml"  # on a search run
SPACE_ARTIFACT = "space.yaml"  # on a search run
BASE_CONFIG = "base_config.yaml"  # on a search run

# Run tags
TAG_MODEL = "ran.model"  # model name of a training or search run
TAG_DATASET = "ran.dataset"  # dataset name and path of a training run
TAG_GIT = "mlflow.source.git.commit"  # MLflow's own
TAG_RAY_JOB = "ray.job_id"
TAG_RAY_SUBMISSION = "ray.submission_id"
TAG_STORAGE = "ran.storage"  # storage path/name of the Ray Train run: the key --resume looks up
TAG_JOB = "ran.job"
TAG_VERSION = "ran.registered_version"  # "name/version" registered from a run
TAG_PRECISION = "ran.precision"  # what train.precision ran as
TAG_PRECISION_REASON = "ran.precision_reason"  # why: set, or auto's step-table entry or rule
TAG_COMPILE = "ran.compile"  # the torch.compile mode the step ran with, and why
TAG_RESUMED_FROM = "ran.resumed_from"  # epoch/step a restarted worker group continued from
TAG_PLAN = "ran.plan"  # prefix: ran.plan.<field> = the latest attempt's run plan (world_size, ...)
TAG_REPLANNED = "ran.replanned"  # prefix: ran.replanned.step_<N> = what a restart at step N changed
TAG_NOTICE = "ran.notice"  # the last SIGTERM a worker group checkpointed and stopped on
TAG_KIND = "ran.kind"  # "evaluation", "explain" or "search" on runs that are not training runs
TAG_REF = "ran.model_ref"  # the model reference as given to ran eval / explain
TAG_MODEL_NAME = "ran.registered_model"
TAG_MODEL_VERSION = "ran.model_version"
TAG_SOURCE_RUN = "ran.source_run_id"  # the training run of an evaluated model
TAG_CHECKPOINT = "ran.checkpoint"
TAG_REGISTRATION = "ran.registration"  # why the final model was (not) registered (the gate)
TAG_INIT_FROM = "ran.init_from"  # the weights a fine-tuning run started from (pinned reference)
TAG_INIT_FROM_RUN = "ran.init_from_run"  # the training run of those weights, when known
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_SEARCH = "ran.search"  # the search name, on the parent and every trial run
TAG_TRIAL = "ran.trial_id"  # the Tune trial id, on trial runs
TAG_TRIAL_STATUS = "ran.trial_status"  # completed | stopped | failed
TAG_ERROR = "ran.error"  # first line of a failed trial's error
TAG_BEST_RUN = "ran.best_run_id"  # on a search run
TAG_DIVERGED = "ran.diverged"  # the step where the loss or weights stopped being finite, and why
TAG_RUN_NAME = "mlflow.runName"  # MLflow's own: the name in the runs table
TAG_DESCRIPTION = "mlflow.note.content"  # MLflow's own: a run's or version's description
TAG_METRICS_GAP = "ran.metrics_gap"  # metric values that could not be logged (MLflow unreachable)

# Dataset inputs of a training run: MLflow's context tag of its train and val splits.
DATASET_CONTEXTS = ("training", "validation")
# A node's system metrics: MLflow's system/<node>/<metric>, <node> = node_<Ray Train node rank>.
SYSTEM_METRICS_NODE = "node_{rank}"

# Metric names: one scheme, grouped by prefix as MLflow's charts group them (a section per prefix,
# sections in the order of their names), so a run's Model metrics tab opens on validation:
#   eval/   top-1, top-5, loss of the held-out split (validation during training, and `ran eval`)
#   perf/   img_per_s, data_wait_frac, epoch_time_s, ckpt_wait_s, step_ckpt_wait_s, startup_s
#   plan/   world_size, global_batch, peak_lr, total_steps per attempt, for elastic runs and runs
#           restarted with another plan (otherwise ran.plan.* tags, not one-point charts)
#   train/  loss, lr, step_loss, step_lr (each train.log_every steps), samples, epoch_samples,
#           skipped, epoch
#   search/ on a search's parent run: best (the best trial's search.metric), trials_<status>
#   system/ MLflow's own system metrics (their own tab)
# Ray reports (and Tune results) carry the same names, plus Tune's counters epoch and step.
METRIC_SECTIONS = ("eval", "perf", "plan", "search", "train")
EPOCH_METRIC = "train/epoch"  # logged with each epoch's metrics: how a restart skips logged epochs

# Model version tags: the validation metrics a version was registered with (the promotion gate's
# recorded basis); the data they were measured on is the run's validation dataset (basis.py).
METRIC_TAGS = ("eval/top1", "eval/top5", "eval/loss")
# The names versions registered before this scheme carry (read by version_metric).
_LEGACY_TAGS = {"eval/top1": "val_top1", "eval/top5": "val_top5", "eval/loss": "val_loss"}


def version_metric(tags: dict[str, str], key: str) -> str | None:
    """A :data:`METRIC_TAGS` value recorded on a model version (its earlier name if need be)."""
    value = tags.get(key)
    return value if value is not None else tags.get(_LEGACY_TAGS.get(key, key))


# What every epoch of a training run reports (ray.train.report, hence each Tune result, and the
# epoch's MLflow metrics), by name: the direction in which it is better ("max" or "min"), or None
# for counts and settings that no search optimises. Defined once: the trainer reports nothing
# else (ran.train.trainer.Trainer.run_epoch), and `ran tune` refuses a search.metric or
# search.mode that does not fit it before any trial (ran.tune.space.check_search_metric).
EPOCH_METRICS: dict[str, str | None] = {
    "train/loss": "min", "eval/top1": "max",  # eval/top1: the latest validation's, carried between
    "perf/img_per_s": "max", "perf/data_wait_frac": "min", "perf/epoch_time_s": "min",
    "perf/ckpt_wait_s": "min", "train/lr": None, "train/skipped": None, "train/epoch_samples": None,
    "train/samples": None, "epoch": None, "step": None, "perf/startup_s": None,
}
# Reported only by epochs that validate (train.eval_every, and always the last).
VALIDATION_METRICS: dict[str, str | None] = {
    "eval/loss": "min", "eval/top5": "max", "eval/samples": None, "eval/skipped": None,
}

# Key of rank 0's final report naming the metric values MLflow lacks (the server went away).
REPORT_UNLOGGED = "mlflow_unlogged"
