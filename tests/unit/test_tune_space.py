"""Search spaces: shipped files parse, every distribution maps to Tune, and a bad space is refused
with a message naming the key, before any Ray is started."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ran.config import ConfigError, parse_config
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
    assert (s.metric, s.mode, s.scheduler, s.search_alg) == ("eval/top1", "max", "asha", "random")
    assert s.resources.driver_cpus == 0.1  # a fraction: the workers get the rest (DESIGN.md)


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


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {optim.lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)


SCORES = ("eval/loss, eval/top1, eval/top5, perf/ckpt_wait_s, perf/data_wait_frac, "
          "perf/epoch_time_s, perf/img_per_s, train/loss")


@pytest.mark.parametrize(("search", "job", "message"), [
    ({"metric": "val_acc"}, {},
     f"search.metric 'val_acc' is not reported by training; use one of {SCORES}"),
    ({"metric": "epoch"}, {},
     f"search.metric 'epoch' is a count, not a score to optimise; use one of {SCORES}"),
    ({"metric": "eval/loss", "mode": "max"}, {},
     "search.mode max with search.metric eval/loss: eval/loss is better lower; set search.mode: min"),
    ({"metric": "eval/top5"}, {"train": {"eval_every": 2}},
     "search.metric eval/top5 is reported only on validation epochs; with train.eval_every=2 use "
     "eval/top1 (carried between validations) or set train.eval_every=1"),
])
def test_a_search_metric_or_mode_training_does_not_report_is_refused(search, job, message):
    from ran.tune.space import check_search_metric

    space = parse_space({"space": {"optim.lr": {"choice": [0.1]}}, "search": search})
    with pytest.raises(ConfigError) as err:
        check_search_metric(space.settings, parse_config(job))
    assert str(err.value) == message


def test_every_score_the_trainer_reports_is_a_search_metric():
    from ran.tracking import EPOCH_METRICS, VALIDATION_METRICS
    from ran.tune.space import check_search_metric

    for metric, better in {**EPOCH_METRICS, **VALIDATION_METRICS}.items():
        if better:
            space = parse_space({"space": {"optim.lr": {"choice": [0.1]}},
                                 "search": {"metric": metric, "mode": better}})
            check_search_metric(space.settings, parse_config({}))


def test_a_key_given_twice_in_a_space_is_refused_with_both_lines(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("space:\n  optim.lr: {loguniform: [0.01, 0.3]}\n"
                     "  optim.lr: {choice: [0.1]}\nsearch:\n  num_samples: 2\n")
    with pytest.raises(ConfigError) as err:
        load_space(twice)
    assert str(err.value) == (f"search space {twice}: key 'space.optim.lr' is given twice, at "
                              "lines 2 and 3; keep one")


# ---------------------------------------------------------------------------------------------
# Search helpers (no Ray cluster): concurrency, ranking, the results table and plot, searchers


def _trial(tid, status, metric, **overrides):
    from ran.tune.search import TrialOutcome

    return TrialOutcome(tid, status, overrides, metric, metric, 2 if status == "completed" else 1)


def test_concurrency_counts_the_driver_and_the_workers_of_a_trial():
    from ran.tune.search import concurrency_limit

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}},
                               search={"resources": {"num_workers": 1, "cpus_per_worker": 0.9}}))
    base = check_space(space, JOB)
    assert concurrency_limit(space, base, [{"CPU": 2.0}]) == 2  # 0.1 + 0.9 per trial
    assert concurrency_limit(space, base, [{"CPU": 16.0}]) == 16
    capped = parse_space(_space({"optim.lr": {"choice": [0.1]}}, search={"max_concurrent_trials": 3}))
    assert concurrency_limit(capped, check_space(capped, JOB), [{"CPU": 64.0}]) == 3  # 2 x 1 CPU + 0.1


def test_a_trial_larger_than_the_cluster_is_refused():
    from ran.tune.search import concurrency_limit

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}}))
    with pytest.raises(ConfigError, match="one trial needs 2.1 CPUs"):
        concurrency_limit(space, check_space(space, JOB), [{"CPU": 2.0}])  # 2 workers x 1 CPU + 0.1
    gpu = parse_space(_space({"optim.lr": {"choice": [0.1]}}, search={"resources": {"use_gpu": True}}))
    with pytest.raises(ConfigError, match="GPUs"):
        concurrency_limit(gpu, check_space(gpu, {**JOB, "train": {"epochs": 4, "precision": "bf16"}}),
                          [{"CPU": 8.0, "GPU": 1.0}])


def test_concurrency_counts_trials_node_by_node_not_by_cluster_totals():
    """A trial is a 0.1-CPU driver + 1 worker x 2 CPUs (2.1 CPUs). Nodes of 2.1 + 3 x 1.5 CPUs
    total 6.6, room for 3 trials by totals; a worker is never split across nodes, and only the
    first node holds one: 1 trial fits. Three 1.5-CPU nodes (4.5 in all, 2 trials by totals)
    hold none, which is refused."""
    from ran.tune.search import concurrency_limit

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}},
                               search={"resources": {"num_workers": 1, "cpus_per_worker": 2}}))
    base = check_space(space, JOB)
    assert concurrency_limit(space, base, [{"CPU": 2.1}, {"CPU": 1.5}, {"CPU": 1.5}, {"CPU": 1.5}]) == 1
    assert concurrency_limit(space, base, [{"CPU": 2.1}] * 3) == 3  # whole nodes: as by totals
    with pytest.raises(ConfigError, match=r"one trial needs 2.1 CPUs .* 3 node\(s\) have 1.5 CPUs"):
        concurrency_limit(space, base, [{"CPU": 1.5}] * 3)


def test_best_is_the_top_completed_trial_and_failed_trials_rank_last():
    from ran.tune.search import pick_best, results_rows

    trials = [_trial("a", "completed", 0.6, **{"model.depth": 56}),
              _trial("b", "stopped", 0.9, **{"model.depth": 92}),
              _trial("c", "failed", None, **{"model.depth": 57}),
              _trial("d", "completed", 0.8, **{"model.depth": 92})]
    assert pick_best(trials, "max").trial_id == "d"
    assert pick_best(trials, "min").trial_id == "a"
    assert pick_best([trials[1], trials[2]], "max") is None  # a stopped trial never ran to the end
    rows = results_rows(trials, ["model.depth"], "eval/top1", "max")
    assert [r["trial_id"] for r in rows] == ["d", "a", "b", "c"]
    assert rows[0]["model.depth"] == 92 and rows[0]["eval/top1"] == 0.8 and rows[0]["rank"] == 1


def test_results_csv_plot_and_table(tmp_path):
    import csv

    from ran.tune.search import plot_metric_vs_params, results_rows, trials_table, write_csv

    space = parse_space(_space({"model.depth": {"grid": [56, 92]},
                                "optim.lr": {"loguniform": [0.001, 0.1]},
                                "model.mask_activation": {"choice": ["mixed", "spatial"]}}))
    trials = [_trial("a", "completed", 0.7, **{"model.depth": 56, "optim.lr": 0.01,
                                               "model.mask_activation": "mixed"}),
              _trial("b", "failed", None, **{"model.depth": 92, "optim.lr": 0.002,
                                             "model.mask_activation": "spatial"})]
    rows = results_rows(trials, space.searched_keys, "eval/top1", "max")
    write_csv(rows, tmp_path / "results.csv")
    read = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["status"] for r in read] == ["completed", "failed"]
    assert read[0]["optim.lr"] == "0.01"
    plot_metric_vs_params(trials, space, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    table = trials_table(rows, ["rank", "trial_id", "status", "eval/top1"], limit=1).splitlines()
    assert len(table) == 2 and table[1].split() == ["1", "a", "completed", "0.7"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny shard set: 2 classes, 40 train and 8 val images of 8 px."""
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("shards")
    write_synthetic(str(out), classes=2, train=40, val=8, size=8, seed=0, progress=False)
    return str(out)


def _data_job(shards, **train):
    return {"data": {"path": shards, "batch_size": 4},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "train": train, "schedule": {"kind": "constant", "total_steps": 50, "milestones": []},
            "optim": {"reference_batch_size": 8}}


def test_asha_runs_on_the_reported_epoch_up_to_the_job_length(shards):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ran.tune.search import asha_max_t, build_scheduler, prepare

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}},
                               search={"grace_period": 2, "reduction_factor": 3}))
    base, manifest = prepare(space, _data_job(shards, epochs=4))
    asha = build_scheduler(space, asha_max_t(space, base, manifest))
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "epoch" and asha._max_t == 4
    # No train.epochs: 50 steps at batch 8 = 400 images = 10 epochs of 40 (5 steps of 2 x 4).
    base, manifest = prepare(space, _data_job(shards))
    assert asha_max_t(space, base, manifest) == 10
    fifo = parse_space(_space({"optim.lr": {"choice": [0.1]}}, search={"scheduler": "fifo"}))
    assert isinstance(build_scheduler(fifo, 10), FIFOScheduler)


def test_grace_period_longer_than_a_trial_is_refused(shards):
    from ran.tune.search import prepare

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}}, search={"grace_period": 5}))
    with pytest.raises(ConfigError, match="grace_period 5 exceeds the 4 epochs"):
        prepare(space, _data_job(shards, epochs=4))


def test_missing_data_is_refused_before_ray_starts(tmp_path):
    from ran.tune.search import prepare

    space = parse_space(_space({"optim.lr": {"choice": [0.1]}}))
    from ran.data import DataError

    with pytest.raises(DataError, match="data.path .*nowhere: no such directory"):
        prepare(space, {"data": {"path": str(tmp_path / "nowhere")}, "train": {"epochs": 1}})


def test_trial_config_gets_its_own_directory_and_leaves_registration_to_the_search():
    from ran.tune.search import trial_config

    cfg = trial_config({"train": {"epochs": 2}}, {"model.depth": 92}, "job-space", "abc_00001")
    assert cfg.model.depth == 92
    assert cfg.storage.name == "job-space-abc_00001"
    assert cfg.tracking.registered_model is None and cfg.tracking.log_model is False


def test_tpe_suggests_job_values_from_the_space():
    pytest.importorskip("optuna", reason="Optuna's TPE is optional: pip install 'ran[optuna]'")
    from ran.tune.search import build_searcher

    space = parse_space(_space({
        "model.depth,model.p,model.t": {"choice": [[56, 1, 2], [92, 2, 4]]},
        "optim.lr": {"loguniform": [0.001, 0.1]},
    }, search={"search_alg": "optuna", "seed": 0}))
    searcher = build_searcher(space, limit=2)
    assert searcher.set_search_properties("eval/top1", "max", space.param_space())
    for trial in ("t1", "t2"):
        values = space.trial_overrides(searcher.suggest(trial))
        assert (values["model.depth"], values["model.p"], values["model.t"]) in {(56, 1, 2), (92, 2, 4)}
        assert 0.001 <= values["optim.lr"] <= 0.1
    assert searcher.suggest("t3") is None  # two at a time


def test_tpe_without_optuna_says_how_to_install_it(monkeypatch):
    import sys

    from ran.tune.search import build_searcher

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    space = parse_space(_space({"optim.lr": {"choice": [0.1]}}, search={"search_alg": "optuna"}))
    with pytest.raises(ConfigError, match=r"pip install 'ran\[optuna\]'"):
        build_searcher(space)


def test_the_command_line_sizes_a_search_with_search_keys(tmp_path):
    from ran.tune.space import from_command_line, search_keys

    space = load_space(Path(__file__).resolve().parents[2] / "tune_spaces" / "optim.yaml")
    sized, job = from_command_line(space, {"search.num_samples": 2, "search.scheduler": "fifo",
                                           "search.resources.num_workers": 1,
                                           "train.eval_every": 2, "scaling.num_workers": 1})
    s = sized.settings
    assert (s.num_samples, s.scheduler, s.resources.num_workers) == (2, "fifo", 1)
    assert job == {"train.eval_every": 2, "scaling.num_workers": 1}
    assert "train.eval_every" not in sized.fixed  # the command line wins over the space's set:
    assert space.settings.num_samples == 16  # the file's space is unchanged
    assert "search.resources.num_workers" in search_keys()
    with pytest.raises(ConfigError, match="unknown config key 'search.num_sample'; valid keys: "
                                          "search.grace_period"):
        from_command_line(space, {"search.num_sample": 2})
    with pytest.raises(ConfigError, match=r"invalid --set search.num_samples: .*got 0"):
        from_command_line(space, {"search.num_samples": 0})
    with pytest.raises(ConfigError, match="--set optim.lr: search space optim searches this key"):
        from_command_line(space, {"optim.lr": 0.1})


@pytest.mark.parametrize("values", [(2e-5, 8e-5), (1.5e-5, 4e-4), (1e-5, 1e-3)])
def test_a_log_axis_has_tick_labels_whatever_its_span(values):
    """The weight_decay panel of a search over 2e-5..8e-5 (no decade inside) is labelled."""
    from ran.tune.search import metric_vs_params_figure

    space = parse_space(_space({"optim.weight_decay": {"loguniform": [1e-5, 1e-3]}}))
    trials = [_trial(str(i), "completed", 0.5 + i / 10, **{"optim.weight_decay": v})
              for i, v in enumerate(values)]
    fig = metric_vs_params_figure(trials, space)
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len([t for t in shown if t]) >= 2, shown


def test_trial_lines_round_floats():
    from types import SimpleNamespace

    from ran.tune.search import TrialLines

    space = parse_space(_space({"optim.lr": {"loguniform": [0.01, 0.3]}}))
    trial = SimpleNamespace(trial_id="t1", config={"optim.lr": 0.01749599183672868})
    assert TrialLines(space)._params(trial) == "lr=0.0175"
