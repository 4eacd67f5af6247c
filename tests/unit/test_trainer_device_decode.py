"""The Trainer on the device-decoding pipeline (data.decode: gpu, here in its CPU form; validation
through the eval transform, as `ran eval`), and a training step that leaves its loss on the
device (no host sync per step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ran.config import parse_config
from ran.data.gpu import DeviceLoader
from ran.data.read import Loader
from ran.data.write import build_shards
from ran.runtime import ModelBundle


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """An image folder of 24 train and 13 val JPEGs (20..40 px) in 3 classes, as shards."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 13)):
        for i in range(count):
            folder = src / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(20, 41)), int(rng.integers(20, 41)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    build_shards("imagefolder", str(src), str(out), samples_per_shard=7, workers=1, progress=False)
    return str(out)


def make_trainer(data, decode):
    from ran.train.launch import resolve_config
    from ran.train.trainer import Trainer

    cfg, _ = resolve_config(parse_config({
        "model": {"name": "attention56", "stem": "cifar"},
        "data": {"recipe": "imagenet", "path": data, "crop": 16, "eval_crop": 16, "batch_size": 8,
                 "workers": 0, "decode": decode},
        "train": {"epochs": 1, "seed": 2, "precision": "fp32"},
    }))
    return Trainer(cfg)


def test_trainer_trains_on_the_device_pipeline_and_validates_as_ran_eval_does(jpeg_data):
    trainer = make_trainer(jpeg_data, "gpu")
    assert isinstance(trainer.train_loader, DeviceLoader)
    assert type(trainer.val_loader) is Loader  # the eval transform in the workers

    metrics = trainer.train_epoch()
    assert trainer.step == 3 and metrics["train/skipped"] == 0
    assert np.isfinite(metrics["train/loss"])
    val = trainer.validate()
    assert val["eval/samples"] == 13 and val["eval/skipped"] == 0

    # One number: the same model evaluated as `ran eval` does, after a run that trained with the
    # CPU decode, gives the recorded figures exactly (same pixels, device and precision).
    cpu = ModelBundle.build(trainer.raw_model, trainer.cfg.with_values({"data.decode": "cpu"}),
                            device=torch.device("cpu")).evaluate(trainer.cfg.data.path, "val", workers=0)
    assert cpu["images"] == 13
    assert (cpu["top1"], cpu["top5"], cpu["loss"]) == (val["eval/top1"], val["eval/top5"], val["eval/loss"])


def test_train_step_leaves_the_loss_on_the_device(jpeg_data):
    trainer = make_trainer(jpeg_data, "cpu")
    assert type(trainer.train_loader) is Loader
    trainer.train_loader.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    images = trainer.normalize(batch.images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # batch statistics, as in the step: the loss the step will see
        expected = float(trainer.criterion(trainer.model(images), batch.labels))

    loss_sum, samples = trainer.train_step([batch])
    assert isinstance(loss_sum, torch.Tensor)  # a Python float would have waited for the device
    assert loss_sum.shape == () and loss_sum.dtype == torch.float32
    assert loss_sum.device == trainer.device and not loss_sum.requires_grad
    assert samples == 8
    assert float(loss_sum) / samples == pytest.approx(expected, rel=1e-5)
