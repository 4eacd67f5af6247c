"""Learning-rate schedules and the run plan (how long a run is, at which lr). No Ray here.

The paper's recipes are written in iterations at a reference batch (CIFAR: lr 0.1, /10 at 64k and
96k, stop at 160k; ImageNet: /10 at 200k, 400k, 500k, stop at 530k). A run here may use any global
batch and any length, so :func:`plan_run` turns the config into concrete numbers:

- peak lr = ``optim.lr * global_batch / optim.reference_batch_size`` (linear scaling rule);
- run length = ``train.epochs`` when set, else ``schedule.total_steps`` reference iterations
  rescaled to the global batch (``total_steps * reference_batch / global_batch`` optimizer steps),
  rounded to whole epochs (at least one);
- step milestones are fractions of ``schedule.total_steps`` (64k/160k = 40% of the run), so they
  land at the same point of the run whatever its length;
- warmup (``schedule.warmup_epochs``) ramps linearly from ``peak/warmup_steps`` to the peak, and
  applies to every schedule kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ran.config import JobConfig


@dataclass(frozen=True)
class RunPlan:
    """Concrete numbers of one run, derived from the config and the loader length."""

    world_size: int  # training workers
    global_batch: int  # images per optimizer step, all workers and micro-batches together
    steps_per_epoch: int  # optimizer steps per epoch
    epochs: int  # epochs of the run
    total_steps: int  # optimizer steps of the run
    peak_lr: float  # lr after warmup (scaled to the global batch)
    warmup_steps: int  # linear warmup length in optimizer steps
    milestones: tuple[int, ...]  # step schedule: optimizer steps where lr *= gamma
    kind: str  # step | cosine | constant
    gamma: float  # step schedule factor
    min_lr: float  # cosine: final lr

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for logging and checkpoints)."""
        return asdict(self)


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``lr`` was tuned at ``reference_batch``."""
    return lr * global_batch / reference_batch


def plan_run(cfg: JobConfig, batches_per_epoch: int, world_size: int) -> RunPlan:
    """Resolve the run length, peak lr, warmup and milestones for ``world_size`` workers.

    Args:
        cfg: the job config.
        batches_per_epoch: micro-batches per epoch on one worker (``len(loader)``).
        world_size: number of training workers.

    Raises:
        ValueError: an epoch shorter than one optimizer step.
    """
    accum = cfg.train.grad_accum
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {batches_per_epoch} batches per worker, fewer than train.grad_accum="
            f"{accum}: lower data.batch_size, train.grad_accum or scaling.num_workers"
        )
    global_batch = cfg.data.batch_size * world_size * accum
    reference = cfg.optim.reference_batch_size
    sched = cfg.schedule
    if cfg.train.epochs is not None:
        epochs = cfg.train.epochs
    else:
        assert sched.total_steps is not None  # JobConfig enforces epochs or total_steps
        steps = sched.total_steps * reference / global_batch
        epochs = max(1, round(steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    milestones: tuple[int, ...] = ()
    if sched.kind == "step":
        ref_total = sched.total_steps or max(sched.milestones, default=1)
        milestones = tuple(round(m / ref_total * total) for m in sched.milestones)
    return RunPlan(
        world_size=world_size,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total,
        peak_lr=scaled_lr(cfg.optim.lr, global_batch, reference),
        warmup_steps=round(sched.warmup_epochs * steps_per_epoch),
        milestones=milestones,
        kind=sched.kind,
        gamma=sched.gamma,
        min_lr=sched.min_lr,
    )


def lr_factor(plan: RunPlan, step: int) -> float:
    """Multiplier of ``plan.peak_lr`` for optimizer step ``step`` (0-based)."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if plan.kind == "step":
        return plan.gamma ** sum(step >= m for m in plan.milestones)
    if plan.kind == "cosine":
        span = max(1, plan.total_steps - plan.warmup_steps)
        progress = min(1.0, (step - plan.warmup_steps) / span)
        floor = plan.min_lr / plan.peak_lr if plan.peak_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def lr_at(plan: RunPlan, step: int) -> float:
    """Learning rate at optimizer step ``step``."""
    return plan.peak_lr * lr_factor(plan, step)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: RunPlan) -> torch.optim.lr_scheduler.LRScheduler:
    """A ``LambdaLR`` following :func:`lr_factor`; the optimizer's lr must be ``plan.peak_lr``.

    The lambda is a closure, so the scheduler's ``state_dict`` holds only numbers (step count,
    base lrs) and loads with ``torch.load(weights_only=True)``.
    """
    factor: Callable[[int], float] = lambda step: lr_factor(plan, step)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
