"""Bad jobs fail before any worker starts, with one line that says what to change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ran.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture
def job(tmp_path: Path, synth_data: str, tiny_job) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_job(synth_data, tmp_path / "runs").to_yaml())
    return path


def _train(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def _nothing_started(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists(), "a run directory was created"
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow run was created"


def test_unknown_key_lists_valid_keys(job, capsys, mlflow_sqlite, tmp_path):
    code, err = _train(capsys, str(job), "--set", "optim.lrr=0.1")
    assert code == 2
    assert err.startswith("error: unknown config key 'optim.lrr'; valid keys: ")
    assert "optim.lr" in err and "\n" not in err
    _nothing_started(tmp_path)


def test_negative_lr(job, capsys, mlflow_sqlite, tmp_path):
    code, err = _train(capsys, str(job), "--set", "optim.lr=-0.1")
    assert code == 2 and "optim.lr: Input should be greater than 0" in err
    _nothing_started(tmp_path)


def test_missing_shards(job, capsys, mlflow_sqlite, tmp_path, synth_data):
    broken = tmp_path / "broken"
    shutil.copytree(synth_data, broken)
    (broken / "train-000001.tar").unlink()
    code, err = _train(capsys, str(job), "--set", f"data.path={broken}")
    assert code == 2
    assert "1 of 3 train shards missing" in err and "train-000001.tar" in err
    _nothing_started(tmp_path)


def test_missing_manifest(job, capsys, mlflow_sqlite, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _train(capsys, str(job), "--set", f"data.path={tmp_path / 'empty'}")
    assert code == 2 and "no manifest.json" in err and "ran data synth" in err
    _nothing_started(tmp_path)


def test_impossible_model_and_cpu_syncbn(job, capsys, mlflow_sqlite, tmp_path):
    code, err = _train(capsys, str(job), "--set", "model.depth=57")
    assert code == 2 and "impossible depth 57" in err
    code, err = _train(capsys, str(job), "--set", "train.sync_batchnorm=true")
    assert code == 2 and "sync_batchnorm needs scaling.use_gpu" in err
    _nothing_started(tmp_path)


def test_more_workers_than_the_cluster_can_place(job, capsys, mlflow_sqlite, tmp_path, ray_local):
    from ray.util.state import list_actors

    def controllers() -> int:
        return len(list_actors(address=ray_local, filters=[("class_name", "=", "TrainController")]))

    before = controllers()
    code, err = _train(capsys, str(job), "--set", "scaling.num_workers=3")
    assert code == 2
    assert "cannot place 3 workers x 1 CPU" in err and "2 CPUs" in err
    assert controllers() == before
    _nothing_started(tmp_path)
