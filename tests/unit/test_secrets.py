"""Secrets never reach argv, consoles or job metadata (DESIGN.md, "Trust boundaries"): `ran train`
and `ran tune` refuse an MLflow server URI that carries a password, as `ran submit` does, before
they contact anything (the server named on 127.0.0.1 sees no request)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pw-123"


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Recorder.requests = []
    yield f"127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.mark.parametrize("argv", [
    ["train", str(REPO / "jobs" / "demo.yaml")],
    ["tune", str(REPO / "tune_spaces" / "optim.yaml"), "--job", str(REPO / "jobs" / "demo.yaml")],
], ids=["train", "tune"])
def test_a_password_in_the_tracking_uri_is_refused_before_anything_starts(tmp_path, server, argv):
    uri = f"http://alice:{PASSWORD}@{server}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-m", "ran.cli", *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == (f"error: ran {argv[0]}: MLFLOW_TRACKING_URI http://alice:***@{server} holds "
                             "a password, which MLflow would print with every run's link: drop it "
                             "from the URI and set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD instead\n")
    assert PASSWORD not in result.stdout + result.stderr
    assert _Recorder.requests == []  # nothing was asked of the server
    assert list(tmp_path.iterdir()) == []  # no run directory, no store: nothing started
