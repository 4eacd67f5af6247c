"""The launcher's checks and the lean local Ray's trainer, without starting Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ran.config import ConfigError, load_config
from ran.train.launch import LEAN_SKIPPED_CALLBACKS, build_trainer
from ran.train.localray import auth_hint, check_reachable, check_resources
from ran.train.rundir import Storage


def _cfg(**overrides):
    base = {"data.path": "/nonexistent", "model.num_classes": 4, "scaling.cpus_per_worker": 1}
    return load_config(None, {**base, **overrides})


def test_check_resources_counts_whole_workers_per_node():
    two_nodes = [{"CPU": 3}, {"CPU": 2}]  # 3 + 2 workers of 1 CPU; 1 + 1 of 2 CPUs
    check_resources(_cfg(**{"scaling.num_workers": 5}), two_nodes)
    with pytest.raises(ConfigError) as err:
        check_resources(_cfg(**{"scaling.num_workers": 3, "scaling.cpus_per_worker": 2}), two_nodes)
    message = str(err.value)
    assert "cannot place 3 workers x 2 CPU" in message and "5 CPUs" in message
    assert "2 node(s), room for 2 worker(s)" in message


def test_check_resources_needs_a_gpu_per_worker():
    with pytest.raises(ConfigError, match=r"3 workers x 1 CPU \+ 1 GPU.*room for 2"):
        check_resources(_cfg(**{"scaling.num_workers": 3, "scaling.use_gpu": True}),
                        [{"CPU": 8, "GPU": 2}])


def test_lean_local_ray_drops_the_callbacks_it_has_no_use_for(monkeypatch, tmp_path: Path):
    cfg = _cfg()
    storage = Storage(uri=str(tmp_path), name="run", ray_path=str(tmp_path))

    def callbacks() -> set[str]:
        trainer = build_trainer(cfg, storage, {})
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    monkeypatch.delenv("RAN_RAY_NO_DASHBOARD", raising=False)
    stock = callbacks()
    # Ray Train still has both (else this test names callbacks that no longer exist) ...
    assert set(LEAN_SKIPPED_CALLBACKS) <= stock
    monkeypatch.setenv("RAN_RAY_NO_DASHBOARD", "1")
    lean = callbacks()
    # ... and the lean trainer keeps everything else: backend setup, user callbacks.
    assert lean == stock - set(LEAN_SKIPPED_CALLBACKS)
    assert {"BackendSetupCallback", "UserCallbackHandler"} <= lean


def test_check_reachable_refuses_a_closed_port_at_once_and_passes_a_listening_one():
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
    with pytest.raises(ConnectionError, match=rf"cannot connect to Ray at 127.0.0.1:{port}: nothing "
                                              r"answers there .*cluster/local.sh status"):
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # left to Ray, as are Ray Client addresses
    check_reachable("ray://head:10001")


def test_a_failed_connection_hints_at_token_auth_only_when_it_could_help(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    assert auth_hint() == ""  # no token here: sending one cannot help
    (tmp_path / "no-token").write_text("s3cret\n")
    assert "set RAY_AUTH_MODE=token" in auth_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already sent: the failure is something else
    assert auth_hint() == ""


def test_close_run_ends_open_runs_only(tmp_path: Path):
    from ran.tracking import RunTracker
    from ran.train.launch import close_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(**{"tracking.experiment": "close"})
    running = RunTracker.create(cfg.tracking.experiment, run_name="running", tags={}, uri=uri)
    finished = RunTracker.create(cfg.tracking.experiment, run_name="finished", tags={}, uri=uri)
    finished.finish("FINISHED")
    close_run(running, "FAILED")
    close_run(finished, "FAILED")  # e.g. --resume of a finished run, then Ray failed to start
    assert running.status == "FAILED"
    assert finished.status == "FINISHED"


def test_the_printed_mlflow_command_runs_without_an_activated_venv(monkeypatch, tmp_path):
    from ran.train.launch import mlflow_command

    monkeypatch.setenv("PATH", str(tmp_path))  # a shell that finds no mlflow
    command = mlflow_command()
    assert command == str(Path(sys.executable).parent / "mlflow")
    assert os.access(command, os.X_OK)
    (tmp_path / "mlflow").write_text("#!/bin/sh\n")
    (tmp_path / "mlflow").chmod(0o755)
    assert mlflow_command() == "mlflow"  # the shell's own, when there is one
