"""`ran tune SPACE.yaml --job JOB.yaml`: a Ray Tune search in which every trial is a Ray Train run.

Order of events (:func:`run_search`):

1. *Pre-flight*, before Ray starts: every value of every distribution is applied to the job and
   validated (:func:`ran.tune.space.check_space`); the data and the base model are checked as
   ``ran train`` checks them; the searcher is built (Optuna must be installed for TPE).
2. A parent MLflow run for the search (found again by its storage tag on ``--resume``).
3. ``Tuner.fit()``. Ray Train V2 refuses ``Tuner(trainer)``, so each trial runs a small driver
   (:func:`_trial_driver`, ``driver_cpus`` CPU) that runs a :class:`ran.train.launch.Launcher`
   with a ``TuneReportCallback``: every epoch's report reaches Tune, which stops weak trials (ASHA).
   The trial's MLflow run is a child of the search run (tag ``mlflow.parentRunId``). At most as
   many trials run at once as the cluster can place workers for, so drivers never hold CPUs that
   their own workers wait for.
4. Results: each trial is *completed*, *stopped* (by ASHA) or *failed*; its child run gets that
   status. The parent run gets ``results.csv``, ``metric_vs_params.png`` and ``best_config.yaml``;
   the best completed trial's final model is logged to its run and registered under the job's
   ``tracking.registered_model`` if it passes the job's registration gate (e.g.
   ``tracking.register_if_beats: champion``; otherwise the last line says why). The top-k trials
   are printed.

A search lives in ``storage.path/<job>-<space>`` (Tune's experiment directory); each trial's Ray
Train run beside it in ``<job>-<space>-<trial id>``. ``--resume`` restores an interrupted search
with ``Tuner.restore``: finished trials stay finished, unfinished ones continue from their latest
checkpoint and MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from ray import tune
from ray.train import Result
from ray.tune import CLIReporter, ExperimentAnalysis
from ray.tune.error import TuneError
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ran import tracking
from ran.config import (
    ConfigError, JobConfig, apply_overrides, flatten, load_config, parse_config, parse_set,
)
from ran.data.read import split_shards
from ran.tracking import (
    BASE_CONFIG, BEST_CONFIG, PLOT_PNG, RESULTS_CSV, SPACE_ARTIFACT, TAG_BEST_RUN, TAG_ERROR,
    TAG_KIND, TAG_PARENT, TAG_SEARCH, TAG_TRIAL, TAG_TRIAL_STATUS,
)
from ran.tracking.models import Registration
from ran.train import console, localray
from ran.train.launch import Launcher, check_data, check_job, check_sizes, finalize, open_run
from ran.train.rundir import storage_for
from ran.train import schedule
from ran.table import cell, format_table
from ran.tune.space import (
    SearchSpace, check_search_metric, check_space, from_command_line, load_space,
)

# Searched keys that change how many samples a step takes (checked against the data per value).
SIZE_KEYS = ("data.batch_size", "scaling.num_workers", "train.grad_accum", "data.train_split",
             "data.val_split")
COMPLETED, STOPPED, FAILED, UNFINISHED = "completed", "stopped", "failed", "unfinished"
TRIAL_END_WAIT_S = 30.0  # how long an interrupted search waits for a stopped trial to end its run
_RUN_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED", UNFINISHED: "KILLED"}


@dataclass(frozen=True)
class SearchContext:
    """What every trial driver needs from the head (pickled into the trial)."""

    name: str  # search name: Tune experiment directory and the prefix of trial run names
    parent_run_id: str  # the search's MLflow run
    tracking_uri: str  # MLflow, resolved in the head (trials run in another directory)


@dataclass
class TrialOutcome:
    """One trial of a finished search."""

    trial_id: str
    status: str  # completed | stopped | failed | unfinished
    overrides: dict[str, Any]  # searched dotted key -> value
    metric: float | None  # last reported value of the search metric
    best_metric: float | None  # best value over the trial's epochs
    epochs: int  # epochs reported
    run_id: str | None = None  # the trial's MLflow run
    error: str = ""  # first line of the error of a failed trial


@dataclass
class SearchOutcome:
    """A finished (or interrupted) search."""

    name: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None = None
    best_config: JobConfig | None = None
    registered: str | None = None  # "name/version" of the best model
    registration: str = ""  # the registration gate's reason (one line), "" when none applies
    interrupted: bool = False
    storage: str = ""  # the search directory (local path or URI)


# ---------------------------------------------------------------------------------------------
# Pre-flight (no Ray)


def search_name(space: SearchSpace, base: JobConfig) -> str:
    """``<job run name>-<space file stem>``, e.g. ``cifar10_attention56-depth_mask``."""
    return f"{base.run_name}-{space.name}"


def check_search(space: SearchSpace, job_raw: dict[str, Any]) -> JobConfig:
    """The space against the job (:func:`ran.tune.space.check_space`, the search metric), then the
    base job as the Launcher's pre-flight checks it before data (:func:`ran.train.launch.check_job`;
    a searched model is checked per trial). What ``ran submit --tune`` checks; returns the base.

    Raises:
        ConfigError: one line naming the key.
    """
    base = check_space(space, job_raw)
    check_search_metric(space.settings, base)
    check_job(base, model=not any(k.startswith("model.") for k in space.searched_keys))
    return base


def prepare(space: SearchSpace, job_raw: dict[str, Any]) -> tuple[JobConfig, dict[str, Any]]:
    """Validate the space against the job (:func:`check_search`), then the data as the Launcher's
    pre-flight does (:func:`ran.train.launch.check_data`), for every searched batch size too.

    Returns the base config with absolute paths and ``model.num_classes`` set, and the manifest.
    """
    base = check_search(space, job_raw)
    base, manifest = check_data(base)
    for dist in space.params.values():  # a searched batch, worker count or grad_accum
        if any(k in SIZE_KEYS for k in dist.keys):
            for value in dist.probes():
                try:
                    check_sizes(base.with_values(dist.assignments(value)), manifest)
                except ConfigError as err:
                    raise ConfigError(f"search space {space.name}: {dist.name}={value!r}: "
                                      f"{err}") from None
    s = space.settings
    max_t = asha_max_t(space, base, manifest)
    if s.scheduler == "asha" and s.grace_period > max_t:
        raise ConfigError(f"search space {space.name}: grace_period {s.grace_period} exceeds the "
                          f"{max_t} epochs of a full trial; lower it or raise search.max_t")
    return base, manifest


def planned_epochs(cfg: JobConfig, manifest: dict[str, Any]) -> int:
    """Epochs a run of ``cfg`` trains: ``train.epochs``, else ``schedule.total_steps`` reference
    iterations in epochs of the training split (:func:`ran.train.schedule.planned_epochs`)."""
    if cfg.train.epochs is not None:
        return cfg.train.epochs
    total = sum(n for _, n in split_shards(cfg.data.path, manifest, cfg.data.train_split))
    return schedule.planned_epochs(cfg, total)


def asha_max_t(space: SearchSpace, base: JobConfig, manifest: dict[str, Any]) -> int:
    """ASHA's ``max_t``: ``search.max_t``, else the epochs of the base job."""
    return space.settings.max_t or planned_epochs(base, manifest)


def build_searcher(space: SearchSpace, limit: int = 0) -> Any:
    """Random/grid sampling, or Optuna's TPE (ConfigError when optuna is not installed), running
    at most ``limit`` trials at once (0: no limit)."""
    s = space.settings
    if s.search_alg == "optuna":
        try:
            import optuna  # noqa: F401 - optional (the optuna extra): needed only by such spaces
        except ImportError:
            raise ConfigError("search_alg optuna needs Optuna: pip install 'ran[optuna]' "
                              "(or use search_alg: random)") from None
        searcher = OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher
    # Tune ignores TuneConfig.max_concurrent_trials for this generator: it limits itself.
    return BasicVariantGenerator(max_concurrent=limit, random_state=s.seed)


def build_scheduler(space: SearchSpace, max_t: int) -> Any:
    """ASHA on the per-epoch metric (time axis: the reported ``epoch``), or FIFO."""
    s = space.settings
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def trial_cpus_gpus(space: SearchSpace, base: JobConfig) -> tuple[float, int]:
    """CPUs and GPUs one trial holds: its driver plus its Ray Train workers (an elastic group's
    maximum: it grows to that when it can)."""
    sc = base.scaling
    cpus = space.settings.resources.driver_cpus + sc.max_workers * sc.cpus_per_worker
    return cpus, sc.max_workers if sc.use_gpu else 0


def concurrency_limit(space: SearchSpace, base: JobConfig, nodes: list[dict[str, float]]) -> int:
    """Trials that fit on the cluster's ``nodes`` at once (each node's resources), placed node by
    node as Ray places them (:func:`ran.train.localray.place`: the driver and each worker whole on
    one node), capped by ``max_concurrent_trials``.

    Tune only sees each driver's CPU fraction; without this limit it would start more drivers
    than there are CPUs for their workers, and trials would wait on each other forever. Cluster
    totals are not enough: 2 nodes of 3 CPUs hold one trial of 2 workers x 2 CPUs, not two.

    Raises:
        ConfigError: not even one trial fits.
    """
    driver = {"CPU": space.settings.resources.driver_cpus}
    trial = [driver] + [localray.worker_bundle(base)] * base.scaling.max_workers
    wanted = space.settings.max_concurrent_trials
    free = [dict(node) for node in nodes]
    fit = 0
    while (not wanted or fit < wanted) and localray.place(free, trial):
        fit += 1
    if fit < 1:
        cpus, gpus = trial_cpus_gpus(space, base)
        need = f"{cpus:g} CPUs" + (f" and {gpus} GPUs" if gpus else "")
        has = ", ".join(f"{n.get('CPU', 0):g} CPUs + {n.get('GPU', 0):g} GPUs" for n in nodes)
        raise ConfigError(
            f"one trial needs {need} (driver {driver['CPU']:g} + {base.scaling.max_workers} "
            f"workers x {base.scaling.cpus_per_worker:g} CPU), each worker whole on one node, but "
            f"the Ray cluster's {len(nodes)} node(s) have {has or 'nothing'}; lower "
            "search.resources.num_workers / cpus_per_worker or add nodes")
    return fit


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)


def trial_config(job_raw: dict[str, Any], overrides: dict[str, Any], name: str,
                 trial_id: str) -> JobConfig:
    """A trial's job: the base + its searched values, its own storage directory and run name.

    Trials neither log nor register their models: the search logs and registers the best one.
    """
    raw = apply_overrides(copy.deepcopy(job_raw), overrides)
    raw = apply_overrides(raw, {
        "storage.name": f"{name}-{trial_id}",
        "tracking.run_name": f"{name}/{trial_id}",
        "tracking.log_model": False,
        "tracking.registered_model": None,
    })
    return parse_config(raw, f"trial {trial_id}")


class EpochReports(TuneReportCallback):
    """Ray Train's reports to Tune, of epoch ends only (they carry ``train/loss``): a mid-epoch
    checkpoint's report (``train.checkpoint_every_steps``, a SIGTERM notice) holds no epoch
    metrics, and Tune fails a trial whose result lacks the search metric. Every epoch report holds
    :data:`ran.tracking.EPOCH_METRICS` (:func:`ran.tune.space.check_search_metric`)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "train/loss" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _trial_driver(params: dict[str, Any], *, space: SearchSpace, job_raw: dict[str, Any],
                  ctx: SearchContext) -> None:
    """Tune's trainable: build and fit one Ray Train run, reporting every epoch to Tune."""
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri  # this actor runs in the trial directory
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(job_raw, space.trial_overrides(params), ctx.name, trial_id)
    tags = {TAG_PARENT: ctx.parent_run_id, TAG_SEARCH: ctx.name, TAG_TRIAL: trial_id}
    Launcher(cfg, resume=_started_before(cfg), callbacks=[EpochReports()], run_tags=tags,
             resume_from_nothing=True).run()  # resume_from_nothing: restored before a checkpoint


def _started_before(cfg: JobConfig) -> bool:
    """Whether this trial's Ray Train directory exists (a restored search continues it)."""
    try:
        storage_for(cfg, resume=True)
    except ConfigError:  # "nothing to resume"
        return False
    return True


# ---------------------------------------------------------------------------------------------
# MLflow: the parent run and the trial runs


def open_parent_run(space: SearchSpace, base: JobConfig, name: str, storage_uri: str,
                    uri: str, resume: bool) -> tracking.RunTracker:
    """The search's MLflow run, opened as a training run is (:func:`ran.train.launch.open_run`):
    found by its storage tag on resume (and reopened), else created."""
    tags = {TAG_KIND: "search", TAG_SEARCH: name,
            "mlflow.note.content": space.description or f"ran tune {space.name}",
            **tracking.ray_job_tags(ray.get_runtime_context().get_job_id())}
    return open_run(base, storage_uri, uri, resume=resume, tags=tags, reopen_finished=True,
                    create=lambda all_tags: _create_parent_run(space, base, name, uri, all_tags))


def _create_parent_run(space: SearchSpace, base: JobConfig, name: str, uri: str,
                       tags: dict[str, Any]) -> tracking.RunTracker:
    """A new search run: the base job's options (not the searched ones), the settings, the space."""
    parent = tracking.RunTracker.create(base.tracking.experiment, run_name=name, tags=tags, uri=uri)
    searched = set(space.searched_keys)
    # The options the trials use (JobConfig.applicable), unless the schedule itself is searched.
    used = base.flat() if "schedule.kind" in searched else base.applicable()
    parent.log_params({k: v for k, v in used.items() if k not in searched})
    parent.log_params({f"search.{k}": v for k, v in _flat_settings(space).items()})
    parent.log_params({"search.space": space.name, "search.keys": ",".join(space.searched_keys)})
    parent.log_text(base.to_yaml(), BASE_CONFIG)
    parent.log_text(_space_yaml(space), SPACE_ARTIFACT)
    return parent


def _flat_settings(space: SearchSpace) -> dict[str, Any]:
    return flatten(space.settings.model_dump())


def _space_yaml(space: SearchSpace) -> str:
    raw = {"space": {d.name: {d.kind: list(d.values)} for d in space.params.values()},
           "set": space.fixed, "search": space.settings.model_dump()}
    return yaml.safe_dump(raw, sort_keys=False)


def record_trial(trial: TrialOutcome, ctx: SearchContext, experiment: str,
                 params: dict[str, Any] | None = None) -> None:
    """Give the trial's child run its final status (creating one, with ``params``, for a trial
    that failed before its run started, so that every trial of the search is in MLflow)."""
    if trial.run_id is None and trial.status != FAILED:
        return  # never started (an interrupted search): --resume starts its run
    if trial.run_id is None:
        run = tracking.trial_run(experiment, ctx.parent_run_id, ctx.name, trial.trial_id,
                                 ctx.tracking_uri)
        trial.run_id = run.run_id
        run.log_params(params or trial.overrides)
    run = tracking.RunTracker(trial.run_id, ctx.tracking_uri)
    run.set_tags({TAG_TRIAL_STATUS: trial.status, **({TAG_ERROR: trial.error[:5000]} if trial.error else {})})
    if trial.status == UNFINISHED:
        # Tune returns from an interrupted fit while a stopped trial's driver may still be ending
        # its run (as FAILED: it sees only its own training stop). Let it, then say KILLED last.
        deadline = time.monotonic() + TRIAL_END_WAIT_S
        while run.status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
    status, wanted = run.status, _RUN_STATUS[trial.status]
    if status != wanted and not (status == "FINISHED" and trial.status == COMPLETED):
        run.finish(wanted)


def end_trial_runs(ctx: SearchContext, experiment: str, status: str) -> None:
    """End every trial run of the search still RUNNING with ``status`` (the search stopped with
    an error or Ctrl-C; no run is left RUNNING without an end time). Best effort: a failure to
    reach MLflow is a warning, never hiding the search's own error."""
    try:
        for trial_id, run_id in tracking.child_runs(ctx.parent_run_id, experiment,
                                                   ctx.tracking_uri).items():
            run = tracking.RunTracker(run_id, ctx.tracking_uri)
            if run.status == "RUNNING":
                run.set_tags({TAG_TRIAL_STATUS: UNFINISHED if status == "KILLED" else FAILED})
                run.finish(status)
    except Exception as err:  # noqa: BLE001 - the search's error matters more
        print(f"warning: could not end the trial runs of search {ctx.name}: {err}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Results


def full_length(space: SearchSpace, cfg: JobConfig, manifest: dict[str, Any], max_t: int) -> int:
    """Epochs of a trial that runs to the end: its planned epochs, capped by ASHA's ``max_t``."""
    planned = planned_epochs(cfg, manifest)
    return min(planned, max_t) if space.settings.scheduler == "asha" else planned


def collect(grid: Any, space: SearchSpace, job_raw: dict[str, Any], manifest: dict[str, Any],
            ctx: SearchContext, experiment: str, max_t: int) -> list[TrialOutcome]:
    """One :class:`TrialOutcome` per trial of a Tune ``ResultGrid``.

    ASHA stops every trial that reaches ``max_t`` too (its driver is killed right after the last
    report), so a trial counts as completed when it reported all its epochs, or its run finished.
    """
    analysis = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    tune_status = {t.trial_id: t.status for t in analysis.trials}
    runs = tracking.child_runs(ctx.parent_run_id, experiment, ctx.tracking_uri)
    finished = {r for r in runs.values()
                if tracking.RunTracker(r, ctx.tracking_uri).status == "FINISHED"}
    metric = space.settings.metric
    trials = []
    for result in grid:
        trial_id = Path(result.path).name  # trial_dirname_creator names directories by trial id
        history = _history(result.metrics_dataframe, metric)
        run_id = runs.get(trial_id)
        overrides = space.trial_overrides(result.config)
        epochs = int((result.metrics or {}).get("epoch", 0))
        if result.error is not None:
            status = FAILED
        elif tune_status.get(trial_id) != "TERMINATED":
            status = UNFINISHED
        elif run_id in finished or epochs >= full_length(
                space, trial_config(job_raw, overrides, ctx.name, trial_id), manifest, max_t):
            status = COMPLETED
        else:
            status = STOPPED
        trials.append(TrialOutcome(
            trial_id=trial_id, status=status, overrides=overrides,
            metric=history[-1] if history else None, best_metric=_best(history, space.settings.mode),
            epochs=epochs, run_id=run_id, error=_first_line(result.error),
        ))
    return trials


def _history(frame: Any, metric: str) -> list[float]:
    if frame is None or metric not in getattr(frame, "columns", ()):
        return []
    return [float(v) for v in frame[metric].tolist() if v is not None and not math.isnan(float(v))]


def _best(values: list[float], mode: str) -> float | None:
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    # Ray wraps the trial's exception in a traceback; its last line names the real error.
    return lines[-1] if lines else type(error).__name__


def pick_best(trials: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """The completed trial with the best final metric (stopped trials never ran to the end)."""
    done = [t for t in trials if t.status == COMPLETED and t.metric is not None]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda t: t.metric)  # type: ignore[arg-type]


def ranked(trials: list[TrialOutcome], mode: str) -> list[TrialOutcome]:
    """Completed trials first, then by final metric (best first); failed trials last."""
    order = {COMPLETED: 0, STOPPED: 1, UNFINISHED: 2, FAILED: 3}
    sign = -1.0 if mode == "max" else 1.0

    def key(t: TrialOutcome) -> tuple[int, float]:
        return order[t.status], sign * t.metric if t.metric is not None else math.inf

    return sorted(trials, key=key)


def results_rows(trials: list[TrialOutcome], keys: list[str], metric: str, mode: str) -> list[dict[str, Any]]:
    """The results table, one dict per trial, best first."""
    rows = []
    for rank, t in enumerate(ranked(trials, mode), 1):
        rows.append({"rank": rank, "trial_id": t.trial_id, "status": t.status,
                     **{k: t.overrides.get(k) for k in keys}, metric: t.metric,
                     f"best_{metric}": t.best_metric, "epochs": t.epochs,
                     "run_id": t.run_id or "", "error": t.error})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as CSV (columns from the first row)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)


def plot_metric_vs_params(trials: list[TrialOutcome], space: SearchSpace, path: Path) -> None:
    """:func:`metric_vs_params_figure` as a PNG at ``path``."""
    metric_vs_params_figure(trials, space).savefig(path, dpi=90)


def metric_vs_params_figure(trials: list[TrialOutcome], space: SearchSpace) -> Any:
    """One panel per searched key: the final metric of each trial against the key's value.

    Categorical keys are spread over evenly spaced positions; ``loguniform`` keys get a log axis.
    Colours tell completed, stopped (by ASHA) and failed trials apart; failed ones sit at the
    bottom of the axis with an ``x``.
    """
    keys = space.searched_keys
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    log_keys = {d.keys[0] for d in space.params.values() if d.kind == "loguniform"}
    for ax, key in zip(axes.flat, keys):
        _panel(ax, trials, key, space.settings.metric, key in log_keys)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{space.name}: {space.settings.metric} ({space.settings.mode}) per trial")
    fig.tight_layout()
    return fig


_COLOURS = {COMPLETED: "tab:blue", STOPPED: "tab:orange", UNFINISHED: "tab:gray", FAILED: "tab:red"}


def _panel(ax: Any, trials: list[TrialOutcome], key: str, metric: str, log: bool) -> None:
    values = [t.overrides.get(key) for t in trials]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = sorted({str(v) for v in values}, key=_natural) if not numeric else []
    scored = [t.metric for t in trials if t.metric is not None]
    floor = min(scored) if scored else 0.0
    for status, colour in _COLOURS.items():
        picked = [(v, t) for v, t in zip(values, trials) if t.status == status]
        if not picked:
            continue
        xs = [v if numeric else labels.index(str(v)) for v, _ in picked]
        ys = [t.metric if t.metric is not None else floor for _, t in picked]
        ax.scatter(xs, ys, c=colour, marker="x" if status == FAILED else "o", label=status, alpha=0.8)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 3 else 0)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    if log:
        ax.set_xscale("log")
        _log_ticks(ax, [v for v in values if isinstance(v, (int, float)) and v > 0])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _log_ticks(ax: Any, values: list[float]) -> None:
    """Labelled ticks on a log axis whatever its span: decades over 2+ decades, 1-2-5 over one,
    every integer multiple within one decade (a search over 2e-5..8e-5 has no decade inside)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    span = math.log10(max(values) / min(values)) if values else 3.0
    subs = (1.0,) if span >= 2 else (1.0, 2.0, 5.0) if span >= 1 else tuple(float(i) for i in range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges


def _natural(text: str) -> tuple[int, float | str]:
    try:
        return 0, float(text)
    except ValueError:
        return 1, text


def trials_table(rows: list[dict[str, Any]], columns: list[str], limit: int | None = None) -> str:
    """The console's top-k trials: ``rows`` (:func:`results_rows`) as a
    :func:`ran.table.format_table`."""
    shown = rows[:limit] if limit else rows
    return format_table(columns, [[r.get(c) for c in columns] for r in shown])


# ---------------------------------------------------------------------------------------------
# The best trial


def best_config(job_raw: dict[str, Any], best: TrialOutcome, base: JobConfig, name: str) -> JobConfig:
    """The best trial's config with the job's own tracking settings (to log and register it)."""
    cfg = trial_config(job_raw, best.overrides, name, best.trial_id)
    raw = cfg.model_dump()
    raw["tracking"] = base.tracking.model_dump()
    raw["tracking"]["run_name"] = f"{name}/{best.trial_id}"
    return parse_config(raw, "best trial")


def register_best(cfg: JobConfig, manifest: dict[str, Any], best: TrialOutcome, storage: Any,
                  uri: str) -> Registration:
    """Log the best trial's final model into its run and register it if it passes the job's
    registration gate (e.g. ``tracking.register_if_beats: champion``)."""
    if best.run_id is None:
        return Registration(False, "")
    result = Result.from_path(f"{storage.ray_path.rstrip('/')}/{cfg.storage.name}",
                              storage_filesystem=storage.filesystem)
    if result.checkpoint is None:
        return Registration(False, "")
    return finalize(cfg, manifest, tracking.RunTracker(best.run_id, uri), result.checkpoint)


def log_results(parent: Any, outcome: SearchOutcome, space: SearchSpace) -> None:
    """Results table, plot and best config onto the parent run; summary metrics and tags."""
    metric = space.settings.metric
    rows = results_rows(outcome.trials, space.searched_keys, metric, space.settings.mode)
    with tempfile.TemporaryDirectory(prefix="ran-tune-") as tmp:
        files = {RESULTS_CSV: Path(tmp) / RESULTS_CSV, PLOT_PNG: Path(tmp) / PLOT_PNG}
        write_csv(rows, files[RESULTS_CSV])
        plot_metric_vs_params(outcome.trials, space, files[PLOT_PNG])
        for path in files.values():
            parent.log_artifact(path)
    if outcome.best_config is not None:
        parent.log_text(outcome.best_config.to_yaml(), BEST_CONFIG)
    counts = {s: sum(t.status == s for t in outcome.trials) for s in _COLOURS}
    parent.log_metrics({f"search/trials_{s}": n for s, n in counts.items()}, step=0)
    if outcome.best is not None and outcome.best.metric is not None:  # of param search.metric
        parent.log_metrics({"search/best": outcome.best.metric}, step=0)
        parent.set_tags({TAG_BEST_RUN: outcome.best.run_id or "", TAG_TRIAL: outcome.best.trial_id})
    if outcome.registered:
        parent.set_tags({tracking.TAG_VERSION: outcome.registered})


# ---------------------------------------------------------------------------------------------
# The search


@contextlib.contextmanager
def _cli_reporter_output() -> Iterator[None]:
    """Tune's classic CLIReporter table (the newer output ignores ``progress_reporter``)."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


class TrialLines(tune.Callback):
    """What ``ran tune`` prints while a search runs (unless verbose, when Tune's status tables do):
    a line per trial result (its epoch and the search metric) and a line per failed trial. The
    trials' own output stays in Ray's log files (``ray.init(log_to_driver=False)``)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        metric = self.space.settings.metric
        value = result.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        print(f"trial {trial.trial_id} epoch {int(result.get('epoch', 0))}: {metric} {shown} "
              f"({self._params(trial)})", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} failed ({self._params(trial)}); its error is in the summary "
              "at the end", flush=True)

    def _params(self, trial: Any) -> str:
        overrides = self.space.trial_overrides(trial.config)
        return " ".join(f"{key.rsplit('.', 1)[-1]}={cell(value)}" for key, value in overrides.items())


def _reporter(space: SearchSpace) -> Any:
    s = space.settings
    params = {name: name.split(",")[0].split(".")[-1] if len(d.keys) == 1 else
              "/".join(k.split(".")[-1] for k in d.keys) for name, d in space.params.items()}
    return CLIReporter(parameter_columns=params, metric_columns={s.metric: s.metric, "epoch": "epoch"},
                       sort_by_metric=True, max_report_frequency=15,
                       max_progress_rows=30)


def build_tuner(space: SearchSpace, job_raw: dict[str, Any], ctx: SearchContext, storage: Any,
                limit: int, max_t: int, resume: bool) -> Any:
    """The ``Tuner`` of a search, or the restored one (``resume``)."""
    s = space.settings
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, space=space, job_raw=job_raw, ctx=ctx),
        {"cpu": s.resources.driver_cpus},
    )
    if resume:
        # With a filesystem (S3-compatible endpoint) Ray wants the path without its s3:// scheme.
        path = storage.run_uri if storage.filesystem is None else f"{storage.ray_path}/{storage.name}"
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=storage.filesystem)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.num_samples,
            search_alg=build_searcher(space, limit), scheduler=build_scheduler(space, max_t),
            trial_name_creator=lambda t: f"{ctx.name}-{t.trial_id}",
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=storage.name, storage_path=storage.ray_path, storage_filesystem=storage.filesystem,
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train retries worker failures
            # Tune's status tables with -v; by default a line per trial result (TrialLines).
            progress_reporter=_reporter(space) if console.verbose() else None,
            verbose=1 if console.verbose() else 0,
            callbacks=[] if console.verbose() else [TrialLines(space)],
        ),
    )


def run_search(space: SearchSpace, job_raw: dict[str, Any], *, address: str | None = None,
               resume: bool = False) -> SearchOutcome:
    """Pre-flight, search on Ray Tune, record every trial in MLflow, register the best model.

    Args:
        space: the parsed space file.
        job_raw: the base job as a raw tree (``load_config(...).model_dump()``).
        address: Ray address; default ``RAY_ADDRESS``, else a local Ray started (and stopped) here.
        resume: restore the interrupted search of this job and space.

    Raises:
        ConfigError, DataError: a problem found before Ray started.
    """
    base, manifest = prepare(space, job_raw)
    build_searcher(space)  # Optuna missing: say so before Ray starts
    name = search_name(space, base)
    storage = storage_for(base.with_values({"storage.name": name}), resume=resume)
    job_raw = base.model_dump()  # resolved: absolute paths, num_classes (trials run elsewhere)
    uri = tracking.tracking_uri()
    tracking.check_server(uri, experiment=base.tracking.experiment)  # before Ray starts
    # The trials' own lines (Ray Train's, each trial's progress) only with -v: TrialLines otherwise.
    started = localray.connect(address, log_to_driver=console.verbose())
    try:
        base = localray.resolve_gpu(base)  # scaling.use_gpu: auto, for every trial
        job_raw = base.model_dump()
        limit = concurrency_limit(space, base, localray.node_resources())
        parent = open_parent_run(space, base, name, storage.run_uri, uri, resume)
        ctx = SearchContext(name, parent.run_id, uri)
        print(f"search {name}: {storage.run_uri}; up to {limit} trial(s) at a time; "
              f"MLflow run {parent.run_id} ({tracking.shown(uri)})", flush=True)
        try:
            with _cli_reporter_output():
                tuner = build_tuner(space, job_raw, ctx, storage, limit,
                                    asha_max_t(space, base, manifest), resume)
                grid = tuner.fit()
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            end_trial_runs(ctx, base.tracking.experiment, status)
            parent.finish(status)
            raise
        return _finish(grid, space, base, job_raw, manifest, ctx, storage, parent)
    finally:
        if started is not None:
            started.stop()


def _finish(grid: Any, space: SearchSpace, base: JobConfig, job_raw: dict[str, Any],
            manifest: dict[str, Any], ctx: SearchContext, storage: Any, parent: Any) -> SearchOutcome:
    s = space.settings
    trials = collect(grid, space, job_raw, manifest, ctx, base.tracking.experiment,
                     asha_max_t(space, base, manifest))
    for trial in trials:
        params = trial_config(job_raw, trial.overrides, ctx.name, trial.trial_id).applicable()
        record_trial(trial, ctx, base.tracking.experiment, params)
    outcome = SearchOutcome(ctx.name, ctx.parent_run_id, s.metric, s.mode, trials,
                            storage=storage.run_uri,
                            interrupted=any(t.status == UNFINISHED for t in trials))
    outcome.best = pick_best(trials, s.mode)
    if outcome.best is not None and not outcome.interrupted:
        outcome.best_config = best_config(job_raw, outcome.best, base, ctx.name)
        before = _registered_before(parent, outcome.best)
        registration = Registration(True, "", before) if before else register_best(
            outcome.best_config, manifest, outcome.best, storage, ctx.tracking_uri)
        outcome.registered, outcome.registration = registration.version, registration.reason
    log_results(parent, outcome, space)
    parent.finish("KILLED" if outcome.interrupted else "FINISHED")
    return outcome


def _registered_before(parent: Any, best: TrialOutcome) -> str | None:
    """The version registered by an earlier pass over the same finished search (``--resume``)."""
    if parent.tag(TAG_BEST_RUN) == best.run_id:
        return parent.tag(tracking.TAG_VERSION)
    return None


def summary(outcome: SearchOutcome, space: SearchSpace) -> str:
    """The top-k table and where the results are."""
    s = space.settings
    rows = results_rows(outcome.trials, space.searched_keys, s.metric, s.mode)
    columns = ["rank", "trial_id", "status", *space.searched_keys, s.metric, "epochs"]
    counts = ", ".join(f"{sum(t.status == st for t in outcome.trials)} {st}"
                       for st in (COMPLETED, STOPPED, FAILED, UNFINISHED))
    lines = [f"search {outcome.name}: {len(outcome.trials)} trials ({counts})",
             f"top {min(s.top_k, len(rows))} by {s.metric} ({s.mode}):",
             trials_table(rows, columns, s.top_k)]
    failed = [t for t in outcome.trials if t.status == FAILED]
    for t in failed[:5]:
        lines.append(f"failed {t.trial_id}: {t.error}")
    if outcome.best is not None:
        lines.append(f"best trial:       {outcome.best.trial_id} ({s.metric} {outcome.best.metric:.4f}), "
                     f"MLflow run {outcome.best.run_id}")
    if outcome.registered:
        model, version = outcome.registered.rsplit("/", 1)
        lines.append(f"registered model: {model} version {version} (models:/{model}/{version})")
    lines.append(f"search run:       {outcome.parent_run_id} ({RESULTS_CSV}, {PLOT_PNG}, {BEST_CONFIG})")
    lines.append(f"trials:           {outcome.storage}")
    if outcome.interrupted:
        lines.append("interrupted: continue with the same command and --resume")
    elif outcome.registration and not outcome.registered:
        lines.append(outcome.registration)  # why the best model was not registered: the last line
    return "\n".join(lines)


def cli_tune(args: argparse.Namespace) -> int:
    """``ran tune SPACE.yaml --job JOB.yaml [--set k=v]... [--address A] [--resume]``."""
    tracking.refuse_password(tracking.tracking_uri(), "ran tune")
    pairs = parse_set(args.overrides)
    if args.trials is not None:
        pairs["search.num_samples"] = args.trials
    if args.epochs is not None:
        pairs["train.epochs"] = args.epochs
    space, job_pairs = from_command_line(load_space(args.space), pairs)
    job_raw = load_config(args.job, job_pairs).model_dump()
    try:
        outcome = run_search(space, job_raw, address=args.address, resume=args.resume)
    except TuneError as err:  # Tune's own failure: one line, its traceback with -v
        if console.verbose():
            raise
        text = str(err).strip().splitlines()
        cause = re.sub(r"^[\w.]*(Error|Exception): ", "", text[-1]) if text else type(err).__name__
        print(f"error: the search failed in Ray Tune: {cause} "
              "(every trial run is ended; ran -v tune ... shows Tune's traceback)", file=sys.stderr)
        return 1
    print(summary(outcome, space), flush=True)
    if outcome.interrupted:
        return 130
    return 0 if outcome.best is not None else 1
