"""ran.tracking on a real MLflow sqlite store: where runs go, and each step logged exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from ran import tracking

pytestmark = pytest.mark.integration


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"  # absolute: workers chdir
    assert tracking.default_artifact_location("demo") == str(tmp_path / "mlartifacts" / "demo")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/runs.db")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/sub/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.default_artifact_location("demo") is None  # the server decides


def test_replayed_steps_are_not_logged_twice(mlflow_sqlite, tiny_job, tmp_path):
    cfg = tiny_job("data", tmp_path / "runs")
    first = tracking.RunTracker.create_training(cfg, run_name="r", tags={tracking.TAG_STORAGE: "runs/r"})
    # Epochs of 12 optimizer steps: every metric at the global step, the epoch as a metric.
    assert first.log_metrics({"train/epoch": 1, "eval/top1": 0.3, "train/loss": 2.0}, step=12) == 3
    assert first.log_metrics({"train/step_loss": 1.6}, step=20) == 1
    assert first.log_metrics({"train/epoch": 2, "eval/top1": 0.5, "train/loss": 1.5}, step=24) == 3

    # A restarted worker group replays epoch 2 from the epoch-1 checkpoint, then goes on.
    again = tracking.RunTracker(first.run_id)
    assert again.log_metrics({"train/step_loss": 1.55}, step=20) == 0
    assert again.log_metrics({"train/epoch": 2, "eval/top1": 0.51, "train/loss": 1.4}, step=24) == 0
    assert again.log_metrics({"train/epoch": 3, "eval/top1": 0.7, "train/loss": 1.0}, step=36) == 3
    assert again.history("eval/top1") == [(12, 0.3), (24, 0.5), (36, 0.7)]
    assert again.history("train/epoch") == [(12, 1), (24, 2), (36, 3)]
    assert [s for s, _ in again.history("train/loss")] == [12, 24, 36]

    # Re-planned for half the workers: epochs of 24 steps from the epoch-3 checkpoint. Epoch 3
    # replayed ends at another step, and is still not logged twice.
    replanned = tracking.RunTracker(first.run_id)
    assert replanned.log_metrics({"train/epoch": 3, "eval/top1": 0.69, "train/loss": 1.1}, step=60) == 0
    assert replanned.log_metrics({"train/epoch": 4, "eval/top1": 0.8, "train/loss": 0.8}, step=84) == 3
    assert replanned.history("train/epoch") == [(12, 1), (24, 2), (36, 3), (84, 4)]
    assert replanned.history("eval/top1")[-1] == (84, 0.8)


def test_run_is_found_by_its_storage_tag_and_reopened(mlflow_sqlite, tiny_job, tmp_path):
    cfg = tiny_job("data", tmp_path / "runs")
    run = tracking.RunTracker.create_training(cfg, run_name="r", tags={tracking.TAG_STORAGE: "s3://b/runs/x"})
    assert run.tag(tracking.TAG_STORAGE) == "s3://b/runs/x"
    assert run.client.get_run(run.run_id).data.params["model.name"] == "attention56"
    run.finish("FAILED")
    found = tracking.RunTracker.find(cfg.tracking.experiment, "s3://b/runs/x")
    assert found is not None and found.run_id == run.run_id
    found.reopen()
    assert found.status == "RUNNING"
    assert tracking.RunTracker.find(cfg.tracking.experiment, "s3://b/runs/other") is None


def test_curves_png_is_drawn_from_the_history(mlflow_sqlite, tiny_job, tmp_path):
    cfg = tiny_job("data", tmp_path / "runs")
    run = tracking.RunTracker.create_training(cfg, run_name="r", tags={})
    for epoch in (1, 2):
        run.log_metrics({"train/loss": 1.0 / epoch, "eval/loss": 1.2 / epoch, "eval/top1": 0.4 * epoch,
                         "eval/top5": 0.9}, step=epoch)
    run.log_metrics({"train/step_lr": 0.1}, step=10)
    run.log_curves()
    path = Path(run.client.download_artifacts(run.run_id, tracking.CURVES_ARTIFACT, str(tmp_path)))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "config.yaml" in {a.path for a in run.client.list_artifacts(run.run_id)}


def test_run_logger_writes_in_order_off_the_caller_thread(mlflow_sqlite, tiny_job, tmp_path):
    cfg = tiny_job("data", tmp_path / "runs")
    run = tracking.RunTracker.create_training(cfg, run_name="r", tags={})
    logger = tracking.RunLogger(run.run_id)
    for epoch in (1, 2, 3):
        logger.log_metrics({"eval/top1": epoch / 10}, epoch)
    logger.log_metrics({"eval/top1": 0.99}, 2)  # a replayed epoch: not logged twice
    logger.set_tags({tracking.TAG_PRECISION: "fp32"})
    logger.log_params({"plan.epochs": 3})
    assert logger.flush(60) is True
    assert logger.unlogged() == {} and logger.gap_report() == {}
    logger.close()
    assert run.history("eval/top1") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.tag(tracking.TAG_PRECISION) == "fp32"
    assert run.client.get_run(run.run_id).data.params["plan.epochs"] == "3"
    assert logger.dropped == 0


def test_run_logger_counts_what_an_unreachable_server_lost(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = tracking.RunLogger("0" * 32, "http://127.0.0.1:9", retry_s=0.0)  # nothing listens
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, 1)
    logger.close(timeout=120)
    assert logger.dropped == 2
    assert "2 metric values not logged so far" in capsys.readouterr().err


def test_run_logger_names_the_values_a_server_never_got(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = tracking.RunLogger("0" * 32, "http://127.0.0.1:9")  # nothing listens; retried 600 s
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, 1)
    logger.log_metrics({"train/loss": 0.9, "train/lr": 0.1}, 2)
    logger.log_metrics({"train/step_loss": 1.2, "train/step_lr": None}, 8)
    assert logger.flush(3) is False
    assert logger.unlogged() == {"train/loss": [1, 2], "train/lr": [1, 2], "train/step_loss": [8]}
    assert logger.gap_report(timeout=0) == {
        tracking.REPORT_UNLOGGED: "train/loss, train/lr at steps 1, 2; train/step_loss at step 8"}
    logger.close(timeout=120)
    assert logger.dropped == 5
    assert logger.unlogged() == {"train/loss": [1, 2], "train/lr": [1, 2], "train/step_loss": [8]}


def test_a_training_run_logs_its_train_and_val_shards_as_datasets(mlflow_sqlite, synth_data, tiny_job,
                                                                  tmp_path):
    from ran.data.read import read_manifest

    cfg = tiny_job(synth_data, tmp_path / "runs")
    manifest = read_manifest(synth_data)
    first, second = (tracking.RunTracker.create_training(cfg, run_name=n, tags={}, manifest=manifest)
                     for n in ("a", "b"))
    seen = []
    for run in (first, second):
        inputs = run.client.get_run(run.run_id).inputs.dataset_inputs
        seen.append({i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in inputs})
    assert seen[0] == seen[1] == {
        "training": ("synthetic/train", tracking.dataset_digest(manifest, "train")),
        "validation": ("synthetic/val", tracking.dataset_digest(manifest, "val"))}
    assert seen[0]["training"][1] != seen[0]["validation"][1]
