"""A training run's MLflow params are the options it uses (JobConfig.applicable): a schedule's
settings that another kind of schedule has are left out."""

from __future__ import annotations

from pathlib import Path

from ran.config import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SCHEDULE_KEYS = {"schedule.kind", "schedule.milestones", "schedule.total_steps", "schedule.gamma",
                 "schedule.warmup_epochs", "schedule.min_lr"}


def _schedule(cfg) -> dict:
    return {k: v for k, v in cfg.applicable().items() if k.startswith("schedule.")}


def test_the_demos_cosine_plan_is_logged_without_the_paper_step_schedule():
    cfg = load_config(JOBS / "demo.yaml")
    assert _schedule(cfg) == {"schedule.kind": "cosine", "schedule.warmup_epochs": 0.5,
                              "schedule.min_lr": 0.0}
    assert cfg.flat()["schedule.total_steps"] == 160_000  # still in the config (and config.yaml)


def test_a_step_schedule_keeps_its_milestones_and_the_length_they_are_fractions_of():
    cfg = load_config(None, {"train.epochs": 3, "schedule.kind": "step"})
    assert set(_schedule(cfg)) == SCHEDULE_KEYS - {"schedule.min_lr"}


def test_a_cosine_run_sized_by_total_steps_keeps_total_steps():
    cfg = load_config(None, {"schedule.kind": "cosine", "schedule.total_steps": 1000,
                             "schedule.milestones": [500]})
    assert set(_schedule(cfg)) == {"schedule.kind", "schedule.total_steps",
                                   "schedule.warmup_epochs", "schedule.min_lr"}


def test_a_constant_schedule_has_only_its_kind_and_warmup():
    cfg = load_config(None, {"train.epochs": 1, "schedule.kind": "constant"})
    assert _schedule(cfg) == {"schedule.kind": "constant", "schedule.warmup_epochs": 0.0}


def test_every_other_key_is_logged():
    cfg = load_config(None, {"train.epochs": 1, "schedule.kind": "constant"})
    assert set(cfg.flat()) - set(cfg.applicable()) == {
        "schedule.milestones", "schedule.gamma", "schedule.min_lr", "schedule.total_steps"}
