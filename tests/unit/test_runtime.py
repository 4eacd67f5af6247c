"""The inference runtime: one eval crop for training validation, ``ran eval``, ``ran explain`` and
promotion, for every registered model."""

from __future__ import annotations

import pytest
import torch

from ran import runtime
from ran.config import parse_config
from ran.models import list_models

# The paper's single-crop test sizes on ImageNet (PAPER.md Table 3; Inception's own 299), else 224.
IMAGENET_OWN = {"attention92": 320, "attentioninception56": 299}
CUSTOM = 160


def _cfg(name: str, recipe: str, crop: int | None, **data) -> object:
    return parse_config({"model": {"name": name, "num_classes": 4},
                         "data": {"recipe": recipe, "crop": crop, **data}})


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("crop", [None, "default", CUSTOM])
def test_eval_crop_of_every_model_and_crop_setting(name, crop):
    imagenet = _cfg(name, "imagenet", 224 if crop == "default" else crop)
    cifar = _cfg(name, "cifar", 32 if crop == "default" else (24 if crop == CUSTOM else None))
    own = IMAGENET_OWN.get(name, 224)
    assert runtime.eval_crop(imagenet) == (CUSTOM if crop == CUSTOM else own)
    assert runtime.eval_crop(cifar) == (24 if crop == CUSTOM else 32)


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
    """Attention-92 with the recipe's default train crop (the issue's case): 320 everywhere."""
    from PIL import Image

    from ran.data.synth import write_synthetic
    from ran.explain import read_image
    from ran.train.trainer import Trainer

    data = tmp_path / "synth"
    write_synthetic(str(data), classes=4, train=8, val=4, size=40, samples_per_shard=8,
                    progress=False, workers=1)
    cfg = parse_config({"model": {"name": "attention92", "num_classes": 4},
                        "data": {"recipe": "imagenet", "crop": 224, "path": str(data),
                                 "batch_size": 4, "workers": 0},
                        "train": {"epochs": 1}})
    monkeypatch.setattr(runtime, "build_model", lambda cfg: _Recorder())
    trainer = Trainer(cfg)
    trainer.validate()
    assert trainer.raw_model.sizes == {(320, 320)}

    recorder = _Recorder()
    metrics = runtime.evaluate(recorder, cfg, str(data), "val", device=torch.device("cpu"))
    assert metrics["images"] == 4
    assert recorder.sizes == {(320, 320)}

    picture = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(picture)
    assert tuple(read_image(picture, cfg.data.recipe, runtime.eval_crop(cfg)).shape) == (3, 320, 320)
