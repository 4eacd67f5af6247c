"""Search spaces: shipped files parse, every distribution maps to Tune, and a bad space is refused
with a message naming the key, before any Ray is started."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ran.config import ConfigError
from ran.tune.space import check_space, load_space, parse_space

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"
JOB = {"train": {"epochs": 4}}


def _space(space: dict, **sections) -> dict:
    return {"space": space, **sections}


@pytest.mark.parametrize("name", ["depth_mask", "optim", "ablation_arl_nal"])
def test_shipped_spaces_are_valid_against_a_job(name):
    space = load_space(SPACES / f"{name}.yaml")
    base = check_space(space, JOB)
    assert space.searched_keys
    assert base.train.epochs == 4


def test_ablation_space_is_the_table_3_grid():
    space = load_space(SPACES / "ablation_arl_nal.yaml")
    assert space.params["model.depth"].values == (56, 92, 128, 164)
    assert space.params["model.combination"].values == ("arl", "nal")
    assert {d.kind for d in space.params.values()} == {"grid"}
    assert space.settings.scheduler == "fifo"


def test_depth_mask_space_only_draws_buildable_depths():
    from ran.models import create_model

    space = load_space(SPACES / "depth_mask.yaml")
    joint = space.params["model.depth,model.p,model.t"]
    for option in joint.values:
        depth, p, t = option
        assert (depth - 20) % (9 * (2 * p + t)) == 0, option
    create_model("attention56", stem="cifar", num_classes=10, depth=92, p=2, t=4)


def test_every_distribution_maps_to_its_tune_domain():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_space(_space({
        "model.depth": {"choice": [56, 92]},
        "model.combination": {"grid": ["arl", "nal"]},
        "optim.label_smoothing": {"uniform": [0.0, 0.2]},
        "optim.lr": {"loguniform": ["1e-3", 0.1]},  # PyYAML reads 1e-3 as a string
        "model.r": {"randint": [1, 3]},
    }))
    ps = space.param_space()
    assert isinstance(ps["model.depth"], Categorical) and ps["model.depth"].categories == [56, 92]
    assert ps["model.combination"] == tune.grid_search(["arl", "nal"])
    assert isinstance(ps["optim.label_smoothing"], Float)
    lr = ps["optim.lr"]
    assert math.isclose(lr.lower, 1e-3) and lr.sampler.__class__.__name__ == "_LogUniform"
    r = ps["model.r"]
    assert isinstance(r, Integer) and (r.lower, r.upper) == (1, 4)  # our hi is inclusive


def test_joint_keys_travel_as_one_parameter_and_split_per_trial():
    space = parse_space(_space({"model.depth,model.p,model.t": {"choice": [[56, 1, 2], [92, 2, 4]]}}))
    (name,) = space.param_space()
    assert name == "model.depth,model.p,model.t"
    drawn = space.param_space()[name].categories[1]
    assert space.trial_overrides({name: drawn}) == {"model.depth": 92, "model.p": 2, "model.t": 4}


def test_settings_default_to_asha_on_val_top1():
    s = parse_space(_space({"optim.lr": {"choice": [0.1]}})).settings
    assert (s.metric, s.mode, s.scheduler, s.search_alg) == ("val_top1", "max", "asha", "random")
    assert 0 < s.resources.driver_cpus < 1


def test_set_section_and_resources_apply_to_the_base_job():
    space = parse_space(_space(
        {"optim.lr": {"choice": [0.1]}},
        set={"train.epochs": 2, "data.batch_size": 8},
        search={"resources": {"num_workers": 1, "cpus_per_worker": 0.9}},
    ))
    base = check_space(space, {})
    assert (base.train.epochs, base.data.batch_size) == (2, 8)
    assert (base.scaling.num_workers, base.scaling.cpus_per_worker) == (1, 0.9)


@pytest.mark.parametrize(
    "raw, words",
    [
        (_space({"model.dpeth": {"choice": [56]}}), ["model.dpeth", "model.depth"]),
        (_space({"optimizer.lr": {"choice": [0.1]}}), ["optimizer.lr", "valid keys"]),
        (_space({"optim.lr": {"normal": [0, 1]}}), ["optim.lr", "choice", "loguniform"]),
        (_space({"optim.lr": [0.1, 0.2]}), ["optim.lr", "expected one of"]),
        (_space({"optim.lr": {"choice": []}}), ["optim.lr", "non-empty list"]),
        (_space({"optim.lr": {"uniform": [0.1]}}), ["optim.lr", "[lo, hi]"]),
        (_space({"optim.lr": {"uniform": [0.3, 0.1]}}), ["optim.lr", "lo < hi"]),
        (_space({"optim.lr": {"loguniform": [0, 0.1]}}), ["optim.lr", "lo > 0"]),
        (_space({"model.r": {"randint": [1, 2.5]}}), ["model.r", "integers"]),
        (_space({"model.depth,model.p": {"choice": [[56, 1, 2]]}}), ["2 values"]),
        (_space({"model.depth,model.p": {"uniform": [1, 2]}}), ["joint keys"]),
        (_space({"optim.lr": {"choice": [0.1]}}, set={"optim.lr": 0.2}), ["optim.lr", "twice"]),
        (_space({"optim.lr": {"choice": [0.1]}}, search={"schedular": "asha"}),
         ["search.schedular", "valid settings"]),
        (_space({"optim.lr": {"choice": [0.1]}}, search={"scheduler": "pbt"}), ["search.scheduler"]),
        (_space({"model.depth": {"grid": [56]}}, search={"search_alg": "optuna"}), ["optuna", "grid"]),
        ({"search": {}}, ["needs a `space:`"]),
        (_space({"optim.lr": {"choice": [0.1]}}, spaces={}), ["unknown section", "spaces"]),
    ],
)
def test_malformed_space_is_refused_with_the_key_named(raw, words):
    with pytest.raises(ConfigError) as err:
        parse_space(raw)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "space, words",
    [
        ({"model.mask_activation": {"choice": ["mixed", "softmax"]}}, ["mask_activation", "softmax"]),
        ({"optim.label_smoothing": {"uniform": [0.0, 1.5]}}, ["label_smoothing", "1.5"]),
        ({"data.batch_size": {"randint": [0, 4]}}, ["batch_size"]),
    ],
)
def test_value_the_job_refuses_is_caught_before_ray_starts(space, words):
    parsed = parse_space(_space(space))
    with pytest.raises(ConfigError) as err:
        check_space(parsed, JOB)
    for word in words:
        assert word in str(err.value)


def test_asha_without_a_run_length_asks_for_max_t():
    space = parse_space(_space({"optim.lr": {"choice": [0.1]}}))
    with pytest.raises(ConfigError, match="max_t"):
        check_space(space, {})


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {optim.lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)
