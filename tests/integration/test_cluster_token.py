"""A Ray head from ``cluster/local.sh start`` requires a token (DESIGN.md, "Trust boundaries";
issue 22 kind 1), also on a machine where there is none yet: it creates a private one, and a job
POSTed without it, to the dashboard's Jobs API or straight to the dashboard agent's, is refused
and runs nothing."""

from __future__ import annotations

import json
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_fixtures import LocalCluster, cluster_env, free_ports, stopped_after

pytestmark = pytest.mark.integration


def _post_job(url: str, marker: Path, token: str | None = None) -> tuple[int, str]:
    body = json.dumps({"entrypoint": f"touch {marker}"}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _start_without_a_token(cluster: LocalCluster, home: Path) -> int:
    """local.sh start on a machine with no token anywhere (a fresh HOME, no RAY_AUTH_*); returns
    the dashboard agent's HTTP port."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        cluster.env.pop(key, None)
    cluster.env["HOME"] = str(home)
    cluster.gcs_port, cluster.dashboard_port, client = free_ports(3)
    flags = LocalCluster._node_flags() + ["--ray-client-server-port", str(client)]
    agent = int(flags[flags.index("--dashboard-agent-listen-port") + 1])
    cluster.nodes.append("head")
    out = cluster.local_sh("start", RAN_RAY_CPUS="1", RAN_RAY_ARGS=" ".join(flags))
    assert out.returncode == 0, out.stdout + out.stderr
    token_file = home / ".ray" / "auth_token"
    assert f"created the Ray auth token {token_file} (0600)" in out.stdout
    cluster.env["RAY_AUTH_TOKEN"] = token_file.read_text()  # what cluster.get sends
    return agent


def test_a_job_posted_without_the_token_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    with stopped_after() as cluster:
        agent = _start_without_a_token(cluster, tmp_path / "home")
        token_file = tmp_path / "home" / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        assert len(token_file.read_text()) == 64

        cluster.wait_dashboard()  # the token opens it
        assert "Token authentication is disabled" not in (cluster.root / "start.log").read_text()
        for url in (f"{cluster.dashboard_url}/api/jobs/", f"http://127.0.0.1:{agent}/api/job_agent/jobs/"):
            status, text = _post_job(url, marker)
            assert status == 401 and "token" in text.lower(), (url, status, text)
        status, text = _post_job(f"{cluster.dashboard_url}/api/jobs/", marker, token="0" * 64)
        assert status == 403, (status, text)
        time.sleep(5)  # time enough for a job that had been accepted to start and touch it
        assert cluster.get("/api/jobs/") == []
    assert not marker.exists()


def test_an_existing_token_file_is_made_private_and_disabled_auth_is_refused(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token_file = home / ".ray" / "auth_token"
    token_file.write_text("a" * 64)
    token_file.chmod(0o644)  # as Ray writes it
    with stopped_after() as cluster:
        refused = cluster.local_sh("start", HOME=str(home), RAY_AUTH_MODE="disabled")
        assert refused.returncode == 2
        assert refused.stderr == ("local.sh: RAY_AUTH_MODE=disabled: this head runs with token "
                                  "authentication only (unset it)\n")
        assert cluster.pids() == []
        cluster.env.pop("RAY_AUTH_MODE", None)
        cluster.env.pop("RAY_AUTH_TOKEN", None)
        cluster.env["HOME"] = str(home)
        cluster.gcs_port, cluster.dashboard_port, client = free_ports(3)
        cluster.nodes.append("head")
        out = cluster.local_sh("start", RAN_RAY_CPUS="1", RAN_RAY_ARGS=" ".join(
            LocalCluster._node_flags() + ["--ray-client-server-port", str(client)]))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "created" not in out.stdout  # the existing token is the cluster's
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        cluster.env["RAY_AUTH_TOKEN"] = "a" * 64
        cluster.wait_dashboard()


def test_the_token_a_local_ran_ray_writes_is_private(tmp_path):
    """A local Ray of `ran train` (LocalRay) starts with token auth on and leaves the token Ray
    writes on a first start readable by its owner only."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    code = ("import os; from ran.train.localray import LocalRay\n"
            "with LocalRay(num_cpus=1, include_dashboard=False) as local:\n"
            "    print(os.environ.get('RAY_AUTH_MODE'))\n")
    env = {k: v for k, v in cluster_env().items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "token"  # Ray's default for a local start: on
    token_file = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert os.path.getsize(token_file) > 0
