"""Rank 0's progress line leaves the epoch's first step (its warm-up) out of the rate and ETA."""

from __future__ import annotations

import time
from types import SimpleNamespace

from ran.train.trainer import Trainer


def _trainer(lines: list[str]) -> SimpleNamespace:
    plan = SimpleNamespace(global_batch=256, total_steps=1000, epochs=10, epoch_samples=25600)
    return SimpleNamespace(plan=plan, step=11, samples=11 * 256, epoch=0,
                           scheduler=SimpleNamespace(lr=0.1),
                           console=SimpleNamespace(say=lines.append))


def test_the_first_line_says_warming_up_until_a_second_step_ends():
    lines: list[str] = []
    Trainer._progress(_trainer(lines), 1, time.perf_counter(), 2.3)
    Trainer._progress(_trainer(lines), 0, None, 2.3)
    assert lines == ["epoch 1/10 sample 2816/25600 (global step 11/1000) loss 2.3000 lr 0.1 "
                     "warming up"] * 2


def test_the_rate_counts_the_steps_after_the_first_over_the_time_since_it_ended():
    """10 steps done, the first (warm-up) ended 1.8 s ago: 9 steps in 1.8 s = 5 steps/s =
    1280 img/s at a global batch of 256, and 989 steps left take 197.8 s (3m17s). Counting the
    warm-up step (say 15 s) would give 10 / 16.8 s = 152 img/s and an ETA of 28 minutes."""
    lines: list[str] = []
    Trainer._progress(_trainer(lines), 10, 100.0, 2.3, now=101.8)
    assert lines == ["epoch 1/10 sample 2816/25600 (global step 11/1000) loss 2.3000 lr 0.1 "
                     "1280 img/s eta 3m17s"]
