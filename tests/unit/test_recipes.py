"""Every recipe in jobs/ runs as written: with only ``--set data.path=`` (synthetic shards) it passes
ran train's pre-flight on CPU, and its Trainer takes one optimizer step. Placeholders: a storage
path falls back to ./runs with a note; a data path is refused in one line naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ran.config import ConfigError, load_config

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    # 256 train samples: the largest recipe step (8 workers x 32) fits the split.
    write_synthetic(str(out), classes=4, train=256, val=4, size=32, samples_per_shard=128,
                    progress=False, workers=1)
    return str(out)


def _recipe(path: Path, shards: str, tmp_path: Path):
    """The recipe with only data.path set (and, for the fine-tune, a parent it can start from)."""
    sets = [f"data.path={shards}"]
    cfg = load_config(path, sets)
    if cfg.model.init_from:  # a registered parent (`make demo`) stands in as a weights file here
        from ran.runtime import build_model

        parent = tmp_path / "parent.pt"
        torch.save(build_model(cfg.with_values({"model.num_classes": 10})).state_dict(), parent)
        cfg = load_config(path, [*sets, f"model.init_from={parent}"])
    return cfg


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_a_recipe_passes_preflight_and_trains_one_step_on_cpu(path, shards, tmp_path, monkeypatch,
                                                               capsys):
    from ran.train import localray
    from ran.train.launch import preflight
    from ran.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    cfg = _recipe(path, shards, tmp_path)
    if "YOUR-BUCKET" in path.read_text():  # the recipe's storage placeholder: ./runs, with a note
        assert cfg.storage.path == "runs"
        assert "note: storage.path s3://YOUR-BUCKET/runs is the recipe's placeholder" in \
            capsys.readouterr().err
    cfg, manifest, storage = preflight(cfg, resume=False)
    cfg = localray.resolve_gpu(cfg, [{"CPU": 2, "GPU": 0}])  # use_gpu auto: no GPU here
    assert cfg.scaling.use_gpu is False
    assert storage.run_uri.startswith(str(tmp_path / "runs"))
    # One step of the recipe's model, data recipe and optimizer: two images loaded in-process, in
    # fp32, the ImageNet ones cropped to 32 px (the stem and every module still run; a CPU step of
    # Attention-452 at 224 px takes minutes).
    small = {"data.crop": 32, "data.eval_crop": 32} if cfg.data.recipe == "imagenet" else {}
    step_cfg = cfg.with_values({"data.batch_size": 2, "data.workers": 0,
                                "train.precision": "fp32", **small})
    trainer = Trainer(step_cfg)
    batch = next(iter(trainer.train_loader))
    loss_sum, samples = trainer.train_step([batch])
    assert samples == 2 and math.isfinite(float(loss_sum)) and trainer.step == 1


def test_a_placeholder_data_path_is_refused_in_one_line_naming_the_key(tmp_path, monkeypatch):
    from ran.train.launch import preflight

    monkeypatch.chdir(tmp_path)
    cfg = load_config(JOBS[0])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, resume=False)
    assert str(err.value) == ("data.path s3://YOUR-BUCKET/shards/cifar10 is the recipe's placeholder: "
                              "give yours with --set data.path=... (shards written by `ran data "
                              "build` or `ran data synth`)")


def test_use_gpu_auto_follows_the_cluster():
    from ran.train import localray

    cfg = load_config(None, ["scaling.use_gpu=auto"])
    assert localray.resolve_gpu(cfg, [{"CPU": 8}, {"CPU": 8, "GPU": 1}]).scaling.use_gpu is True
    assert localray.resolve_gpu(cfg, [{"CPU": 8, "GPU": 0}]).scaling.use_gpu is False
    fixed = load_config(None, ["scaling.use_gpu=false"])
    assert localray.resolve_gpu(fixed, [{"GPU": 1}]).scaling.use_gpu is False
    cuda_graph = load_config(None, ["scaling.use_gpu=auto", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs scaling.use_gpu=true"):
        localray.resolve_gpu(cuda_graph, [{"CPU": 8}])
