"""Every name `ran models` lists trains, evaluates and explains from a job (issue 11, case 5):
options a model does not take are not passed, and the baselines are not refused."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from ran import runtime
from ran.config import load_config
from ran.explain import DPI, PANEL_INCHES, explain_images
from ran.models import list_models
from ran.train.launch import check_model, resolve_config
from ran.train.trainer import Trainer

VAL = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ran.data.synth import write_synthetic

    path = tmp_path_factory.mktemp("every-model")
    write_synthetic(str(path), classes=3, train=6, val=VAL, size=32, samples_per_shard=8,
                    progress=False, workers=1)
    return str(path)


@pytest.mark.parametrize("name", list_models())
def test_every_listed_model_trains_evaluates_and_explains_from_a_job(name, shards, tmp_path):
    cfg, manifest = resolve_config(load_config(None, {
        "model.name": name, "model.stem": "cifar", "data.path": shards, "data.recipe": "cifar",
        "data.batch_size": 2, "data.workers": 0, "train.epochs": 1, "train.precision": "fp32",
        "storage.path": str(tmp_path / "runs")}))
    check_model(cfg)  # the pre-flight check passes: nothing unset is passed to the model

    trainer = Trainer(cfg)
    weight = next(p for p in trainer.raw_model.parameters() if p.ndim == 4)
    before = weight.detach().clone()
    loss, samples = trainer.train_step([next(iter(trainer.train_loader))])
    assert samples == 2 and math.isfinite(loss)
    assert not torch.equal(weight.detach(), before), "one optimizer step changed no weight"

    bundle = runtime.ModelBundle.build(trainer.raw_model, cfg, manifest["classes"],
                                       device=torch.device("cpu"))
    metrics = bundle.evaluate(shards, "val", workers=0)
    assert metrics["images"] == VAL and 0.0 <= metrics["top1"] <= 1.0

    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    written = explain_images(bundle, [image], tmp_path / "out")
    modules = len(getattr(trainer.raw_model, "attention_modules", []))
    assert written.name == "attention_x.png"
    assert (modules > 0) == (name not in ("resnet152", "preact_resnet164"))
    # one column for the input, one per attention module (none for a baseline)
    assert Image.open(written).size[0] == (1 + modules) * PANEL_INCHES * DPI
