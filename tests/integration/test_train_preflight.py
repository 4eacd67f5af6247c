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


@pytest.mark.parametrize(("sets", "numbers", "fix"), [
    (["data.batch_size=512"], "data.batch_size 512 x 2 workers x train.grad_accum 1 = 1024",
     "set data.batch_size to at most 192"),
    (["train.grad_accum=16"], "data.batch_size 16 x 2 workers x train.grad_accum 16 = 512",
     "set data.batch_size to at most 12"),
    (["data.batch_size=1", "scaling.num_workers=[1, 400]"],
     "data.batch_size 1 x 400 workers x train.grad_accum 1 = 400",
     "use fewer workers (scaling.num_workers) or a smaller train.grad_accum"),
])
def test_a_step_larger_than_the_train_split_is_refused_before_ray_starts(
        job, capsys, mlflow_sqlite, tmp_path, synth_data, sets, numbers, fix, monkeypatch):
    from ran.train import localray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was reached for a job that pre-flight should refuse")

    monkeypatch.setattr(localray, "connect", no_ray)
    code, err = _train(capsys, str(job), *(a for s in sets for a in ("--set", s)))
    assert (code, err) == (2, f"error: one optimizer step takes {numbers} samples, more than the "
                              f"384 of split 'train' in {synth_data}; {fix}")
    _nothing_started(tmp_path)


def test_validating_on_the_training_split_is_refused(job, capsys, mlflow_sqlite, tmp_path):
    code, err = _train(capsys, str(job), "--set", "data.val_split=train")
    assert (code, err) == (2, "error: data.train_split and data.val_split are both 'train': "
                              "validation (and the registration gate) would score the training "
                              "data; set data.val_split to a held-out split")
    _nothing_started(tmp_path)


def test_resume_of_a_run_without_a_checkpoint_is_refused(job, capsys, mlflow_sqlite, tmp_path):
    (tmp_path / "runs" / "fixed").mkdir(parents=True)  # a run that stopped before its first one
    code, err = _train(capsys, str(job), "--set", "storage.name=fixed", "--resume")
    assert (code, err) == (2, f"error: nothing to resume: {tmp_path}/runs/fixed holds no "
                              "checkpoint (the run stopped before its first); set storage.name "
                              f"to a new name (or remove {tmp_path}/runs/fixed) to start again")
    (tmp_path / "runs" / "tiny-20261204-120000").mkdir()
    code, err = _train(capsys, str(job), "--resume")
    assert (code, err) == (2, f"error: nothing to resume: {tmp_path}/runs/tiny-20261204-120000 "
                              "holds no checkpoint (the run stopped before its first); run the "
                              "same command without --resume to start again")
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow run was opened or reopened"


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


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("tracking.registered_model", "team/tiny",
     "error: tracking.registered_model 'team/tiny' is refused by MLflow (Invalid model name "
     "'team/tiny'. Names cannot contain '/' or ':'); use any text without '/' or ':'"),
    ("tracking.registered_model", "tiny:v1",
     "error: tracking.registered_model 'tiny:v1' is refused by MLflow (Invalid model name "
     "'tiny:v1'. Names cannot contain '/' or ':'); use any text without '/' or ':'"),
    ("tracking.experiment", "''",
     "error: tracking.experiment '' is refused by MLflow (Invalid experiment name: ''); use a "
     "non-empty name of at most 500 characters"),
    ("storage.name", "team/run1",
     "error: storage.name 'team/run1' cannot name a run directory; use one directory name: no "
     "'/', not '.' or '..', not empty"),
    ("storage.name", "..",
     "error: storage.name '..' cannot name a run directory; use one directory name: no '/', not "
     "'.' or '..', not empty"),
    ("name", "a/b",
     "error: name (the job name) 'a/b' cannot name a run directory; use one directory name: no "
     "'/', not '.' or '..', not empty"),
])
def test_names_mlflow_or_ray_refuse_fail_before_anything_starts(job, capsys, mlflow_sqlite,
                                                                  tmp_path, key, value, expected):
    code, err = _train(capsys, str(job), "--set", f"{key}={value}")
    assert (code, err) == (2, expected)
    _nothing_started(tmp_path)


def test_an_alias_mlflow_refuses_is_one_line_before_the_registry_is_read(capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for alias, reason in [("latest", "'latest' alias name (case insensitive) is reserved"),
                          ("v2", "Version alias name 'v2' is reserved")]:
        assert main(["promote", "tiny", "--version", "1", "--alias", alias]) == 2
        assert capsys.readouterr().err == (
            f"error: --alias {alias!r} is refused by MLflow ({reason}); use letters, digits, _ "
            "and - (not 'latest', not v<number>)\n")
