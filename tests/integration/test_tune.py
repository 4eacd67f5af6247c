"""`ran tune` on a real local Ray (2 CPUs) and MLflow on sqlite, over tiny synthetic shards.

Every trial is a real Ray Train run of a real Attention-56/92 on 16 px images of two classes, so
the searches are kept to one or two epochs of 16 steps. Trials hold 0.1 CPU (driver) + 0.9 CPU
(worker), so two run at once on two CPUs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

import logged
import pytest

pytestmark = pytest.mark.integration

SIZE = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, ray_local: str) -> Iterator[Path]:
    """A working directory with shards and an MLflow sqlite store, beside the local Ray (2 CPUs).

    Two classes of 16 px images, 128 for training: lr 0.01 at batch 8 reaches ~90% in one epoch.
    """
    from ran.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("tune")
    write_synthetic(str(root / "shards"), classes=2, train=128, val=64, size=SIZE, seed=0,
                    progress=False)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        yield root
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def job(workdir: Path, tiny_job):
    """``job(name, **{"dotted.key": value})``: a raw tiny job for a search (1 worker of 0.9 CPU,
    so two trials and their drivers fit on 2 CPUs; fp32, batch 8)."""
    def make(name: str, **overrides: Any) -> dict[str, Any]:
        return tiny_job(workdir / "shards", workdir / "runs", **{
            "name": name, "data.crop": SIZE, "data.eval_crop": SIZE, "data.batch_size": 8,
            "data.workers": 0, "optim.lr": 0.01, "optim.reference_batch_size": 8,
            "schedule.kind": "constant", "train.epochs": 1, "train.precision": "fp32",
            "train.channels_last": False, "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 0.9, "scaling.max_failures": 0,
            "tracking.experiment": f"tune-{name}", "tracking.registered_model": f"{name}-model",
            "tracking.log_model": True, **overrides}).model_dump()

    return make


def _runs(experiment: str) -> list[Any]:
    import mlflow

    from ran import tracking

    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def _artifact(run_id: str, path: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    dst_path=str(dest)))


def test_bad_space_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from ran.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a space that pre-flight should refuse")

    monkeypatch.setattr(ray, "init", no_ray)

    space = tmp_path / "bad.yaml"
    job = tmp_path / "job.yaml"
    job.write_text("train: {epochs: 1}\n")
    space.write_text("space:\n  model.mask_activaton: {choice: [mixed, spatial]}\n")
    assert main(["tune", str(space), "--job", str(job)]) == 2
    assert "unknown config key 'model.mask_activaton'" in capsys.readouterr().err
    space.write_text("space:\n  optim.lr: {loguniform: [0.1]}\n")
    assert main(["tune", str(space), "--job", str(job)]) == 2
    assert "optim.lr: loguniform takes [lo, hi]" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be here
    space.write_text("space:\n  optim.lr: {choice: [0.1]}\nsearch: {metric: val_acc}\n")
    assert main(["tune", str(space), "--job", str(job)]) == 2
    assert capsys.readouterr().err == (
        "error: search.metric 'val_acc' is not reported by training; use one of eval/loss, "
        "eval/top1, eval/top5, perf/ckpt_wait_s, perf/data_wait_frac, perf/epoch_time_s, "
        "perf/img_per_s, train/loss\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_searched_batch_larger_than_the_data_is_refused_before_ray_starts(
        tmp_path, capsys, monkeypatch, synth_data, tiny_job):
    import ray

    from ran.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a space that pre-flight should refuse")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())  # 16 x 2 workers
    space = tmp_path / "sizes.yaml"
    space.write_text("space:\n  data.batch_size: {choice: [16, 512]}\n")
    assert main(["tune", str(space), "--job", str(job)]) == 2
    assert capsys.readouterr().err == (
        "error: search space sizes: data.batch_size=512: one optimizer step takes data.batch_size "
        "512 x 2 workers x train.grad_accum 1 = 1024 samples, more than the 384 of split 'train' "
        f"in {synth_data}; set data.batch_size to at most 192\n")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def grid_search(workdir: Path, job) -> tuple[Any, Any]:
    """depth {56, 92} x mask activation {mixed, spatial}: 4 trials, 2 at a time, 1 epoch each."""
    from ran.tune.search import run_search
    from ran.tune.space import parse_space

    space = parse_space({
        "space": {"model.depth": {"grid": [56, 92]},
                  "model.mask_activation": {"grid": ["mixed", "spatial"]}},
        "search": {"scheduler": "fifo", "max_concurrent_trials": 2},
    }, name="depth_mask")
    return space, run_search(space, job("grid"))


def test_grid_search_nests_four_trial_runs_under_one_search_run(grid_search, workdir):
    space, outcome = grid_search
    runs = _runs("tune-grid")
    parents = [r for r in runs if r.data.tags.get("ran.kind") == "search"]
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    assert {(r.data.params["model.depth"], r.data.params["model.mask_activation"]) for r in children} \
        == {("56", "mixed"), ("56", "spatial"), ("92", "mixed"), ("92", "spatial")}
    assert all(r.info.status == "FINISHED" for r in children)
    assert all("eval/top1" in r.data.metrics for r in children)
    assert [t.status for t in outcome.trials] == ["completed"] * 4
    # Params are the options used: the search's constant lr has no milestones, gamma, final lr
    # or length in steps (train.epochs sets it).
    for run in (*parents, *children):
        assert run.data.params["schedule.kind"] == "constant", run.info.run_id
        assert {"schedule.milestones", "schedule.gamma", "schedule.total_steps", "schedule.min_lr"} & \
            set(run.data.params) == set(), run.info.run_id


def test_search_run_holds_results_table_plot_and_best_config(grid_search, workdir, tmp_path):
    import yaml

    space, outcome = grid_search
    rows = list(csv.DictReader(_artifact(outcome.parent_run_id, "results.csv", tmp_path).open()))
    assert len(rows) == 4
    assert {"trial_id", "status", "model.depth", "model.mask_activation", "eval/top1"} <= set(rows[0])
    assert rows[0]["trial_id"] == outcome.best.trial_id
    assert _artifact(outcome.parent_run_id, "metric_vs_params.png", tmp_path).read_bytes()[:4] \
        == b"\x89PNG"
    best = yaml.safe_load(_artifact(outcome.parent_run_id, "best_config.yaml", tmp_path).read_text())
    assert best["model"]["depth"] == outcome.best.overrides["model.depth"]
    assert best["tracking"]["registered_model"] == "grid-model"


def test_best_trial_model_is_registered_and_loads(grid_search):
    import torch

    from ran.runtime import ModelBundle

    _, outcome = grid_search
    assert outcome.registered is not None
    name, version = outcome.registered.rsplit("/", 1)
    assert name == "grid-model"
    loaded = ModelBundle.load(f"models:/{name}/{version}", device=torch.device("cpu"))
    assert loaded.config.model.depth == outcome.best.overrides["model.depth"]
    assert loaded.config.model.mask_activation == outcome.best.overrides["model.mask_activation"]
    with torch.no_grad():
        logits = loaded.model(torch.randn(2, 3, SIZE, SIZE))
    assert logits.shape == (2, 2)


@pytest.fixture(scope="module")
def asha_search(workdir: Path, job) -> tuple[Any, Any]:
    """Three trials, one at a time and in this order: a learning arm (lr 0.01), a dead arm
    (lr 1e-9: its output never changes, so validation stays at chance), and an arm whose depth
    no Attention network has (57), which fails when its model is built. ASHA compares the dead
    arm with the learning one after epoch 1 of 2."""
    from ran.tune.search import run_search
    from ran.tune.space import parse_space

    space = parse_space({
        "space": {"optim.lr,model.depth": {"grid": [[0.01, 56], [1.0e-9, 56], [0.01, 57]]}},
        "search": {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                   "max_concurrent_trials": 1},
    }, name="asha")
    return space, run_search(space, job("asha", **{"train.epochs": 2}))


def test_asha_stops_the_dead_arm_early(asha_search):
    _, outcome = asha_search
    by_lr = {t.overrides["optim.lr"]: t for t in outcome.trials if t.overrides["model.depth"] == 56}
    assert by_lr[0.01].status == "completed" and by_lr[0.01].epochs == 2
    assert by_lr[1e-9].status == "stopped" and by_lr[1e-9].epochs == 1
    run = _runs("tune-asha")
    stopped = next(r for r in run if r.info.run_id == by_lr[1e-9].run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["ran.trial_status"] == "stopped"


def test_failed_trial_is_recorded_and_the_best_still_chosen(asha_search):
    _, outcome = asha_search
    failed = [t for t in outcome.trials if t.status == "failed"]
    assert [t.overrides["model.depth"] for t in failed] == [57]
    assert "impossible depth 57" in failed[0].error
    run = next(r for r in _runs("tune-asha") if r.info.run_id == failed[0].run_id)
    assert run.info.status == "FAILED" and "impossible depth" in run.data.tags["ran.error"]
    assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
    assert run.data.params["model.depth"] == "57" and run.data.params["train.epochs"] == "2"
    assert outcome.best is not None and outcome.best.overrides == {"optim.lr": 0.01, "model.depth": 56}
    assert outcome.registered == "asha-model/1"


class InterruptAfter:
    """Stands in for ``sys.stdout`` and, when ``ran tune`` prints the line ``line`` starts (a
    trial result: ``TrialLines``, printed once Ray Train registered that epoch's checkpoint and
    Tune got its report), interrupts this process as Ctrl-C would (SIGUSR1: Tune saves its state
    and stops). The event is the code's own line, not a poll of the run directory."""

    def __init__(self, out, line: str) -> None:
        self.out, self.line, self.sent = out, line, False

    def write(self, text: str) -> int:
        if not self.sent and self.line in text:
            import os
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.out.write(text)

    def __getattr__(self, name):
        return getattr(self.out, name)


def test_interrupted_search_resumes_where_it_stopped(workdir, job, monkeypatch):
    """Interrupt (SIGUSR1, as Ctrl-C) once the trial has reported epoch 1 of 3, then --resume:
    the same search run and the same trial run continue, and the trial ends after epoch 3.
    (Three epochs, so the stopping run cannot finish the trial before Tune's stop lands.)"""
    import sys

    from ran.tune.search import run_search
    from ran.tune.space import parse_space

    space = parse_space({"space": {"model.mask_activation": {"grid": ["mixed"]}},
                         "search": {"scheduler": "fifo"}}, name="resume")
    resume_job = job("resume", **{"train.epochs": 3})
    watcher = InterruptAfter(sys.stdout, " epoch 1: ")
    monkeypatch.setattr(sys, "stdout", watcher)
    first = run_search(space, resume_job)
    monkeypatch.setattr(sys, "stdout", watcher.out)
    assert watcher.sent, "no trial reported epoch 1"
    assert first.interrupted and first.registered is None
    (trial,) = first.trials
    assert trial.status == "unfinished" and trial.epochs <= 1
    assert {r.info.status for r in _runs("tune-resume")} == {"KILLED"}  # none left RUNNING

    second = run_search(space, resume_job, resume=True)
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    (resumed,) = second.trials
    assert resumed.trial_id == trial.trial_id and resumed.run_id == trial.run_id
    assert resumed.status == "completed" and resumed.epochs == 3
    assert second.registered == "resume-model/1"
    runs = _runs("tune-resume")
    assert len(runs) == 2  # the search run and its one trial run, no duplicates
    import mlflow

    assert logged.epochs(mlflow.tracking.MlflowClient(), trial.run_id, "eval/top1") == [1, 2, 3]  # each once


def test_a_search_metric_of_epoch_reports_survives_mid_epoch_checkpoints(workdir, job):
    """Mid-epoch checkpoints report no epoch metrics; Tune sees epoch reports only, so a search on
    train_loss (in every epoch's report) does not fail the trial for a result without it."""
    from ran.tune.search import run_search
    from ran.tune.space import parse_space

    space = parse_space({"space": {"optim.lr": {"grid": [0.01]}},
                         "search": {"scheduler": "fifo", "metric": "train/loss", "mode": "min"}},
                        name="steps")
    outcome = run_search(space, job("steps", **{"train.checkpoint_every_steps": 4}))
    (trial,) = outcome.trials
    assert (trial.status, trial.epochs, trial.error) == ("completed", 1, "")
    assert trial.metric is not None and outcome.best is trial


def test_a_failed_search_ends_every_trial_run_still_running(workdir):
    from ran import tracking
    from ran.tune.search import SearchContext, end_trial_runs

    uri = tracking.tracking_uri()
    parent = tracking.RunTracker.create("tune-ended", run_name="s", tags={}, uri=uri)
    ctx = SearchContext("s", parent.run_id, uri)
    running = tracking.trial_run("tune-ended", parent.run_id, "s", "t1", uri)
    done = tracking.trial_run("tune-ended", parent.run_id, "s", "t2", uri)
    done.finish("FINISHED")
    end_trial_runs(ctx, "tune-ended", "FAILED")
    assert (running.status, done.status) == ("FAILED", "FINISHED")
    assert running.tag("ran.trial_status") == "failed"


def test_a_search_is_sized_from_the_command_line(workdir, job, capsys):
    """`ran tune SPACE --job JOB --set search.num_samples=2 --set scaling.num_workers=1`: the
    space file says one sample; the command line makes it two, checked like job keys."""
    import re

    import yaml

    from ran.cli import main

    space = workdir / "one_sample.yaml"
    space.write_text("space:\n  optim.lr: {choice: [0.01, 0.02]}\nsearch:\n  num_samples: 1\n")
    job_file = workdir / "sized.yaml"
    job_file.write_text(yaml.safe_dump(job("sized", **{"scaling.num_workers": 2})))
    assert main(["tune", str(space), "--job", str(job_file), "--set", "search.num_samples=2",
                 "--set", "scaling.num_workers=1"]) == 0
    out = capsys.readouterr().out
    runs = _runs("tune-sized")
    trials = [r for r in runs if r.data.tags.get("ran.kind") != "search"]
    assert len(trials) == 2, out
    assert {r.data.params["scaling.num_workers"] for r in trials} == {"1"}
    assert re.search(r"lr=0\.0[12]\b", out), out  # trial lines round the drawn values
