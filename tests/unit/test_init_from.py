"""``model.init_from`` without services: the weights of a checkpoint or a plain ``state_dict`` file
load strictly, only a classifier of another size starts fresh, every other difference is one error
that lists the keys, and pre-flight pins the reference. (Registered models: tests/integration/
test_finetune.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ran.config import ConfigError, load_config
from ran.runtime import build_model, fit_state, init_tags, init_weights, read_model, resolve_init
from ran.tracking import ModelRefError

BASE = {"model.name": "attention56", "model.stem": "cifar", "data.crop": 16}
TRUNK = "blocks.1.trunk.0.conv1.weight"


def _cfg(**overrides):
    return load_config(None, {**BASE, "model.num_classes": 4, **overrides})


@pytest.fixture(scope="module")
def parent() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return build_model(_cfg()).state_dict()


@pytest.fixture
def checkpoint(tmp_path, parent) -> Path:
    """A checkpoint directory as ``ran train`` writes one (model, config, run id)."""
    directory = tmp_path / "epoch=0002_step=0000048"
    directory.mkdir()
    torch.save({"model": parent, "config": _cfg().model_dump(), "run_id": "a" * 32},
               directory / "checkpoint.pt")
    return directory


def test_a_checkpoint_directory_and_a_plain_state_dict_file_both_give_the_weights(checkpoint, parent,
                                                                                  tmp_path):
    found = read_model(str(checkpoint))
    assert found.source.kind == "checkpoint" and found.source.run_id == "a" * 32
    assert torch.equal(found.state[TRUNK], parent[TRUNK])
    plain = tmp_path / "weights.pt"
    torch.save(parent, plain)
    found = read_model(str(plain))
    assert found.state.keys() == parent.keys() and found.config is None
    run_dir = checkpoint.parent  # a run directory: its latest checkpoint
    assert Path(read_model(str(run_dir)).source.path) == checkpoint / "checkpoint.pt"


def test_other_files_are_refused_with_what_they_are_not(tmp_path):
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3}, odd)
    with pytest.raises(ModelRefError, match=r"odd\.pt: neither a `ran train` checkpoint nor a "
                                            r"state_dict"):
        read_model(str(odd))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelRefError, match=r"notes\.pt: cannot load it"):
        read_model(str(text))


def test_new_classes_reinitialise_the_classifier_and_only_it(checkpoint, parent):
    cfg = _cfg(**{"model.num_classes": 7, "model.init_from": str(checkpoint)})
    torch.manual_seed(11)
    fresh = build_model(cfg)
    fresh_fc = fresh.fc.weight.detach().clone()
    model = init_weights(fresh, cfg)

    state = model.state_dict()
    assert all(torch.equal(state[k], parent[k]) for k in parent if not k.startswith("fc."))
    assert state["fc.weight"].shape == (7, parent["fc.weight"].shape[1])
    assert torch.equal(state["fc.weight"], fresh_fc)
    same = _cfg(**{"model.init_from": str(checkpoint)})  # 4 classes: the classifier loads too
    assert torch.equal(init_weights(build_model(same), same).state_dict()["fc.weight"],
                       parent["fc.weight"])


def test_any_other_difference_is_one_error_listing_the_keys(parent):
    with torch.device("meta"):
        deeper = build_model(_cfg(**{"model.name": "attention92"})).state_dict()
    with pytest.raises(ConfigError) as err:
        fit_state(deeper, parent, "models:/tiny@champion", "attention92 (cifar stem, 4 classes)")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.init_from models:/tiny@champion: its weights do not fit "
                              "attention92 (cifar stem, 4 classes): 608 missing (")
    assert "; 194 unexpected (" in message and "; 105 of another shape (" in message
    assert ", ... 604 more)" in message
    wider_input = dict(parent, **{"fc.weight": torch.zeros(4, 17)})  # a classifier over other features
    with pytest.raises(ConfigError, match=r"1 of another shape \(fc\.weight \(4, 17\) vs \(4, 256\)\)"):
        fit_state(parent, wider_input, "x.pt", "attention56")


def test_preflight_pins_a_run_directory_to_its_checkpoint_file_and_refuses_a_misfit(checkpoint,
                                                                                     tmp_path):
    cfg = resolve_init(_cfg(**{"model.num_classes": 3, "model.init_from": str(checkpoint.parent)}))
    assert cfg.model.init_from == str((checkpoint / "checkpoint.pt").resolve())
    assert init_tags(cfg) == {"ran.init_from": cfg.model.init_from}
    assert resolve_init(_cfg()) == _cfg()  # nothing to do without init_from
    with pytest.raises(ConfigError, match=r"^model\.init_from: model .*missing\.pt"):
        resolve_init(_cfg(**{"model.init_from": str(tmp_path / "missing.pt")}))
    with pytest.raises(ConfigError, match=r"its weights do not fit attention56 \(imagenet stem"):
        resolve_init(_cfg(**{"model.stem": "imagenet", "model.init_from": str(checkpoint)}))
