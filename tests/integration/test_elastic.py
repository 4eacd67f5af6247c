"""Elastic and re-planned training on a real Ray: a run resumed on fewer and then more workers, an
elastic group that loses a node, and an elastic job too big for the cluster.

Whatever the world size does, a run must end as planned in samples: the same MLflow run,
FINISHED, every epoch logged once with all its samples, the total samples of the plan, the cosine
lr at 0, one step_loss per optimizer step, and what changed in tags and per-attempt metrics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_fixtures import BIN, LocalCluster, stopped_after  # noqa: E402
from fault_injection import fault_env  # noqa: E402

pytestmark = pytest.mark.integration

SAMPLES = 3 * 384  # 3 epochs of synth_data's train split


def _values(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _the_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ran").experiment_id])
    assert len(runs) == 1, "every attempt must continue the same MLflow run"
    return runs[0]


def _assert_finished_as_planned(uri: str, run, steps: int, exact: bool = True) -> None:
    """FINISHED; 3 epochs logged once each (epoch 1 at step 12, 2 workers' 12 steps), in order,
    with 384 samples each; cosine lr ends at 0; one step_loss per step 1..steps (``exact=False``:
    and maybe more, see below); no plan params (they would have changed).

    Where epochs 2 and 3 end depends on the plan of the attempt that logged them, and a killed
    worker group may train (and log) on for a moment before it dies (see below): an epoch is
    logged once, by whichever attempt finished it first (the group that lost a node may finish
    epoch 2 at step 24 before the kill lands, or the one-worker group at 36), so its step is not
    asserted: the step-loss history below is exact either way."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    epochs = _values(uri, run_id, "train/epoch")
    assert [e for _, e in epochs] == [1, 2, 3] and epochs[0][0] == 12, epochs
    ends = [step for step, _ in epochs]
    for key in ("train/loss", "eval/top1", "train/lr", "perf/img_per_s", "train/epoch_samples", "train/samples"):
        assert [s for s, _ in _values(uri, run_id, key)] == ends, key  # beside its epoch
    assert [v for _, v in _values(uri, run_id, "train/epoch_samples")] == [384, 384, 384]
    assert [v for _, v in _values(uri, run_id, "train/samples")] == [384, 768, SAMPLES]
    assert _values(uri, run_id, "train/lr")[-1][1] == 0.0
    logged = [s for s, _ in _values(uri, run_id, "train/step_loss")]
    assert len(logged) == len(set(logged)), "a step was logged twice"
    if exact:
        assert logged == list(range(1, steps + 1))
        assert _values(uri, run_id, "train/step_lr")[-1] == (steps, 0.0)
    else:
        # A killed worker group that was not held back by a peer (1 worker) trains on until its
        # next checkpoint waits; the steps it logged past the checkpoint the run restarts from
        # stay (ran.tracking keeps the first value of a step; MLflow deletes no metric points),
        # and after a re-plan to fewer, larger steps they may reach past the run's last step.
        assert logged[:steps] == list(range(1, steps + 1))
    assert not [p for p in run.data.params if p.startswith("plan")]


def test_resumed_on_fewer_then_more_workers_the_run_finishes_its_planned_samples(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path):
    """2 workers, killed 3 steps into epoch 2 with no restarts left; --resume on 1 worker, killed
    mid-epoch 3; --resume on 2 workers again, which finishes. Each resume is from a mid-epoch
    checkpoint and re-plans the rest: 36 steps of 32 planned, 15 done; 42 of 16 to go (57 in
    all), 30 done; 6 of 32 to go (51 in all)."""
    from ray.train import TrainingFailedError

    from ran.runtime import load_checkpoint
    from fault_injection import Fault, KillWorker
    from ran.train.launch import run_training

    def job(workers: int):
        return tiny_job(synth_data, tmp_path / "runs", **{
            "train.epochs": 3, "train.log_every": 1, "train.checkpoint_every_steps": 15,
            "scaling.num_workers": workers, "scaling.max_failures": 0, "storage.name": "chain"})

    with pytest.raises(TrainingFailedError):
        run_training(job(2), callbacks=[KillWorker(Fault(after_step=15, rank=1,
                                                          marker=str(tmp_path / "a")))])
    with pytest.raises(TrainingFailedError):
        run_training(job(1), resume=True,
                     callbacks=[KillWorker(Fault(after_step=45, rank=0, marker=str(tmp_path / "b")))])
    outcome = run_training(job(2), resume=True)

    assert (tmp_path / "a").read_text().endswith(" killed after step 15\n")
    assert (tmp_path / "b").read_text().endswith(" killed after step 45\n")
    run = _the_run(mlflow_sqlite)
    assert run.info.run_id == outcome.run_id
    _assert_finished_as_planned(mlflow_sqlite, run, steps=51, exact=False)
    uri, run_id = mlflow_sqlite, run.info.run_id
    assert _values(uri, run_id, "plan/world_size") == [(0, 2), (15, 1), (45, 2)]
    assert _values(uri, run_id, "plan/global_batch") == [(0, 32), (15, 16), (45, 32)]
    assert _values(uri, run_id, "plan/peak_lr") == [(0, 0.1), (15, 0.05), (45, 0.1)]
    tags = run.data.tags
    assert tags["ran.replanned.step_15"] == (
        "2 -> 1 workers: global_batch 32 -> 16, peak_lr 0.1 -> 0.05, total_steps 36 -> 57")
    assert tags["ran.replanned.step_45"] == (
        "1 -> 2 workers: global_batch 16 -> 32, peak_lr 0.05 -> 0.1, total_steps 57 -> 51")
    assert tags["ran.resumed_from"] == "epoch=2 step=45"
    assert (tags["ran.plan.world_size"], tags["ran.plan.total_steps"]) == ("2", "51")
    assert outcome.metrics["step"] == 51 and outcome.metrics["train/samples"] == SAMPLES
    assert outcome.metrics["train/lr"] == 0.0  # the cosine's end, where the first attempt planned it
    final = load_checkpoint(outcome.checkpoint)
    assert (final["step"], final["samples"], final["plan"]["total_steps"]) == (51, SAMPLES, 51)
    assert final["scheduler"] == {"samples": SAMPLES, "lr": 0.0}


@pytest.fixture(scope="module")
def head_and_worker_node() -> Iterator[LocalCluster]:
    """A head and a worker node of 1 CPU each on 127.0.0.1: a lost node is noticed in about 3 s,
    and a worker group that cannot be placed gives up after 10 s (Ray's default is 60)."""
    with stopped_after() as cluster:
        cluster.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                           RAY_health_check_failure_threshold="3",
                           RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
        cluster.start_head(num_cpus=1)
        cluster.add_node("worker1", num_cpus=1)
        cluster.wait_nodes(2)
        yield cluster


def test_an_elastic_group_that_loses_a_node_continues_with_one_worker(
        head_and_worker_node, synth_data, tiny_job, tmp_path):
    """min 1, max 2 workers, one per node. After epoch 1's checkpoint the worker node's Train
    worker and raylet are killed by PID (a reclaimed machine, from outside); no node replaces it,
    and the run goes on from that checkpoint with one worker: 12 steps of 32, then 48 of 16."""
    cluster = head_and_worker_node
    worker_node = set(cluster.pids("worker1"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "train.epochs": 3, "train.log_every": 1, "scaling.num_workers": [1, 2],
        "scaling.max_failures": 1}).to_yaml())
    marker = tmp_path / "node-lost"
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "MLFLOW_TRACKING_URI": uri,
           **fault_env(after_epoch=1, target="node", rank=1, marker=marker)}
    done = subprocess.run([str(BIN / "ran"), "train", str(job)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]

    killed = re.fullmatch(r"rank \d \(pid (\d+)\) and its node's raylet \(pid (\d+)\) killed "
                          r"after epoch 1\n", marker.read_text())
    assert killed and int(killed.group(2)) in worker_node, (marker.read_text(), worker_node)
    assert len(cluster.alive_nodes()) == 1  # nothing replaced the lost node
    assert re.search(r"resumed from \S+ at epoch 1, step 12 \(sample 384 of 1152\); 2 -> 1 "
                     r"workers: global_batch 32 -> 16, peak_lr 0.1 -> 0.05, total_steps 36 -> 60",
                     out), out[-4000:]
    run = _the_run(uri)
    _assert_finished_as_planned(uri, run, steps=60)
    assert _values(uri, run.info.run_id, "plan/world_size") == [(0, 2), (12, 1)]
    assert run.data.tags["ran.resumed_from"] == "epoch=1 step=12"


def test_an_elastic_job_whose_minimum_cannot_be_placed_fails_in_preflight(
        ray_local, synth_data, tiny_job, mlflow_sqlite, tmp_path, capsys):
    from ran.cli import main

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    code = main(["train", str(job), "--set", "scaling.num_workers=[3, 4]"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: the Ray cluster cannot place the minimum of 3 workers x 1 CPU "
        "(scaling.num_workers=[3, 4]): it has 2 CPUs and 0 GPUs on 1 node(s), room for 2 "
        "worker(s); lower scaling.num_workers or scaling.cpus_per_worker, or add nodes")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
