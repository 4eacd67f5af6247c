"""A run's metric keys follow the one scheme of ran.tracking.names: grouped by prefix as MLflow's
charts group them (a section per prefix, in the order of their names), validation first."""

from __future__ import annotations

import pytest

from ran import tracking
from ran.config import load_config


class Recorder:
    """A run log keeping what rank 0 would send to MLflow."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[int, float]] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = value

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def gap_report(self):
        return {}


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Recorder:
    from ran.data.synth import write_synthetic
    from ran.train.launch import resolve_config
    from ran.train.raytrain import TrackedRun  # the trainer's log on MLflow, as ran train runs it
    from ran.train.trainer import LocalReporter, Trainer

    shards = tmp_path_factory.mktemp("synth")
    write_synthetic(str(shards), classes=4, train=32, val=8, size=16, seed=0,
                    samples_per_shard=16, progress=False, workers=1)
    cfg, _ = resolve_config(load_config(None, {
        "model.name": "attention56", "model.stem": "cifar", "data.path": str(shards),
        "data.crop": 16, "data.batch_size": 16, "data.workers": 0, "train.epochs": 1,
        "optim.reference_batch_size": 16, "schedule.kind": "constant", "train.precision": "fp32",
        "train.log_every": 1}))
    recorder = Recorder()
    Trainer(cfg, run_log=TrackedRun(recorder)).fit(LocalReporter(tmp_path_factory.mktemp("ckpt")))
    return recorder


def test_every_metric_of_a_run_is_in_a_section_and_validation_comes_first(logged):
    keys = sorted(logged.metrics)
    sections = sorted({k.split("/", 1)[0] for k in keys})
    assert all("/" in k for k in keys), keys
    assert set(sections) <= set(tracking.METRIC_SECTIONS), sections
    assert sections[0] == "eval"  # MLflow lists sections by name: validation opens the page
    assert {"eval/top1", "eval/top5", "eval/loss", "train/loss", "train/lr",
            "perf/img_per_s"} <= set(keys)


def test_single_value_facts_are_tags_not_one_point_charts(logged):
    assert not [k for k in logged.metrics if k.startswith("plan/")]
    assert logged.tags["ran.plan.world_size"] == "1"


def test_every_reported_metric_follows_the_scheme():
    counters = {"epoch", "step"}  # Tune's time attributes, reported beside the metrics
    reported = set(tracking.EPOCH_METRICS) | set(tracking.VALIDATION_METRICS)
    assert {k.split("/", 1)[0] for k in reported - counters} <= set(tracking.METRIC_SECTIONS)
