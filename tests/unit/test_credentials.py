"""Credentials stay where they belong, without a cluster: what a submission carries (settings,
never secrets), the warning for a secret-looking ``--env``, and the one function that decides where
the Ray token goes (:func:`ran.cluster.token_for`), also through the HTTP calls ``ran submit`` and
``ran jobs`` make (a stand-in dashboard that records request headers on this machine's network
address). tests/integration/test_cluster.py checks the same against a real token-auth head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import ray

from ran import cluster
from ran.cli import build_parser, main

# Recognisable values: a leak shows up as the value itself.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAUNITTESTKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "unit-aws-secret-access-key",
    "AWS_SESSION_TOKEN": "unit-aws-session-token",
    "AWS_PROFILE": "unit-profile",
    "MLFLOW_TRACKING_USERNAME": "unit-mlflow-user",
    "MLFLOW_TRACKING_PASSWORD": "unit-mlflow-password",
    "MLFLOW_TRACKING_TOKEN": "unit-mlflow-token",
    "RAY_AUTH_TOKEN": "unit-ray-token",
}
# Settings that say where things are: these travel with the job.
SETTINGS = {
    "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    "MLFLOW_S3_ENDPOINT_URL": "http://minio.internal:9000",
    "AWS_ENDPOINT_URL": "http://minio.internal:9000",
    "AWS_REGION": "eu-central-1",
    "AWS_DEFAULT_REGION": "eu-central-1",
}

NAMED_HTTP_REFUSED = (
    "--address http://192.0.2.7:8265: plain http:// would send the Ray token in clear text to "
    "another host; use https://, or a tunnel to 127.0.0.1 (`ray dashboard CLUSTER.yaml`, "
    "`kubectl port-forward`), or pass --insecure on a network you trust")


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No MLflow/AWS/Ray settings, HOME an empty directory (no ~/.ray/auth_token); returns HOME."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "AWS_", "RAY_")):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def home_token(clean_env: Path) -> str:
    """A token in ~/.ray/auth_token only (as Ray 2.60 leaves after a local start)."""
    (clean_env / ".ray").mkdir()
    (clean_env / ".ray" / "auth_token").write_text("home-token\n")
    return "home-token"


@pytest.fixture
def project(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_job) -> Path:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "tiny.yaml").write_text(tiny_job("s3://b/shards", "s3://b/runs").to_yaml())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Where the Ray token goes: token_for


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1:8265", "http://localhost:8265",
                                     "http://[::1]:8265", "http://127.3.4.5:8265",
                                     "http://[::ffff:127.0.0.1]:8265"])
def test_a_loopback_address_gets_the_token_ray_would_find(home_token, address):
    assert cluster.token_for(address) == "home-token"
    assert cluster.auth_headers(address) == {"Authorization": "Bearer home-token"}


@pytest.mark.parametrize("address", ["http://192.0.2.7:8265", "https://ray.example.com",
                                     "http://head:8265", "http://10.0.0.5:8265"])
def test_a_token_file_alone_never_goes_to_another_host(home_token, address):
    assert cluster.token_for(address) is None
    assert cluster.token_for(address, insecure=True) is None
    assert cluster.auth_headers(address) == {}


def test_a_named_token_goes_to_a_named_https_address(clean_env, home_token, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "named-token")
    assert cluster.token_for("https://ray.example.com") == "named-token"
    assert cluster.token_for("https://192.0.2.7:8443") == "named-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # names the token file for any address, as Ray does
    assert cluster.token_for("https://ray.example.com") == "home-token"


@pytest.mark.parametrize("named", [{"RAY_AUTH_TOKEN": "named-token"}, {"RAY_AUTH_MODE": "token"}])
def test_plain_http_to_another_host_is_refused_without_insecure(home_token, monkeypatch, named):
    for key, value in named.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as refused:
        cluster.token_for("http://192.0.2.7:8265")
    assert str(refused.value) == NAMED_HTTP_REFUSED
    expected = named.get("RAY_AUTH_TOKEN", home_token)
    assert cluster.token_for("http://192.0.2.7:8265", insecure=True) == expected
    assert cluster.token_for("192.0.2.7:8265", insecure=True) == expected  # no scheme: http
    assert cluster.token_for("http://127.0.0.1:8265") == expected  # loopback needs no --insecure


def test_no_token_or_auth_disabled_sends_nothing_and_refuses_nothing(clean_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # asked for, but there is no token anywhere
    assert cluster.token_for("http://192.0.2.7:8265") is None
    monkeypatch.setenv("RAY_AUTH_TOKEN", "named-token")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for address in ("http://127.0.0.1:8265", "http://192.0.2.7:8265", "https://ray.example.com"):
        assert cluster.token_for(address) is None


def test_the_cli_refuses_plain_http_in_one_line_and_takes_insecure(home_token, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "named-token")
    assert main(["jobs", "list", "--address", "http://192.0.2.7:8265"]) == 2
    assert capsys.readouterr().err == f"error: {NAMED_HTTP_REFUSED}\n"
    parser = build_parser()
    assert parser.parse_args(["jobs", "list", "--insecure"]).insecure is True
    assert parser.parse_args(["jobs", "list"]).insecure is False
    assert parser.parse_args(["submit", "j.yaml", "--address", "h:1", "--insecure"]).insecure is True


# ---------------------------------------------------------------------------------------------
# The same decision in the HTTP requests ran makes


def network_ip() -> str:
    """This machine's first non-loopback IPv4 address (a stand-in for another host's)."""
    ips = sorted(ip for ip in cluster.this_machine_ips()
                 if ":" not in ip and not cluster.is_loopback(ip))
    if not ips:
        pytest.skip("this machine has no non-loopback IPv4 address to serve the stand-in on")
    return ips[0]


@dataclass
class StandIn:
    """A stand-in dashboard: what it saw, where it listens, what it answers."""

    seen: list[tuple[str, str | None]]  # (path, Authorization header) of every request
    url: str
    status: int = 200  # 401: as a token-auth dashboard answers a request without a token


@pytest.fixture
def recorder() -> Iterator[StandIn]:
    """A stand-in dashboard on this machine's network address (so not a loopback one): answers
    the version check and the State API node list, and records every request."""
    bodies = {"/api/version": {"ray_version": ray.__version__, "version": "4", "session_name": "x"},
              "/api/v0/nodes": {"data": {"result": {"result": []}}}}
    stand_in = StandIn([], "")

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stand_in.seen.append((self.path.split("?")[0], self.headers.get("Authorization")))
            body = json.dumps(bodies.get(self.path.split("?")[0], {})).encode()
            if stand_in.status == 401:
                body = b"Unauthorized: Missing authentication token"
            self.send_response(stand_in.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    ip = network_ip()
    server = ThreadingHTTPServer((ip, 0), Dashboard)
    stand_in.url = f"http://{ip}:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()


def in_fresh_process(code: str) -> str:
    """Run ``code`` (with ``cluster`` imported) in a new Python process, as ``ran submit`` and
    ``ran jobs`` run: once a process has itself joined a token-auth Ray (``ray.init``, as the
    integration tests do in this one), Ray's own client adds that token to every request, which
    is Ray's behaviour and not the decision under test. Returns its stdout."""
    done = subprocess.run([sys.executable, "-c", f"from ran import cluster\n{code}"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_requests_to_another_host_carry_no_local_token(home_token, recorder):
    shown = in_fresh_process(f"cluster.connect({recorder.url!r})\n"
                             f"print(cluster.cluster_is_local({recorder.url!r}))")
    assert shown == "False"
    assert recorder.seen == [("/api/version", None), ("/api/version", None), ("/api/v0/nodes", None)]


def test_requests_to_another_host_carry_a_named_token_only_with_insecure(home_token, recorder,
                                                                          monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "named-token")
    with pytest.raises(ValueError, match=r"plain http:// would send the Ray token"):
        cluster.connect(recorder.url)
    assert recorder.seen == []  # refused before any request
    cluster.connect(recorder.url, insecure=True)
    cluster.cluster_is_local(recorder.url, insecure=True)
    bearer = "Bearer named-token"
    assert recorder.seen == [("/api/version", bearer), ("/api/version", bearer),
                             ("/api/v0/nodes", bearer)]


def test_a_dashboard_wanting_the_token_says_how_to_give_it(home_token, recorder, monkeypatch):
    recorder.status = 401
    shown = in_fresh_process(f"try:\n    cluster.connect({recorder.url!r})\n"
                             f"except ConnectionError as e:\n    print(e)")
    assert shown == (
        f"Ray dashboard at {recorder.url} needs the cluster's Ray token: set RAY_AUTH_TOKEN to the "
        f"cluster's token (`ray get-auth-token` on the head prints it); the token in "
        f"~/.ray/auth_token goes only to 127.0.0.1 unless RAY_AUTH_MODE=token")
    assert recorder.seen == [("/api/version", None)]


# ---------------------------------------------------------------------------------------------
# What a submission carries


@pytest.mark.parametrize("local", [True, False])
def test_a_submission_carries_settings_and_no_secret(project, monkeypatch, local):
    for key, value in {**SECRETS, **SETTINGS}.items():
        monkeypatch.setenv(key, value)
    sub = cluster.build_submission("jobs/tiny.yaml", [], local=local)
    env = sub.runtime_env["env_vars"]
    assert env == {**SETTINGS, "RAY_JOB_SUBMISSION_ID": sub.submission_id}
    sent = json.dumps([sub.entrypoint, sub.runtime_env, sub.metadata, sub.notes])
    assert [v for v in SECRETS.values() if v in sent] == []
    assert sub.warnings == []


@pytest.mark.parametrize("name, secret", [
    ("AWS_SECRET_ACCESS_KEY", True), ("HF_TOKEN", True), ("db_password", True), ("API_KEY", True),
    ("MY_SECRET_THING", True), ("MLFLOW_TRACKING_URI", False), ("DATA_DIR", False), ("X", False)])
def test_env_names_that_look_secret(name, secret):
    assert cluster.looks_secret(name) is secret


def test_an_explicit_env_still_travels_with_a_warning_when_it_looks_secret(project, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf-value")
    monkeypatch.setenv("DATA_DIR", "/mnt/data")
    sub = cluster.build_submission("jobs/tiny.yaml", [], local=False,
                                   env=["HF_TOKEN", "DATA_DIR", "DB_PASSWORD=pw"])
    env = sub.runtime_env["env_vars"]
    assert (env["HF_TOKEN"], env["DATA_DIR"], env["DB_PASSWORD"]) == ("hf-value", "/mnt/data", "pw")
    assert sub.warnings == [
        f"--env {name} looks like a secret: its value is stored with the job, readable by anyone "
        f"who can list the cluster's jobs; give the nodes their own credentials instead "
        f"(cluster/README.md)" for name in ("HF_TOKEN", "DB_PASSWORD")]


def test_a_tracking_uri_with_a_password_is_refused(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow.internal")
    with pytest.raises(ValueError) as refused:
        cluster.build_submission("jobs/tiny.yaml", [], local=False)
    assert str(refused.value) == (
        "MLFLOW_TRACKING_URI holds a password, which would be stored with the job: drop it from "
        "the URI and give the cluster's nodes MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "(cluster/README.md)")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("uri, printed", [
    ("https://alice:hunter2@mlflow.internal", "https://alice:***@mlflow.internal"),
    ("http://alice:hunter2@10.0.0.5:5000/prefix", "http://alice:***@10.0.0.5:5000/prefix"),
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("http://alice@mlflow.internal", "http://alice@mlflow.internal"),  # no password: as it is
    ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
])
def test_a_password_in_a_tracking_uri_is_shown_as_stars(uri, printed):
    from ran import tracking

    assert tracking.shown(uri) == printed


def test_an_error_naming_the_server_does_not_print_its_password(clean_env, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:hunter2@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["registry"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow server http://alice:***@127.0.0.1:{port} does not answer")
    assert "hunter2" not in err and len(err.strip().splitlines()) == 1
