"""ran submit / ran jobs without a cluster: what a submission carries, what it refuses, what the
commands say when there is nothing to talk to."""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from ray.util import get_node_ip_address

from ran import cluster
from ran.cli import main
from ran.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_job) -> Path:
    """A working directory with jobs/tiny.yaml (shards in ./shards, runs in ./runs: relative
    paths); no MLflow/AWS/Ray settings in the environment."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "AWS_", "RAY_")):
            monkeypatch.delenv(key)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "tiny.yaml").write_text(tiny_job("shards", "runs").to_yaml())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def overrides_of(sub: cluster.Submission) -> dict[str, str]:
    argv = shlex.split(sub.entrypoint)
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def test_entrypoint_is_a_quoted_ran_command():
    cmd = cluster.entrypoint("jobs/a b.yaml", ["tracking.experiment=it's", "optim.lr=0.05"])
    assert shlex.split(cmd) == ["ran", "train", "jobs/a b.yaml", "--set", "tracking.experiment=it's",
                                "--set", "optim.lr=0.05"]
    tune = cluster.entrypoint("jobs/x.yaml", [], tune="tune_spaces/s.yaml")
    assert shlex.split(tune) == ["ran", "tune", "tune_spaces/s.yaml", "--job", "jobs/x.yaml"]


@pytest.mark.parametrize("given, url", [("HEAD:8265", "http://HEAD:8265"),
                                        ("http://h:8265/", "http://h:8265"),
                                        ("https://ray.example.com", "https://ray.example.com")])
def test_addresses_are_dashboard_urls(given, url):
    assert cluster.normalize_address(given) == url


def test_ray_client_and_gcs_style_addresses_are_refused():
    with pytest.raises(ValueError, match="dashboard's http"):
        cluster.normalize_address("ray://head:10001")


def test_local_submission_makes_paths_and_sqlite_store_absolute(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///store/mlflow.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stays-here")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    sub = cluster.build_submission("jobs/tiny.yaml", ["data.path=shards"], local=True)
    assert shlex.split(sub.entrypoint)[:3] == ["ran", "train", "jobs/tiny.yaml"]
    sets = overrides_of(sub)
    assert sets["data.path"] == str(project / "shards")
    assert sets["storage.path"] == str(project / "runs")
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{project}/store/mlflow.db"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "UNRELATED_SECRET" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert sub.runtime_env["working_dir"] == str(project)
    assert sub.metadata["ran.job"] == "jobs/tiny.yaml" and sub.metadata["ran.kind"] == "train"
    assert re.fullmatch(r"ran-tiny-\d{8}-\d{6}-[0-9a-f]{4}", sub.submission_id), sub.submission_id
    assert env["RAY_JOB_SUBMISSION_ID"] == sub.submission_id  # MLflow tags the run with it


def test_local_submission_without_tracking_uri_uses_the_embedded_store_here(project):
    sub = cluster.build_submission("jobs/tiny.yaml", [], local=True)
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{project}/mlflow.db"


def test_remote_submission_leaves_paths_alone_and_says_why(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    sub = cluster.build_submission("jobs/tiny.yaml", ["data.path=s3://b/shards"], local=False)
    assert overrides_of(sub) == {"data.path": "s3://b/shards"}
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert any("storage.path=runs is relative" in n for n in sub.notes)
    assert not any("data.path" in n for n in sub.notes)


def test_remote_submission_warns_that_a_local_mlflow_file_stays_behind(project):
    sub = cluster.build_submission("jobs/tiny.yaml", ["storage.path=s3://b/runs"], local=False)
    assert "MLFLOW_TRACKING_URI" not in sub.runtime_env["env_vars"]
    assert any(n.startswith("MLflow:") and "MLFLOW_TRACKING_URI=http" in n for n in sub.notes)


def test_excludes_skip_data_and_stores_but_not_the_ran_data_package():
    # Ray 2.60 has no public matcher for runtime_env excludes; this is the one its upload uses.
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", cluster.EXCLUDES)
    for skipped in (".venv/bin/python", "data/synth/train-000000.tar", "runs/job/ckpt.pt",
                    "mlflow.db", "mlartifacts/1/model.pt", "ran/__pycache__/cli.cpython-311.pyc"):
        assert spec.match_file(skipped), skipped
    for kept in ("ran/data/read.py", "ran/cluster.py", "jobs/demo.yaml", "tune_spaces/optim.yaml"):
        assert not spec.match_file(kept), kept


def test_the_repository_gitignore_does_not_hide_the_package_from_the_upload():
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", (REPO / ".gitignore").read_text().splitlines())
    assert not any(spec.match_file(str(p.relative_to(REPO))) for p in (REPO / "ran").rglob("*.py"))


def test_the_package_travels_as_a_py_module_when_outside_the_working_dir(project):
    sub = cluster.build_submission("jobs/tiny.yaml", [], local=True)
    assert sub.runtime_env["py_modules"] == [str(REPO / "ran")]
    (project / "inside").mkdir()
    with pytest.raises(ValueError, match="outside the working directory"):
        cluster.build_submission("jobs/tiny.yaml", [], local=True, working_dir=project / "inside")


def test_bad_jobs_fail_before_any_upload(project):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        cluster.build_submission("jobs/tiny.yaml", ["optim.lrr=1"], local=True)
    with pytest.raises(ConfigError, match="cannot read job config"):
        cluster.build_submission("jobs/missing.yaml", [], local=True)


def test_env_items_are_passed_or_refused(project, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "abc")
    sub = cluster.build_submission("jobs/tiny.yaml", [], local=False, env=["HF_TOKEN", "X=1"])
    assert sub.runtime_env["env_vars"]["HF_TOKEN"] == "abc"
    assert sub.runtime_env["env_vars"]["X"] == "1"
    with pytest.raises(ValueError, match="--env NOPE: not set here"):
        cluster.build_submission("jobs/tiny.yaml", [], local=False, env=["NOPE"])


def test_auth_token_from_env_then_file_then_default(project, monkeypatch, tmp_path):
    here = "http://127.0.0.1:8265"  # loopback: whichever token Ray would find is sent
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster.auth_headers(here) == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert cluster.auth_headers(here) == {"Authorization": "Bearer home"}
    (tmp_path / "tok").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert cluster.auth_headers(here) == {"Authorization": "Bearer file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert cluster.auth_headers(here) == {"Authorization": "Bearer env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_headers(here) == {}


@pytest.fixture
def state_api() -> Iterator[tuple[list[dict], str]]:
    """A stand-in for a dashboard's State API node list on 127.0.0.1: the test fills the list;
    yields it and the dashboard address."""
    nodes: list[dict] = []

    class NodeList(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self.path.startswith("/api/v0/nodes?"):
                self.send_error(404)
                return
            body = json.dumps({"data": {"result": {"result": nodes}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NodeList)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield nodes, f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_cluster_is_local_when_every_alive_node_is_this_machine(state_api):
    nodes, address = state_api
    assert cluster.cluster_is_local(address) is False  # no node: nothing to run the job
    nodes += [{"node_ip": "127.0.0.1", "state": "ALIVE"},
              {"node_ip": get_node_ip_address(), "state": "ALIVE"},  # the address Ray picks here
              {"node_ip": "192.0.2.7", "state": "DEAD"}]  # TEST-NET-1: never this machine
    assert cluster.cluster_is_local(address) is True
    nodes.append({"node_ip": "192.0.2.8", "state": "ALIVE"})
    assert cluster.cluster_is_local(address) is False


def test_an_unreachable_cluster_counts_as_remote():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cluster.cluster_is_local(f"127.0.0.1:{port}") is False


def test_an_unreachable_dashboard_is_a_one_line_error(project, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["submit", "jobs/tiny.yaml", "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}")
    assert err.count("\n") == 1


def test_an_invalid_job_fails_before_connecting(project, capsys):
    code = main(["submit", "jobs/tiny.yaml", "--set", "scaling.num_workers=0",
                 "--address", "http://127.0.0.1:1"])
    assert code == 2
    assert "scaling.num_workers" in capsys.readouterr().err


def test_jobs_commands_need_an_id_and_an_address(project, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "status", "--address", "http://127.0.0.1:1"])
    assert exit_.value.code == 2
    assert "the following arguments are required: job_id" in capsys.readouterr().err
    assert main(["jobs", "list"]) == 2
    assert "pass --address" in capsys.readouterr().err


def _job(sid, status, start, end, message=""):
    return SimpleNamespace(submission_id=sid, status=status, start_time=start, end_time=end,
                           entrypoint=f"ran train jobs/{sid}.yaml", metadata={"ran.job": sid},
                           message=message, driver_exit_code=None, job_id="01000000")


def test_job_list_is_oldest_first_with_durations(capsys):
    cluster.print_jobs([_job("b", "RUNNING", 2_000_000, None), _job("a", "SUCCEEDED", 1_000_000, 1_065_000),
                        _job(None, "SUCCEEDED", 0, 1)])  # a driver job: not a submission
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["SUBMISSION", "ID"]
    assert [ln.split()[0] for ln in lines[1:]] == ["a", "b"]
    assert "0:01:05" in lines[1] and lines[1].endswith("ran train jobs/a.yaml")


def test_failed_job_message_is_cut_to_its_first_line(capsys):
    info = _job("a", "FAILED", 1, 2, "Job entrypoint command failed with exit code 1, last "
                                     "available logs (truncated to 20,000 chars):\nTraceback ...")
    assert cluster.report_end(info) == 1
    assert capsys.readouterr().out.strip() == \
        "job a FAILED: Job entrypoint command failed with exit code 1"


def test_tune_submissions_run_ran_tune_over_the_space(project):
    sub = cluster.build_submission(str(REPO / "jobs/demo.yaml"), ["train.epochs=2"], local=False,
                                   tune=str(REPO / "tune_spaces/optim.yaml"), working_dir=REPO)
    assert shlex.split(sub.entrypoint)[:5] == ["ran", "tune", "tune_spaces/optim.yaml", "--job",
                                               "jobs/demo.yaml"]
    assert sub.metadata["ran.kind"] == "tune"
    assert "py_modules" not in sub.runtime_env  # the repository holds the package


def test_a_broken_search_space_fails_before_any_upload(project):
    (project / "space.yaml").write_text("space: {optim.lrr: {choice: [1, 2]}}\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        cluster.build_submission("jobs/tiny.yaml", [], local=False, tune="space.yaml")



def test_rays_upload_lines_are_kept_back_unless_verbose(monkeypatch):
    """`ran submit` prints no `WARNING working_dir.py` / `INFO packaging.py` lines without -v:
    Ray's upload loggers are at ERROR while the job is submitted, and restored after."""
    import logging

    loggers = [logging.getLogger(name) for name in cluster.UPLOAD_LOGGERS]
    before = [lg.level for lg in loggers]
    monkeypatch.delenv("RAN_LOG_LEVEL", raising=False)
    with cluster._quiet_upload():
        assert not any(lg.isEnabledFor(logging.WARNING) for lg in loggers)
    assert [lg.level for lg in loggers] == before
    monkeypatch.setenv("RAN_LOG_LEVEL", "INFO")  # ran -v
    with cluster._quiet_upload():  # -v: Ray's loggers keep their levels (an earlier ray.init
        assert [lg.level for lg in loggers] == before  # here sets them: not 'INFO enabled')


def test_a_submitted_search_takes_search_keys_like_ran_tune(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("space:\n  optim.lr: {choice: [0.1, 0.2]}\n")
    job = tmp_path / "j.yaml"
    job.write_text("name: j\n")
    cfg = cluster.validate(str(job), ["search.num_samples=2", "optim.momentum=0.8"], str(space))
    assert cfg.optim.momentum == 0.8
    with pytest.raises(ConfigError, match="unknown config key 'search.trials'"):
        cluster.validate(str(job), ["search.trials=2"], str(space))
