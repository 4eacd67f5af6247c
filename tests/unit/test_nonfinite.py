"""A run whose loss or weights stop being finite stops at that step with the last finite
checkpoint kept, and nothing non-finite passes the registration gate."""

from __future__ import annotations

import math

import pytest
import torch

from ran.config import parse_config

STEPS_PER_EPOCH = 4  # 64 train samples, batch 16, one worker


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), classes=4, train=64, val=16, size=16, samples_per_shard=32,
                    progress=False, workers=1)
    return str(out)


def _trainer(data: str, **train):
    from ran.train.launch import resolve_config
    from ran.train.trainer import Trainer

    cfg, _ = resolve_config(parse_config({
        "model": {"name": "attention56", "stem": "cifar"},
        "data": {"recipe": "cifar", "path": data, "crop": 16, "batch_size": 16, "workers": 0},
        "optim": {"reference_batch_size": 16},
        "schedule": {"kind": "constant"},
        "train": {"epochs": 3, "seed": 1, "precision": "fp32", "log_every": 2, **train},
    }))
    return Trainer(cfg)


def _checkpoints(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_nan_loss_stops_at_the_logging_step_and_keeps_the_last_finite_checkpoint(data, tmp_path):
    from ran.train.trainer import Diverged, LocalReporter
    from ran.tracking import nonfinite_tensors
    from ran.runtime import load_checkpoint

    trainer = _trainer(data)
    reporter = LocalReporter(tmp_path)
    trainer.run_epoch(reporter)
    assert _checkpoints(tmp_path) == ["epoch=0001_step=0000004"]
    with torch.no_grad():  # what lr=1e8 does in a step or two: every output NaN
        next(trainer.raw_model.parameters()).fill_(math.nan)

    with pytest.raises(Diverged) as err:
        trainer.run_epoch(reporter)
    # Epoch 2's first step at the logging cadence (log_every 2) is step 6.
    assert str(err.value) == "the training loss is nan at step 6"
    assert err.value.step == 6
    assert _checkpoints(tmp_path) == ["epoch=0001_step=0000004"]  # nothing non-finite written
    state = load_checkpoint(tmp_path / "epoch=0001_step=0000004")
    assert nonfinite_tensors(state["model"]) == []


def test_weights_that_are_not_finite_are_never_checkpointed(data, tmp_path):
    """A BatchNorm running variance gone to NaN leaves the training loss finite (batch statistics)
    but the model useless: the checkpoint at the epoch's end is refused."""
    from ran.train.trainer import Diverged, LocalReporter

    trainer = _trainer(data, eval_every=5)  # epoch 1 is not validated, only checkpointed
    bn = next(m for m in trainer.raw_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(math.nan)
    reporter = LocalReporter(tmp_path)
    with pytest.raises(Diverged) as err:
        trainer.run_epoch(reporter)
    assert str(err.value) == f"the weights are not finite at step {STEPS_PER_EPOCH}"
    assert _checkpoints(tmp_path) == []
    assert all(math.isfinite(m["train/loss"]) for m in reporter.metrics)


def test_a_validation_loss_that_is_not_finite_stops_the_run(data, tmp_path):
    from ran.train.trainer import Diverged, LocalReporter

    trainer = _trainer(data)
    bn = next(m for m in trainer.raw_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(math.inf)  # eval mode divides by it... and NaNs follow
    bn.running_mean.fill_(math.inf)
    with pytest.raises(Diverged, match=r"^the validation loss is nan at step 4$"):
        trainer.run_epoch(LocalReporter(tmp_path))
    assert _checkpoints(tmp_path) == []


def test_the_registration_gate_refuses_what_is_not_finite():
    from ran.tracking.models import nonfinite_reason, nonfinite_tensors, registration_gate

    cfg = parse_config({"tracking": {"registered_model": "tiny"}})
    state = {"a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, math.inf]),
             "c.num_batches_tracked": torch.tensor(3), "d.bias": torch.tensor([math.nan])}
    assert nonfinite_tensors(state) == ["b.weight", "d.bias"]
    assert nonfinite_reason({"eval/top1": "0.25", "eval/loss": "nan"}) == "eval/loss nan"

    gate = registration_gate(cfg, {"eval/top1": 0.25, "eval/loss": math.nan})
    assert (gate.register, gate.reason) == (False, "not registered: not finite: eval/loss nan")
    gate = registration_gate(cfg, {"eval/top1": 0.25, "eval/loss": 1.3}, nonfinite_tensors(state), 4)
    assert (gate.register, gate.reason) == (
        False, "not registered: not finite: 2 of 4 weight tensors (first b.weight)")
    assert registration_gate(cfg, {"eval/top1": 0.25, "eval/loss": 1.3}, [], 4).register
