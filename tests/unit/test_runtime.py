"""The inference runtime: one eval crop for training validation, ``ran eval``, ``ran explain`` and
promotion, for every registered model."""

from __future__ import annotations

import pytest
import torch

from ran import runtime
from ran.config import parse_config
from ran.models import list_models

CUSTOM = 160

# The eval crop of every registered model with data.crop unset, written out (not derived): ImageNet
# at 224, except the paper's single-crop test sizes of Attention-92 (PAPER.md Table 3: 320) and
# Inception's own 299; CIFAR at its 32x32 images.
EVAL_CROP = {
    "attention56": (224, 32), "attention92": (320, 32), "attention128": (224, 32),
    "attention164": (224, 32), "attention236": (224, 32), "attention452": (224, 32),
    "attentioninception56": (299, 32), "attentionnext56": (224, 32),
    "preact_resnet164": (224, 32), "resnet152": (224, 32),
}


def _cfg(name: str, recipe: str, crop: int | None, **data) -> object:
    return parse_config({"model": {"name": name, "num_classes": 4},
                         "data": {"recipe": recipe, "crop": crop, **data}})


def test_the_table_names_every_registered_model():
    assert sorted(EVAL_CROP) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_eval_crop_of_every_model_and_crop_setting(name):
    imagenet, cifar = EVAL_CROP[name]
    assert runtime.eval_crop(_cfg(name, "imagenet", None)) == imagenet
    assert runtime.eval_crop(_cfg(name, "imagenet", 224)) == imagenet  # the recipe's train crop
    assert runtime.eval_crop(_cfg(name, "imagenet", CUSTOM)) == 160  # small images: their size
    assert runtime.eval_crop(_cfg(name, "cifar", None)) == cifar
    assert runtime.eval_crop(_cfg(name, "cifar", 32)) == cifar
    assert runtime.eval_crop(_cfg(name, "cifar", 24)) == 24


def test_an_eval_transform_has_no_default_crop():
    from ran.data.transforms import make_transform

    with pytest.raises(ValueError, match="the imagenet eval transform needs its crop"):
        make_transform("imagenet", train=False)
    assert make_transform("imagenet", train=True).crop == 224  # data.crop unset: the train crop


def test_an_explicit_eval_crop_wins():
    assert runtime.eval_crop(_cfg("attention92", "imagenet", 224, eval_crop=256)) == 256


class _Recorder(torch.nn.Module):
    """A 4-class model that records the input sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.sizes: set[tuple[int, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(tuple(x.shape[-2:]))
        return self.fc(x.mean(dim=(2, 3)))


def test_training_validation_ran_eval_and_explain_see_the_same_crop(tmp_path, monkeypatch):
    """Attention-92 with the recipe's default train crop (the issue's case): 320 everywhere, each
    verb finding the crop itself (ran eval and ran explain from a checkpoint of the run)."""
    from PIL import Image

    from ran.cli import main
    from ran.data.synth import write_synthetic
    from ran.train.trainer import Trainer

    data = tmp_path / "synth"
    write_synthetic(str(data), classes=4, train=8, val=4, size=40, samples_per_shard=8,
                    progress=False, workers=1)
    cfg = parse_config({"model": {"name": "attention92", "num_classes": 4},
                        "data": {"recipe": "imagenet", "crop": 224, "path": str(data),
                                 "batch_size": 4, "workers": 0},
                        "train": {"epochs": 1}})
    recorder = _Recorder()  # every model any verb builds
    monkeypatch.setattr(runtime, "build_model", lambda cfg: recorder)
    trainer = Trainer(cfg)
    trainer.validate()
    assert recorder.sizes == {(320, 320)}
    trainer.save(tmp_path / "run" / "epoch=0001_step=0000002")

    recorder.sizes.clear()
    bundle = runtime.ModelBundle.load(str(tmp_path / "run"), device=torch.device("cpu"))
    assert bundle.evaluate(str(data), "val")["images"] == 4
    assert recorder.sizes == {(320, 320)}

    recorder.sizes.clear()
    picture = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(picture)
    assert main(["explain", str(tmp_path / "run"), str(picture), "--out", str(tmp_path / "o")]) == 0
    assert recorder.sizes == {(320, 320)}
