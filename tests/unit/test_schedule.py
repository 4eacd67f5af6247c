"""The run plan and lr schedule in samples: paper recipes rescaled to any global batch and run
length, and re-planned when the world size changes mid-run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ran.config import load_config
from ran.train.schedule import (
    build_scheduler, lr_at, plan_run, planned_epochs, scaled_lr, step_shares, step_size,
)


def _cfg(**overrides):
    return load_config(None, overrides)


def test_lr_scales_linearly_with_global_batch():
    cfg = _cfg(**{"optim.lr": 0.1, "optim.reference_batch_size": 64, "data.batch_size": 32,
                  "train.grad_accum": 2, "train.epochs": 1})
    plan = plan_run(cfg, train_samples=2560, world_size=4)
    assert plan.global_batch == 32 * 4 * 2
    assert plan.peak_lr == pytest.approx(0.1 * 256 / 64)
    assert (plan.epoch_samples, plan.steps_per_epoch, plan.total_steps) == (2560, 10, 10)
    assert scaled_lr(0.1, 128, 256) == pytest.approx(0.05)


def test_cifar_recipe_in_samples():
    # Paper: batch 64, /10 at 64k and 96k, stop at 160k iterations = 10.24M samples, here in whole
    # epochs of CIFAR's 50000: 204.8 -> 205 epochs.
    cfg = _cfg(**{"optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=50_000, world_size=1)
    assert (plan.epochs, plan.total_samples) == (205, 10_250_000)
    assert plan.milestones == (4_100_000, 6_150_000)  # 40% and 60% of the run, in samples
    assert plan.steps_per_epoch == 782  # 781 steps of 64 and one of 16
    assert plan.total_steps == 205 * 782


def test_the_run_in_samples_does_not_depend_on_the_world_size():
    cfg = _cfg(**{"optim.reference_batch_size": 64, "data.batch_size": 64,
                  "schedule.total_steps": 1000, "schedule.milestones": [400, 600]})
    one, four = (plan_run(cfg, train_samples=2560, world_size=w) for w in (1, 4))
    run = ("epoch_samples", "epochs", "total_samples", "milestones", "warmup_samples")
    assert [getattr(one, k) for k in run] == [getattr(four, k) for k in run]
    assert (one.epochs, one.total_samples, one.milestones) == (25, 64_000, (25_600, 38_400))
    assert (one.total_steps, four.total_steps) == (1000, 250)  # global batch 64 vs 256
    assert planned_epochs(cfg, 2560) == 25


def test_epochs_override_the_run_length_and_milestones_stay_fractions():
    cfg = _cfg(**{"train.epochs": 10, "schedule.milestones": [64_000, 96_000],
                  "schedule.total_steps": 160_000, "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=2560, world_size=2)
    assert (plan.total_samples, plan.total_steps) == (25_600, 200)
    assert plan.milestones == (10_240, 15_360)


def test_step_schedule_divides_by_ten_at_each_milestone():
    cfg = _cfg(**{"train.epochs": 10, "optim.lr": 0.1, "optim.reference_batch_size": 64,
                  "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=640, world_size=1)  # 6400 samples; milestones 2560, 3840
    assert lr_at(plan, 0) == pytest.approx(0.1)
    assert lr_at(plan, 2559) == pytest.approx(0.1)
    assert lr_at(plan, 2560) == pytest.approx(0.01)
    assert lr_at(plan, 3840) == pytest.approx(0.001)
    assert lr_at(plan, 6400) == pytest.approx(0.001)


def test_warmup_then_cosine_reaches_min_lr():
    cfg = _cfg(**{"train.epochs": 10, "schedule.kind": "cosine", "schedule.warmup_epochs": 1,
                  "schedule.min_lr": 0.001, "optim.lr": 0.1, "optim.reference_batch_size": 64,
                  "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=640, world_size=1)
    assert (plan.warmup_samples, plan.warmup_steps) == (640, 10)
    assert lr_at(plan, 0) == pytest.approx(0.01)
    assert lr_at(plan, 9 * 64) == pytest.approx(0.1)
    assert lr_at(plan, 640) == pytest.approx(0.1)
    lrs = [lr_at(plan, s) for s in range(640, 6401, 64)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(plan, 6400) == pytest.approx(0.001)


def test_constant_schedule_with_warmup():
    cfg = _cfg(**{"train.epochs": 2, "schedule.kind": "constant", "schedule.warmup_epochs": 0.5,
                  "optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=512, world_size=1)
    assert plan.warmup_samples == 256
    assert lr_at(plan, 64) == pytest.approx(0.05)
    assert lr_at(plan, 960) == pytest.approx(0.1)


def test_a_replanned_run_keeps_its_samples_and_schedule_and_rescales_the_lr():
    """2 workers for 15 steps (480 samples), then 1 worker: the same 1152 samples, the lr halved,
    the cosine continuing from sample 480 and ending at 0."""
    cfg = _cfg(**{"train.epochs": 3, "schedule.kind": "cosine", "optim.lr": 0.1,
                  "optim.reference_batch_size": 32, "data.batch_size": 16})
    two = plan_run(cfg, train_samples=384, world_size=2)
    assert (two.global_batch, two.steps_per_epoch, two.total_steps) == (32, 12, 36)
    one = plan_run(cfg, train_samples=384, world_size=1, step=15, samples=480)
    assert (one.global_batch, one.start_step, one.total_steps) == (16, 15, 15 + 42)
    assert one.total_samples == two.total_samples == 1152
    assert one.peak_lr == pytest.approx(two.peak_lr / 2) == pytest.approx(0.05)
    for samples in (480, 700, 1000):
        assert lr_at(one, samples) == pytest.approx(lr_at(two, samples) / 2)
    assert lr_at(one, 1152) == 0.0 and lr_at(two, 1152) == 0.0
    back = plan_run(cfg, train_samples=384, world_size=2, step=57 - 20, samples=832)
    assert back.total_steps == 37 + 10  # 320 samples left at 32 a step


def test_an_epoch_ends_exactly_at_its_samples_with_a_smaller_last_step():
    cfg = _cfg(**{"train.epochs": 2, "data.batch_size": 16})
    plan = plan_run(cfg, train_samples=390, world_size=2)  # 12 steps of 32 and one of 6
    assert plan.steps_per_epoch == 13 and plan.total_steps == 26
    assert [step_size(plan, s) for s in (0, 352, 384, 390, 774)] == [32, 32, 6, 32, 6]
    assert plan.epoch_end(384) == 390 and plan.epoch_end(390) == 780
    assert plan.steps_between(0, 780) == 26 and plan.steps_between(100, 390) == 10


def test_step_shares_split_a_step_evenly_with_the_same_micro_batches_on_every_rank():
    assert step_shares(64, world_size=2, batch_size=16, accum=2) == [[16, 16], [16, 16]]
    assert step_shares(6, world_size=2, batch_size=16, accum=2) == [[3, 3]]
    assert step_shares(37, world_size=2, batch_size=16, accum=2) == [[16, 16], [3, 2]]
    assert step_shares(2, world_size=3, batch_size=16, accum=1) == [[1, 1, 0]]
    for size in range(1, 97):
        shares = step_shares(size, world_size=3, batch_size=8, accum=4)
        assert sum(map(sum, shares)) == size
        assert all(max(m) - min(m) <= 1 and max(m) <= 8 for m in shares)


def test_an_empty_training_split_is_an_error():
    with pytest.raises(ValueError, match="training split 'train' has no samples"):
        plan_run(_cfg(**{"train.epochs": 1}), train_samples=0, world_size=1)


def test_scheduler_follows_the_plan_scales_a_smaller_step_and_saves_only_numbers(tmp_path):
    cfg = _cfg(**{"train.epochs": 10, "optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, train_samples=640, world_size=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.peak_lr)
    sched = build_scheduler(opt, plan)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sched.update(2560) == pytest.approx(0.01)
    assert sched.update(2560, size=16) == pytest.approx(0.01 * 16 / 64)  # linear rule
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == {"samples": 2560,
                                                                "lr": pytest.approx(0.01)}
    resumed = plan_run(cfg, train_samples=640, world_size=2, step=40, samples=2560)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    build_scheduler(opt2, resumed)  # positioned at the resume point, scaled to 2 workers
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02)


def test_schedule_imports_without_ray():
    code = "import sys, ran.train.schedule; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
