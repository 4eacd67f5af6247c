"""`ran eval` measures a model exactly as training validates it, and names bad references."""

from __future__ import annotations

import pytest
import torch

from ran.config import parse_config
from ran.runtime import ModelBundle, check_classes, eval_crop, resolve_model
from ran.tracking import ModelRefError


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from ran.data.synth import write_synthetic
    from ran.train.launch import resolve_config
    from ran.train.trainer import Trainer

    data = tmp_path_factory.mktemp("synth")
    write_synthetic(str(data), classes=4, train=16, val=24, size=32, samples_per_shard=10,
                    progress=False, workers=1)
    cfg, _ = resolve_config(parse_config({
        "model": {"name": "attention56"},
        "data": {"recipe": "cifar", "path": str(data), "batch_size": 8, "workers": 0},
        "train": {"epochs": 1, "seed": 3},
    }))
    trainer = Trainer(cfg)
    trainer.train_epoch()
    return trainer


def test_evaluate_matches_the_trainers_validation(trainer):
    expected = trainer.validate()
    cfg = trainer.cfg
    bundle = ModelBundle.build(trainer.raw_model, cfg, device=torch.device("cpu"))
    got = bundle.evaluate(cfg.data.path, "val", batch_size=5, workers=2)

    assert got["images"] == expected["eval/samples"] == 24
    assert got["top1"] == expected["eval/top1"]
    assert got["top5"] == expected["eval/top5"]
    assert got["loss"] == pytest.approx(expected["eval/loss"], rel=1e-3)
    assert got["img_per_s"] > 0


def test_a_checkpoint_directory_loads_as_our_model(trainer, tmp_path):
    trainer.save(tmp_path / "epoch=0001_step=0000002")
    loaded = ModelBundle.load(str(tmp_path))  # a run directory: its latest checkpoint
    model, cfg, classes = loaded.model, loaded.config, loaded.class_names

    assert loaded.crop == 32  # the eval crop, resolved once and carried in the config
    assert cfg == trainer.cfg.with_values({"data.eval_crop": 32})
    assert classes is not None and len(classes) == 4
    trained = trainer.raw_model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        logits, masks = model(torch.randn(2, 3, 32, 32), return_masks=True)
    assert logits.shape == (2, 4)
    assert len(masks) == 3


def test_data_with_other_classes_is_refused(trainer):
    manifest = {"num_classes": 10, "classes": [str(i) for i in range(10)]}
    with pytest.raises(ValueError, match="has 10 classes but the model has 4 outputs"):
        check_classes(trainer.raw_model, None, manifest, "other")
    manifest = {"num_classes": 4, "classes": ["a", "b", "c", "d"]}
    with pytest.raises(ValueError, match="class names differ"):
        check_classes(trainer.raw_model, ["w", "x", "y", "z"], manifest, "other")


def test_eval_crop_follows_the_model_and_config():
    assert eval_crop(parse_config({"model": {"name": "attention92"}, "data": {"recipe": "imagenet"}})) == 320
    assert eval_crop(parse_config({"model": {"name": "attention56"}, "data": {"recipe": "imagenet"}})) == 224
    assert eval_crop(parse_config({"model": {"name": "attention92"}, "data": {"recipe": "imagenet",
                                                                             "eval_crop": 256}})) == 256


def test_references_that_name_nothing_say_what_is_accepted(tmp_path):
    with pytest.raises(ModelRefError, match="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id"):
        resolve_model("no-such-thing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelRefError, match="no checkpoint.pt in it"):
        resolve_model(str(empty))


def test_evaluate_into_a_pipe_prints_progress_lines(trainer, capsys, monkeypatch):
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "0")  # a line per batch
    cfg = trainer.cfg
    bundle = ModelBundle.build(trainer.raw_model, cfg, device=torch.device("cpu"))
    bundle.evaluate(cfg.data.path, "val", batch_size=8, workers=0, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("evaluating val: ")]
    assert lines[0].startswith("evaluating val: 8/24 img (33%)")
    assert lines[-1].startswith("evaluating val: 24/24 img (100%)")


def test_a_missing_data_folder_is_told_apart_from_a_folder_without_shards(trainer, tmp_path):
    from ran.data import DataError

    checkpoint = trainer.save(tmp_path / "epoch=0001_step=0000002")
    bundle = ModelBundle.load(str(checkpoint))
    with pytest.raises(DataError, match="missing: no such directory"):
        bundle.evaluate(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no manifest.json"):
        bundle.evaluate(str(tmp_path / "empty"))
