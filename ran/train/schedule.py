"""The run plan and the lr schedule, in samples seen. No Ray here.

The paper's recipes are written in iterations at a reference batch (CIFAR: lr 0.1, /10 at 64k and
96k, stop at 160k; ImageNet: /10 at 200k, 400k, 500k, stop at 530k). A run here may use any global
batch, and its worker count may change while it runs (an elastic worker group that lost a node, a
restart on a smaller allocation, ``--resume --set scaling.num_workers=N``). So a run is planned in
*samples*, the one unit that does not depend on the world size:

- an epoch is ``epoch_samples`` samples: the whole training split;
- the run stops after ``total_samples = epochs * epoch_samples``; ``epochs`` is ``train.epochs``,
  else ``schedule.total_steps`` reference iterations (``total_steps * reference_batch`` samples)
  rounded to whole epochs (at least one);
- the lr is a function of the samples seen: a linear warmup over ``schedule.warmup_epochs``
  epochs of samples, step milestones at fractions of ``schedule.total_steps`` (64k/160k = 40% of
  the run) whatever its length, or a cosine over the rest ending at ``schedule.min_lr``;
- its peak scales with the global batch by the linear rule (``optim.lr * global_batch /
  optim.reference_batch_size``).

:func:`plan_run` makes the plan of one attempt (one worker group): the run's numbers above plus
the world size's own (global batch, peak lr, optimizer steps). Given where a checkpoint left off
(``step``, ``samples``), it re-plans the rest at the new global batch: the same samples to go, the
schedule continuing from the same point and ending where it was planned.

An epoch ends exactly at its sample count, so when the global batch does not divide
``epoch_samples`` the last step of an epoch is smaller (:func:`step_size`), shared across ranks
and micro-batches by :func:`step_shares`, its lr scaled down by the same linear rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ran.config import JobConfig


@dataclass(frozen=True)
class RunPlan:
    """Concrete numbers of one attempt of a run. The first block is the run's (the same at any
    world size); the second is this attempt's (it changes with the world size)."""

    epoch_samples: int  # samples per epoch: the training split
    epochs: int  # epochs of the run
    total_samples: int  # epochs * epoch_samples: where the run stops
    reference_batch: int  # optim.reference_batch_size: the batch optim.lr is tuned for
    base_lr: float  # optim.lr: the peak lr at the reference batch
    warmup_samples: int  # linear warmup length in samples
    milestones: tuple[int, ...]  # step schedule: samples seen where lr *= gamma
    kind: str  # step | cosine | constant
    gamma: float  # step schedule factor
    min_lr: float  # cosine: final lr
    world_size: int  # training workers of this attempt
    global_batch: int  # images per full optimizer step, all workers and micro-batches together
    peak_lr: float  # lr after warmup, scaled to the global batch
    steps_per_epoch: int  # optimizer steps of a whole epoch at this global batch
    start_step: int  # optimizer steps done when this attempt began
    start_samples: int  # samples seen when this attempt began
    total_steps: int  # start_step + the steps from start_samples to total_samples

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and tags)."""
        return asdict(self)

    @property
    def warmup_steps(self) -> int:
        """Warmup length in full optimizer steps at this global batch."""
        return math.ceil(self.warmup_samples / self.global_batch)

    def epoch_end(self, samples: int) -> int:
        """The sample count where the epoch holding sample ``samples`` (0-based) ends."""
        return min((samples // self.epoch_samples + 1) * self.epoch_samples, self.total_samples)

    def steps_between(self, start: int, end: int) -> int:
        """Optimizer steps that take the run from ``start`` to ``end`` samples seen."""
        steps = 0
        while start < end:
            boundary = min(self.epoch_end(start), end)
            steps += math.ceil((boundary - start) / self.global_batch)
            start = boundary
        return steps


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``lr`` was tuned at ``reference_batch``."""
    return lr * global_batch / reference_batch


def planned_epochs(cfg: JobConfig, train_samples: int) -> int:
    """Epochs of a run: ``train.epochs``, else ``schedule.total_steps`` reference iterations of
    ``optim.reference_batch_size`` samples, in whole epochs of ``train_samples`` (at least one)."""
    if cfg.train.epochs is not None:
        return cfg.train.epochs
    assert cfg.schedule.total_steps is not None  # JobConfig enforces epochs or total_steps
    return max(1, round(cfg.schedule.total_steps * cfg.optim.reference_batch_size / train_samples))


def plan_run(cfg: JobConfig, train_samples: int, world_size: int, *, step: int = 0,
             samples: int = 0) -> RunPlan:
    """The plan of an attempt with ``world_size`` workers that begins after ``step`` optimizer
    steps and ``samples`` samples (0, 0: a fresh run).

    Args:
        cfg: the job config.
        train_samples: samples in the training split (one epoch).
        world_size: training workers of this attempt.
        step: optimizer steps done so far (by any earlier attempts).
        samples: samples seen so far.

    Raises:
        ValueError: an empty training split.
    """
    if train_samples < 1:
        raise ValueError(f"the training split {cfg.data.train_split!r} has no samples")
    sched, reference = cfg.schedule, cfg.optim.reference_batch_size
    epochs = planned_epochs(cfg, train_samples)
    total = epochs * train_samples
    milestones: tuple[int, ...] = ()
    if sched.kind == "step":
        ref_total = sched.total_steps or max(sched.milestones, default=1)
        milestones = tuple(round(m / ref_total * total) for m in sched.milestones)
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    plan = RunPlan(
        epoch_samples=train_samples, epochs=epochs, total_samples=total,
        reference_batch=reference, base_lr=cfg.optim.lr,
        warmup_samples=round(sched.warmup_epochs * train_samples), milestones=milestones,
        kind=sched.kind, gamma=sched.gamma, min_lr=sched.min_lr,
        world_size=world_size, global_batch=global_batch,
        peak_lr=scaled_lr(cfg.optim.lr, global_batch, reference),
        steps_per_epoch=math.ceil(train_samples / global_batch),
        start_step=step, start_samples=samples, total_steps=step,
    )
    return replace(plan, total_steps=step + plan.steps_between(samples, total))


def step_size(plan: RunPlan, samples: int) -> int:
    """Samples of the optimizer step that begins after ``samples`` samples: the global batch, or
    what is left of the epoch."""
    return min(plan.global_batch, plan.epoch_end(samples) - samples)


def step_shares(size: int, world_size: int, batch_size: int, accum: int) -> list[list[int]]:
    """How a step of ``size`` samples is shared: ``shares[m][r]`` samples of micro-batch ``m`` on
    rank ``r``. A full step is ``accum`` micro-batches of ``batch_size`` on every rank; a smaller
    one uses as few micro-batches as it needs (every rank the same number, as DDP requires) and
    splits each as evenly as the ranks allow (a rank may get 0 samples of the last one)."""
    per_micro = batch_size * world_size
    micros = min(accum, math.ceil(size / per_micro))
    shares = []
    for m in range(micros):
        n = min(per_micro, size - m * per_micro)
        shares.append([n // world_size + (r < n % world_size) for r in range(world_size)])
    return shares


def lr_factor(plan: RunPlan, samples: int) -> float:
    """Multiplier of ``plan.peak_lr`` for the step that begins after ``samples`` samples."""
    if samples < plan.warmup_samples:
        return min(1.0, (samples + plan.global_batch) / plan.warmup_samples)
    if plan.kind == "step":
        return plan.gamma ** sum(samples >= m for m in plan.milestones)
    if plan.kind == "cosine":
        span = max(1, plan.total_samples - plan.warmup_samples)
        progress = min(1.0, (samples - plan.warmup_samples) / span)
        floor = plan.min_lr / plan.peak_lr if plan.peak_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def lr_at(plan: RunPlan, samples: int) -> float:
    """Learning rate of a full step that begins after ``samples`` samples (after the last one:
    the schedule's final value, cosine's ``min_lr``)."""
    return plan.peak_lr * lr_factor(plan, samples)


class SampleScheduler:
    """Sets the optimizer's lr from the samples seen (:func:`lr_at`); a smaller last step of an
    epoch gets the lr scaled to its size (linear rule). It holds no state of its own: the lr is a
    function of the plan and the samples, so a re-planned run continues the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: RunPlan) -> None:
        self.optimizer, self.plan = optimizer, plan
        self.samples = plan.start_samples
        self.update(plan.start_samples)

    def update(self, samples: int, size: int | None = None) -> float:
        """Set the lr of the step that begins after ``samples`` samples and takes ``size`` (default:
        the global batch); returns it."""
        self.samples = samples
        lr = lr_at(self.plan, samples)
        if size is not None and size < self.plan.global_batch:
            lr *= size / self.plan.global_batch
        self.lr = lr
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a captured CUDA graph reads it in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Numbers only (the checkpoint loads with ``weights_only=True``)."""
        return {"samples": self.samples, "lr": lr_at(self.plan, self.samples)}


def build_scheduler(optimizer: torch.optim.Optimizer, plan: RunPlan) -> SampleScheduler:
    """The lr schedule of ``plan`` on ``optimizer``, positioned at ``plan.start_samples``."""
    return SampleScheduler(optimizer, plan)
