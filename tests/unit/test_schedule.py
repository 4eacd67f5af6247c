"""The run plan and lr schedules: paper recipes rescaled to any global batch and run length."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ran.config import load_config
from ran.train.schedule import build_scheduler, lr_at, plan_run, scaled_lr


def _cfg(**overrides):
    return load_config(None, overrides)


def test_lr_scales_linearly_with_global_batch():
    cfg = _cfg(**{"optim.lr": 0.1, "optim.reference_batch_size": 64, "data.batch_size": 32,
                  "train.grad_accum": 2, "train.epochs": 1})
    plan = plan_run(cfg, batches_per_epoch=10, world_size=4)
    assert plan.global_batch == 32 * 4 * 2
    assert plan.peak_lr == pytest.approx(0.1 * 256 / 64)
    assert plan.steps_per_epoch == 5
    assert scaled_lr(0.1, 128, 256) == pytest.approx(0.05)


def test_cifar_recipe_at_reference_batch_keeps_paper_iterations():
    # Paper: batch 64, /10 at 64k and 96k, stop at 160k.
    cfg = _cfg(**{"optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, batches_per_epoch=782, world_size=1)
    assert abs(plan.total_steps - 160_000) <= 782 // 2  # rounded to whole epochs
    assert plan.milestones == (round(0.4 * plan.total_steps), round(0.6 * plan.total_steps))


def test_total_steps_rescale_to_a_larger_global_batch():
    cfg = _cfg(**{"optim.reference_batch_size": 64, "data.batch_size": 64,
                  "schedule.total_steps": 1000, "schedule.milestones": [400, 600]})
    plan = plan_run(cfg, batches_per_epoch=10, world_size=4)  # global batch 256: 4x fewer steps
    assert plan.total_steps == 250
    assert plan.epochs == 25
    assert plan.milestones == (100, 150)


def test_epochs_override_the_run_length_and_milestones_stay_fractions():
    cfg = _cfg(**{"train.epochs": 10, "schedule.milestones": [64_000, 96_000],
                  "schedule.total_steps": 160_000})
    plan = plan_run(cfg, batches_per_epoch=20, world_size=2)
    assert plan.total_steps == 200
    assert plan.milestones == (80, 120)


def test_step_schedule_divides_by_ten_at_each_milestone():
    cfg = _cfg(**{"train.epochs": 10, "optim.lr": 0.1, "optim.reference_batch_size": 64,
                  "data.batch_size": 64})
    plan = plan_run(cfg, batches_per_epoch=10, world_size=1)
    assert lr_at(plan, 0) == pytest.approx(0.1)
    assert lr_at(plan, 39) == pytest.approx(0.1)
    assert lr_at(plan, 40) == pytest.approx(0.01)
    assert lr_at(plan, 60) == pytest.approx(0.001)
    assert lr_at(plan, 99) == pytest.approx(0.001)


def test_warmup_then_cosine_reaches_min_lr():
    cfg = _cfg(**{"train.epochs": 10, "schedule.kind": "cosine", "schedule.warmup_epochs": 1,
                  "schedule.min_lr": 0.001, "optim.lr": 0.1, "optim.reference_batch_size": 64,
                  "data.batch_size": 64})
    plan = plan_run(cfg, batches_per_epoch=10, world_size=1)
    assert plan.warmup_steps == 10
    assert lr_at(plan, 0) == pytest.approx(0.01)
    assert lr_at(plan, 9) == pytest.approx(0.1)
    assert lr_at(plan, 10) == pytest.approx(0.1)
    lrs = [lr_at(plan, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(plan, 100) == pytest.approx(0.001)


def test_constant_schedule_with_warmup():
    cfg = _cfg(**{"train.epochs": 2, "schedule.kind": "constant", "schedule.warmup_epochs": 0.5,
                  "optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, batches_per_epoch=8, world_size=1)
    assert plan.warmup_steps == 4
    assert lr_at(plan, 1) == pytest.approx(0.05)
    assert lr_at(plan, 15) == pytest.approx(0.1)


def test_epoch_shorter_than_grad_accum_is_an_error():
    cfg = _cfg(**{"train.epochs": 1, "train.grad_accum": 4})
    with pytest.raises(ValueError, match="grad_accum"):
        plan_run(cfg, batches_per_epoch=3, world_size=1)


def test_scheduler_follows_the_plan_and_its_state_is_weights_only(tmp_path):
    cfg = _cfg(**{"train.epochs": 10, "optim.reference_batch_size": 64, "data.batch_size": 64})
    plan = plan_run(cfg, batches_per_epoch=10, world_size=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.peak_lr)
    sched = build_scheduler(opt, plan)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[39] == pytest.approx(0.1) and seen[40] == pytest.approx(0.01)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.peak_lr)
    sched2 = build_scheduler(opt2, plan)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 50
    opt2.step()
    sched2.step()  # the restored scheduler continues where the first one stopped
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(0.01)


def test_schedule_imports_without_ray():
    code = "import sys, ran.train.schedule; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
