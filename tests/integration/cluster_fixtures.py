"""A real Ray cluster of ``ray start`` processes on 127.0.0.1, owned by one test.

Each node is started with its own ports and a marker in its environment, which every process it
spawns inherits (raylet, GCS, dashboard, agents, workers, job drivers). Stopping a node signals
exactly the processes carrying its marker and their descendants, found with psutil (the dashboard's
module processes write their title over their environment, so only their parentage ties them to
the node). Ray 2.60 has no public way to stop one of several Ray instances on a machine: ``ray
stop`` ends every Ray process it finds, including other people's. Token authentication is on, with
a token of the cluster's own. The nodes hold storage and tracking credentials of their own
(``NODE_CREDENTIALS``, as a role or a secret file gives them to a real node), with recognisable
values, so a test can look for them where they must not be.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from processes import running, stop_processes

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = "RAN_TEST_RAY_NODE"  # environment marker: <cluster id>/<node name>

# Credentials in every node's environment (cluster/README.md: how real nodes get theirs), never
# the client's: recognisable values, new each session.
NODE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": f"AKIANODE{secrets.token_hex(6).upper()}",
    "AWS_SECRET_ACCESS_KEY": f"node-aws-secret-{secrets.token_hex(8)}",
    "AWS_SESSION_TOKEN": f"node-aws-session-{secrets.token_hex(8)}",
    "MLFLOW_TRACKING_USERNAME": f"node-mlflow-user-{secrets.token_hex(4)}",
    "MLFLOW_TRACKING_PASSWORD": f"node-mlflow-password-{secrets.token_hex(8)}",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked(cluster_id: str, node: str | None = None) -> list[psutil.Process]:
    """Running processes whose environment marks them as the cluster's (as ``node``'s, if given),
    with all their descendants; never this process or its parents."""
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or another user's
            value = proc.environ().get(MARK, "")
            if (value == f"{cluster_id}/{node}") if node else value.startswith(f"{cluster_id}/"):
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    return [p for pid, p in found.items() if pid not in skip and running(p)]


def stop_marked(cluster_id: str, node: str | None = None, grace: float = 10.0) -> None:
    """SIGTERM the marked processes, SIGKILL those left after ``grace`` seconds (at once when
    ``grace`` is 0), and the ones found since."""
    stop_processes(lambda: marked(cluster_id, node), grace, poll=0.2)


@dataclass
class LocalCluster:
    """A head and any number of worker nodes, each a ``ray start`` on this machine."""

    root: Path  # short temp dir (Unix socket paths are limited to ~100 bytes)
    env: dict[str, str]
    cluster_id: str = field(default_factory=lambda: secrets.token_hex(4))
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[str] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _node_env(self, name: str) -> dict[str, str]:
        # RAY_ADDRESS in every process of the cluster: the State API (which Ray Train's placement
        # group cleaner uses) cannot pick one cluster by itself when several run on this machine.
        return {**self.env, MARK: f"{self.cluster_id}/{name}", "RAY_ADDRESS": self.gcs_address}

    @staticmethod
    def _node_flags() -> list[str]:
        """Free ports for everything a node listens on (two nodes on one machine must not share
        the defaults), and a small object store."""
        node_manager, object_manager, agent, agent_grpc, metrics, runtime_env = free_ports(6)
        return ["--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
                "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
                "--object-store-memory", str(200 * 1024**2)]

    def local_sh(self, action: str, **settings: str) -> subprocess.CompletedProcess:
        """``cluster/local.sh ACTION`` for this cluster's head (its temp dir and ports)."""
        env = {**self._node_env("head"), "RAN_RAY_TEMP": str(self.root),
               "RAN_RAY_PORT": str(self.gcs_port), "RAN_DASHBOARD_PORT": str(self.dashboard_port),
               **settings}
        return subprocess.run([str(REPO / "cluster" / "local.sh"), action], env=env,
                              capture_output=True, text=True, timeout=180)

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """The head, started by ``cluster/local.sh start``: ``ray start --head`` on 127.0.0.1
        with the dashboard, here on free ports, ``num_cpus`` and custom ``resources``."""
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        self.nodes.append("head")
        flags = [*self._node_flags(), "--ray-client-server-port", str(client),
                 "--resources", json.dumps(resources or {}, separators=(",", ":"))]
        out = self.local_sh("start", RAN_RAY_CPUS=str(num_cpus), RAN_RAY_ARGS=" ".join(flags))
        if out.returncode != 0:
            raise RuntimeError(f"local.sh start failed:\n{out.stdout}\n{out.stderr}")
        self.wait_dashboard()

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """``ray start --address HEAD`` of a worker node. Its own temp dir, as on another machine:
        nodes sharing one would share runtime_resources/, and one node's cleanup would delete a
        job's working dir under the other's feet."""
        cmd = [str(BIN / "ray"), "start", "--address", self.gcs_address, "--node-ip-address",
               "127.0.0.1", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
               "--temp-dir", str(self.root / name), "--disable-usage-stats", *self._node_flags()]
        self.nodes.append(name)
        out = subprocess.run(cmd, env=self._node_env(name), capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out.stdout}\n{out.stderr}")

    def kill_node(self, name: str) -> None:
        """Kill a node as a machine failure would: SIGKILL, no goodbye to the GCS."""
        stop_marked(self.cluster_id, name, grace=0)

    def pids(self, name: str | None = None) -> list[int]:
        """PIDs of the node's processes (all nodes' without a name)."""
        return sorted(p.pid for p in marked(self.cluster_id, name))

    def stop(self) -> None:
        """``local.sh stop`` for the head, then every process left of any node."""
        problem = None
        if "head" in self.nodes:
            out = self.local_sh("stop")
            status = self.local_sh("status")
            if out.returncode != 0 or self.pids("head") or status.returncode != 1:
                problem = (f"local.sh stop -> {out.returncode}, left {self.pids('head')}: "
                           f"{out.stderr}; status after stop -> {status.returncode}: {status.stdout}")
        stop_marked(self.cluster_id, grace=3.0)
        if problem:
            raise AssertionError(problem)

    def get(self, path: str) -> dict:
        """GET a dashboard endpoint with the cluster's token; the decoded JSON."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}", headers={
            "Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def wait_dashboard(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/api/version")
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray dashboard at {self.dashboard_url}: {err}") from err
                time.sleep(0.5)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray State API rows (``nodes``, ``actors``, ...) over the dashboard's HTTP API."""
        query = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}"
                         for k, v in filters.items())
        body = self.get(f"/api/v0/{resource}?limit=1000&detail=1&{query}")
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        """Alive nodes, each with node_id, resources_total, labels."""
        return self.state("nodes", state="ALIVE")

    def wait_nodes(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected {count} alive nodes, have {len(self.alive_nodes())}")
            time.sleep(1)


def cluster_env() -> dict[str, str]:
    """Environment for the cluster's processes: our venv first on PATH, token auth, the nodes'
    credentials, quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", **NODE_CREDENTIALS)
    return env


@contextlib.contextmanager
def stopped_after() -> Iterator[LocalCluster]:
    """A cluster with no nodes yet, whose every process is stopped on exit; raises if any
    survives."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    cluster = LocalCluster(root, cluster_env())
    try:
        yield cluster
    finally:
        cluster.stop()
        left = cluster.pids()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes survived the cluster's stop: {left}"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalCluster]:
    """A head from ``cluster/local.sh start`` (1 CPU, resource head_slot) plus a worker node
    ``worker1`` (1 CPU, resource worker_slot), all on 127.0.0.1, shared by a module's tests; a
    dead node is noticed in about 3 s instead of 30 s. Stopped with ``cluster/local.sh stop``."""
    with stopped_after() as cluster:
        cluster.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                           RAY_health_check_failure_threshold="3")
        cluster.start_head(num_cpus=1, resources={"head_slot": 1})
        cluster.add_node("worker1", num_cpus=1, resources={"worker_slot": 1})
        cluster.wait_nodes(2)
        yield cluster


def ran(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``ran`` command of this venv; on failure the output is in the assertion."""
    out = subprocess.run([str(BIN / "ran"), *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"ran {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def client_env(cluster: LocalCluster, tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for ``ran submit`` / ``ran jobs``: no RAY_AUTH_MODE, the token in a file (as
    ``~/.ray/auth_token`` would hold it), so the token travels only if ``ran`` sends it; none of
    the nodes' credentials (the client is another machine)."""
    token = tmp / "auth_token"
    token.write_text(cluster.env["RAY_AUTH_TOKEN"])
    env = {k: v for k, v in cluster.env.items()
           if not k.startswith("RAY_") and k not in NODE_CREDENTIALS}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), **extra)
    return env
