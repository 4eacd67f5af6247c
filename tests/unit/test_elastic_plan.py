"""Elastic worker counts, progress in samples and checkpoints on notice, without Ray: the config,
the pre-flight capacity check, the Ray Train wiring, and a Trainer in this process that gets a real
SIGTERM mid-epoch and is resumed at another global batch."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from ran.config import ConfigError, load_config
from ran.runtime import load_checkpoint


def _cfg(**overrides):
    base = {"data.path": "/nonexistent", "model.num_classes": 4, "scaling.cpus_per_worker": 1}
    return load_config(None, {**base, **overrides})


def test_num_workers_is_a_count_or_a_min_max_pair():
    fixed = _cfg(**{"scaling.num_workers": 3}).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)
    elastic = load_config(None, ["scaling.num_workers=[1, 4]"]).scaling
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 1, 4)
    assert "num_workers:\n  - 1\n  - 4\n" in load_config(None, ["scaling.num_workers=[1, 4]"]).to_yaml()
    for bad, why in [([2, 1], "1 <= min <= max"), ([0, 2], "1 <= min <= max"),
                     ([1, 2, 3], "1 <= min <= max"), (0, "at least 1 worker")]:
        with pytest.raises(ConfigError, match=rf"scaling\.num_workers: .*{why}"):
            _cfg(**{"scaling.num_workers": bad})


def test_preflight_needs_room_for_the_minimum_of_an_elastic_group():
    from ran.train.localray import check_resources

    nodes = [{"CPU": 2}, {"CPU": 1}]
    check_resources(_cfg(**{"scaling.num_workers": [3, 8]}), nodes)  # 3 fit: it starts
    with pytest.raises(ConfigError) as err:
        check_resources(_cfg(**{"scaling.num_workers": [4, 8]}), nodes)
    assert str(err.value) == (
        "the Ray cluster cannot place the minimum of 4 workers x 1 CPU (scaling.num_workers=[4, 8]): "
        "it has 3 CPUs and 0 GPUs on 2 node(s), room for 3 worker(s); lower scaling.num_workers or "
        "scaling.cpus_per_worker, or add nodes")


def test_ray_train_gets_the_elastic_range_and_every_worker_the_sigterm_notice(tmp_path: Path):
    from ray.train.v2._internal.execution.callback import WorkerCallback

    from ran.train.launch import build_trainer
    from ran.train.raytrain import SigtermNotice
    from ran.train.rundir import Storage

    storage = Storage(uri=str(tmp_path), name="run", ray_path=str(tmp_path))
    elastic = build_trainer(_cfg(**{"scaling.num_workers": [1, 2]}), storage, {})
    assert elastic.scaling_config.num_workers == (1, 2)
    assert elastic.scaling_config.elasticity_enabled
    fixed = build_trainer(_cfg(**{"scaling.num_workers": 2}), storage, {})
    assert fixed.scaling_config.num_workers == 2
    # SigtermNotice is a Ray Train WorkerCallback (a DeveloperAPI in 2.60): Ray runs it on each
    # worker's main thread. If Ray renames it, this fails rather than SIGTERM killing workers.
    assert isinstance(SigtermNotice(), WorkerCallback)
    assert [type(c).__name__ for c in fixed.run_config.callbacks] == ["SigtermNotice"]
    names = {type(c).__name__ for c in fixed._create_default_callbacks()}
    assert "SigtermNotice" in names


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from ran.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), classes=4, train=50, val=8, size=16, seed=0,
                    samples_per_shard=25, progress=False, workers=1)
    return str(out)


def _trainer(shards: str, run_log=None, notice=None, **overrides):
    """A Trainer over ``shards``; ``run_log``: a :class:`Recorder`, seen through the MLflow run
    log's tag names (:class:`ran.train.raytrain.TrackedRun`)."""
    from ran.train.launch import resolve_config
    from ran.train.raytrain import TrackedRun
    from ran.train.trainer import Trainer

    cfg, _ = resolve_config(load_config(None, {
        "model.name": "attention56", "model.stem": "cifar", "data.path": shards,
        "data.recipe": "cifar", "data.crop": 16, "data.batch_size": 16, "data.workers": 0,
        "optim.reference_batch_size": 16, "schedule.kind": "cosine", "train.epochs": 2,
        "train.precision": "fp32", "train.log_every": 1, **overrides}))
    return Trainer(cfg, run_log=TrackedRun(run_log) if run_log is not None else None,
                   notice=notice)


class Recorder:
    """A run log that keeps what rank 0 would send to MLflow, and sends this process a SIGTERM
    right after step ``term_at`` is logged (as a spot reclaim would, mid-step)."""

    def __init__(self, term_at: int | None = None) -> None:
        self.metrics: dict[str, dict[int, float]] = {}
        self.tags: dict[str, str] = {}
        self.term_at = term_at

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = value
        if step == self.term_at and "train/step_loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    def log_params(self, params):
        raise AssertionError(f"params are immutable in MLflow; a re-plan would change {params}")

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def gap_report(self):
        return {}  # nothing lost: every value is kept


def test_an_epoch_trains_its_exact_samples_with_a_smaller_last_step(shards):
    trainer = _trainer(shards, **{"train.epochs": 1})
    metrics = trainer.train_epoch()
    assert (trainer.step, trainer.samples) == (4, 50)  # 3 steps of 16 and one of 2
    assert metrics["train/epoch_samples"] == 50 and metrics["train/skipped"] == 0
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # cosine, at its end


def test_sigterm_mid_epoch_checkpoints_that_step_and_a_resume_at_another_batch_finishes_the_plan(
        shards, tmp_path):
    from ran.train.raytrain import NOTICE, SigtermNotice
    from ran.train.trainer import Interrupted, LocalReporter

    old = signal.getsignal(signal.SIGTERM)
    SigtermNotice().after_init_train_context()  # on this (main) thread, as Ray does on a worker
    try:
        first = Recorder(term_at=2)
        trainer = _trainer(shards, run_log=first, notice=NOTICE, **{"train.epochs": 1})
        with pytest.raises(Interrupted, match=r"SIGTERM on rank\(s\) 0: checkpoint "
                                              r"epoch=0000_step=0000002 \(sample 32\) is registered"):
            trainer.fit(LocalReporter(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not NOTICE.is_set()
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=0000_step=0000002"]
    state = load_checkpoint(tmp_path / "epoch=0000_step=0000002")
    assert (state["step"], state["samples"], state["epoch"]) == (2, 32, 0)
    assert state["epoch_progress"][1] == 32  # the epoch's samples so far travel with it
    assert first.tags["ran.notice"].startswith("SIGTERM on rank(s) 0: checkpoint epoch=0000_step")
    assert sorted(first.metrics["train/step_loss"]) == [1, 2]

    # Resumed at half the batch: 8 samples a step, the lr halved, the same samples to go.
    second = Recorder()
    resumed = _trainer(shards, run_log=second, **{"data.batch_size": 8, "train.epochs": 1})
    resumed.fit(LocalReporter(tmp_path))
    # 18 samples left of the epoch: steps of 8, 8 and 2, so 2 + 3 = 5 steps in all.
    assert resumed.samples == resumed.plan.total_samples == 50
    assert resumed.plan.total_steps == resumed.step == 5
    assert sorted(second.metrics["train/step_loss"]) == [3, 4, 5]
    # Epoch 1 ends at global step 5: neither short nor doubled, logged at the step it ended.
    assert second.metrics["train/epoch_samples"] == {5: 50} and second.metrics["train/epoch"] == {5: 1}
    assert second.metrics["train/lr"][5] == 0.0 and second.metrics["train/step_lr"][5] == 0.0
    assert second.metrics["plan/world_size"] == {0: 1, 2: 1}  # the series from its start
    assert second.metrics["plan/global_batch"] == {0: 16, 2: 8}
    assert second.tags["ran.resumed_from"] == "epoch=0 step=2"
    assert second.tags["ran.plan.global_batch"] == "8"
    assert second.tags["ran.replanned.step_2"] == (
        "1 -> 1 workers: global_batch 16 -> 8, peak_lr 0.1 -> 0.05, total_steps 4 -> 5")
    final = load_checkpoint(sorted(tmp_path.iterdir())[-1])
    assert (final["samples"], final["step"], final["epoch"]) == (50, 5, 1)


def test_data_streams_differ_only_where_an_epoch_was_resumed_mid_way():
    from ran.train.trainer import data_stream

    assert [data_stream(e, None, 0) for e in range(3)] == [0, 1, 2]
    resumed = {data_stream(1, 48, 0), data_stream(1, 48, 1), data_stream(1, 56, 0),
               data_stream(1, None, 1)}
    assert len(resumed) == 4 and not resumed & {0, 1, 2}
    assert all(0 < s < 2**56 for s in resumed)
    assert data_stream(1, 48, 0) == data_stream(1, 48, 0)  # a restart from there repeats it


def test_a_checkpoint_written_before_samples_were_counted_resumes_at_its_epoch_end(shards,
                                                                                  tmp_path):
    trainer = _trainer(shards, **{"train.epochs": 2})
    trainer.step, trainer.epoch = 4, 1  # as after epoch 1 (no need to train it)
    trainer.save(tmp_path / "old")
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    for key in ("samples", "epoch_progress"):
        del state[key]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    again = _trainer(shards, **{"train.epochs": 2})
    again.restore(tmp_path / "old")
    assert (again.step, again.samples, again.plan.total_steps) == (4, 50, 8)


def test_a_search_budgets_an_elastic_trial_at_its_maximum():
    from ran.tune.search import trial_cpus_gpus
    from ran.tune.space import parse_space

    space = parse_space({"space": {"optim.lr": {"choice": [0.1]}},
                         "search": {"resources": {"driver_cpus": 0.5}}})
    assert trial_cpus_gpus(space, _cfg(**{"scaling.num_workers": [1, 3]})) == (3.5, 0)
    gpus = _cfg(**{"scaling.num_workers": [2, 4], "scaling.use_gpu": True})
    assert trial_cpus_gpus(space, gpus) == (4.5, 4)
