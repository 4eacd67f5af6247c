"""cluster/: the launcher config, KubeRay manifests, image and README cannot run here, so they are
parsed and held to what matters: valid for Ray's own schema, images of the installed Ray and Python,
GPU requests where training runs, none on the head, entrypoints that are real `ran` commands
over real job files, dashboards on 127.0.0.1 unless token auth is on in the same file, and
credentials that come from the cluster (roles, Kubernetes secrets, a secret file), never written in. cluster/local.sh runs here, against stand-in processes rather than a Ray
head (tests/integration/test_cluster.py starts a real one with it)."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import yaml

from ran.cli import build_parser
from ran.cluster import looks_secret
from ran.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PY = f"py{sys.version_info.major}{sys.version_info.minor}"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-{PY}"  # + -cpu or -gpu (CUDA 12)


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def parse_ran(command: str) -> Any:
    """A `ran ...` command line as ran's own CLI parses it (SystemExit if it would not)."""
    argv = shlex.split(command)
    assert argv[0] == "ran", command
    return build_parser().parse_args(argv[1:])


def check_ran_job_command(command: str, cwd: Path = REPO) -> Any:
    """The command parses, names an existing job file, and the job accepts its --set overrides."""
    args = parse_ran(command)
    assert args.command in ("train", "tune", "submit"), command
    assert (cwd / args.job).is_file(), f"{command}: no job file {args.job}"
    return load_config(cwd / args.job, args.overrides)


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return load("aws-gpu.yaml")


def test_aws_config_passes_rays_own_schema(aws):
    # Ray 2.60 has no public validator for launcher configs: these are the functions `ray up` runs.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_images_are_the_installed_ray_and_python(aws):
    docker = aws["docker"]
    assert (docker["image"], docker["head_image"], docker["worker_image"]) == \
        (f"{RAY_IMAGE}-gpu", f"{RAY_IMAGE}-cpu", f"{RAY_IMAGE}-gpu")
    assert "ray-ml" not in yaml.safe_dump(aws)  # no longer published


def test_aws_head_is_cpu_and_gpu_types_autoscale_from_zero(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert not re.match(r"^(g\d|p\d)", head["node_config"]["InstanceType"])  # a CPU family
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert {"g5.xlarge", "g5.12xlarge", "p4d.24xlarge"} <= instance_types
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
    assert sum(t["max_workers"] for t in workers.values()) >= aws["max_workers"] > 0


def test_aws_nodes_reach_s3_through_instance_profiles(aws):
    for name, t in aws["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.match(r"^arn:aws:iam::\w+:instance-profile/ran-ray-(head|worker)$", arn), name


def test_aws_setup_installs_this_checkout(aws):
    (remote, local), = aws["file_mounts"].items()
    assert (REPO / local / "pyproject.toml").is_file()  # `ray up` runs from the repository root
    assert any(re.search(rf"pip install .*{re.escape(remote)}\b", c) for c in aws["setup_commands"])
    assert any(c.startswith("ran ") for c in aws["setup_commands"])  # the install is checked
    for heavy in (".venv", "/data", "/runs", "mlflow.db"):
        assert heavy in aws["rsync_exclude"]
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head_start and "--head" in head_start


# ---------------------------------------------------------------------------------------------
# Image and KubeRay


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_dockerfile_builds_ran_on_the_installed_ray_image():
    text = dockerfile()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"{RAY_IMAGE}-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert re.search(r"^RUN pip install .*\s\.(\s|$)", text, re.M)
    for copied in ("ran", "jobs", "tune_spaces", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{copied}\b", text, re.M), copied
        assert (REPO / copied).exists(), copied


def kuberay_image() -> str:
    """The tag the Dockerfile's header tells you to build."""
    return re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile()).group(1)


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def check_cluster_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Common rules for a RayCluster spec; returns its GPU worker groups."""
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    for c in containers(head["template"]):
        assert c["image"] == kuberay_image()
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in containers(g["template"]):
            assert c["image"] == kuberay_image()
            res = c["resources"]
            assert res["limits"]["nvidia.com/gpu"] >= 1, g["groupName"]
            assert res["requests"] == res["limits"], g["groupName"]  # Guaranteed QoS
    return groups


def test_raycluster_has_gpu_worker_groups_and_an_s3_service_account():
    docs = {d["kind"]: d for d in load_all("kuberay/raycluster.yaml")}
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    groups = check_cluster_spec(cluster["spec"])
    gpus = sorted(containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] for g in groups)
    assert gpus[0] == 1 and gpus[-1] == 8
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    account = docs["ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    assert all(t["spec"]["serviceAccountName"] == account["metadata"]["name"] for t in templates)


def test_rayjob_runs_ran_train_on_as_many_gpu_workers_as_pods():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir  # where the image holds jobs/ (the repo root)
    cfg = check_ran_job_command(job["spec"]["entrypoint"])
    assert parse_ran(job["spec"]["entrypoint"]).command == "train"
    assert cfg.scaling.use_gpu
    assert cfg.data.path.startswith("s3://") and cfg.storage.path.startswith("s3://")
    groups = check_cluster_spec(job["spec"]["rayClusterSpec"])
    pods = sum(g["replicas"] * containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in groups)
    assert pods == cfg.scaling.num_workers


# ---------------------------------------------------------------------------------------------
# README and local.sh


def readme_commands() -> list[str]:
    """Shell commands in the README's code blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [re.sub(r"\s+#.*$", "", ln).strip() for ln in joined.splitlines()]
    return [ln.rstrip(" &") for ln in lines if ln]


def test_readme_gives_the_exact_commands():
    commands = readme_commands()
    needed = [r"^ray up cluster/aws-gpu\.yaml$", r"^kubectl apply -f cluster/kuberay/raycluster\.yaml$",
              r"^kubectl apply -f cluster/kuberay/rayjob\.yaml$",
              r"^ran submit jobs/imagenet_attention56\.yaml --address http://\S+:8265",
              r"^ray job submit --address http://\S+:8265 --working-dir \. -- ran train jobs/\S+\.yaml"]
    for pattern in needed:
        assert any(re.search(pattern, c) for c in commands), pattern


def test_readme_ran_commands_parse_and_name_real_files():
    commands = readme_commands()
    ran_commands = [c for c in commands if c.startswith("ran ")]
    ran_commands += [c.split(" -- ", 1)[1] for c in commands if c.startswith("ray job submit")]
    assert len(ran_commands) >= 8
    for command in ran_commands:
        args = parse_ran(command)
        if getattr(args, "job", None) and args.command in ("train", "submit"):
            check_ran_job_command(command)
    for path in set(re.findall(r"\bcluster/[\w./-]+\w", " ".join(commands))):
        assert (REPO / path).exists(), path


def _local_sh(action: str, temp: Path, dashboard_port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAN_RAY_TEMP": str(temp), "RAN_DASHBOARD_PORT": str(dashboard_port)}
    return subprocess.run([str(CLUSTER / "local.sh"), action], env=env, capture_output=True,
                          text=True, timeout=60)


def _free_port() -> int:  # nothing listens there: no dashboard answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sleeper(marker: str, *argv: str, child: bool = False) -> tuple[psutil.Process, ...]:
    """A process whose environment holds RAN_LOCAL_HEAD=``marker`` (as every process `ray start`
    spawns for local.sh's head); with ``child``, also a child of it without the marker (as the
    dashboard's module processes, which write their title over their environment)."""
    code = ("import os, subprocess, sys, time\n"
            "env = {k: v for k, v in os.environ.items() if k != 'RAN_LOCAL_HEAD'}\n"
            "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env=env)"
            " for _ in range(int(sys.argv[1]))]\n"
            "print(*[k.pid for k in kids], flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(int(child)), *argv], text=True,
                            env={**os.environ, "RAN_LOCAL_HEAD": marker}, stdout=subprocess.PIPE)
    kids = [int(pid) for pid in proc.stdout.readline().split()]
    return psutil.Process(proc.pid), *(psutil.Process(pid) for pid in kids)


def test_local_sh_is_valid_bash_with_usage():
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(script)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == f"usage: {script} start|stop|status\n"


def test_local_sh_without_a_head_says_so(tmp_path):
    status = _local_sh("status", tmp_path, _free_port())
    assert (status.returncode, status.stdout) == (1, f"not running (temp dir {tmp_path})\n")
    stop = _local_sh("stop", tmp_path, _free_port())
    assert (stop.returncode, stop.stdout) == (0, f"no head running (temp dir {tmp_path})\n")


def test_local_sh_stop_ends_its_head_with_descendants_and_no_other_ray(tmp_path):
    port = _free_port()
    head = _sleeper(str(tmp_path), child=True)
    # Another Ray on this machine, as `ray stop` would find it (its dashboard's command line).
    other = _sleeper(str(tmp_path / "other"), "ray/dashboard/dashboard.py")
    try:
        status = _local_sh("status", tmp_path, port)
        assert status.returncode == 1  # running, but no dashboard answers
        assert status.stdout == (f"running: 2 processes (temp dir {tmp_path})\n"
                                 f"dashboard http://127.0.0.1:{port} does not answer\n")

        stop = _local_sh("stop", tmp_path, port)
        assert (stop.returncode, stop.stdout, stop.stderr) == \
            (0, f"stopped the head (temp dir {tmp_path})\n", "")
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in head)
        assert all(p.is_running() for p in other)
        assert _local_sh("status", tmp_path, port).returncode == 1
    finally:
        for proc in (*head, *other):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


# ---------------------------------------------------------------------------------------------
# Dashboards and credentials


def shipped_yaml() -> dict[str, list[Any]]:
    """Every YAML file under cluster/, parsed: relative path -> its documents."""
    return {str(path.relative_to(CLUSTER)): load_all(str(path.relative_to(CLUSTER)))
            for path in sorted(CLUSTER.rglob("*.y*ml"))}


def dashboards(doc: Any) -> list[tuple[str, bool]]:
    """(dashboard host, token auth on) of each Ray head a document starts: a cluster launcher
    config (``ray start`` defaults to 127.0.0.1) or a KubeRay RayCluster / RayJob (KubeRay
    defaults to 0.0.0.0; ``authOptions`` turns token auth on)."""
    if not isinstance(doc, dict):
        return []
    if "head_start_ray_commands" in doc:
        start = " ".join(doc["head_start_ray_commands"])
        host = re.search(r"--dashboard-host[= ](\S+)", start)
        return [(host.group(1) if host else "127.0.0.1", "RAY_AUTH_MODE=token" in start)]
    spec = {"RayCluster": doc.get("spec"), "RayJob": (doc.get("spec") or {}).get("rayClusterSpec")}
    spec = spec.get(doc.get("kind"))
    if not spec:
        return []
    host = spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
    auth = spec.get("authOptions")
    return [(host, auth is not None and auth.get("mode", "token") == "token")]


def test_shipped_yaml_parses_and_dashboards_stay_on_loopback_unless_token_auth_is_on():
    files = shipped_yaml()
    heads = {name: [h for doc in docs for h in dashboards(doc)] for name, docs in files.items()}
    assert {k: v for k, v in heads.items() if v} == {
        "aws-gpu.yaml": [("127.0.0.1", True)],  # reached through `ray dashboard` (SSH)
        "kuberay/raycluster.yaml": [("127.0.0.1", True)],  # reached through kubectl port-forward
        "kuberay/rayjob.yaml": [("0.0.0.0", True)],  # the submitter pod needs it
    }
    for name, found in heads.items():
        for host, token_auth in found:
            assert token_auth, f"{name}: a Ray head without token auth (dashboard on {host})"


def test_every_aws_node_starts_with_token_auth_and_the_token_from_a_secret_file(aws):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    (command,) = [c for c in aws["setup_commands"] if "auth_token" in c]
    code = re.fullmatch(r'python -c "(.*)"', command).group(1)
    compile(code, "setup_commands", "exec")
    assert "SecretId='ran/ray-token'" in code and "0o600" in code


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kuberay_pods_take_mlflow_credentials_from_a_secret_and_no_secret_is_written_in():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        docs = [d for d in load_all(name) if d["kind"] in ("RayCluster", "RayJob")]
        (doc,) = docs
        for template in pod_templates(doc):
            for c in containers(template):
                env = {e["name"]: e for e in c.get("env", [])}
                for key, field in (("MLFLOW_TRACKING_USERNAME", "username"),
                                   ("MLFLOW_TRACKING_PASSWORD", "password")):
                    assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
                        "name": "ran-mlflow", "key": field, "optional": True}}}, (name, c["name"])
                written = [k for k, e in env.items() if looks_secret(k) and "value" in e]
                assert written == [], (name, c["name"])
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert [k for k in runtime_env.get("env_vars", {}) if looks_secret(k)] == []


def mlflow_credentials_command(aws: dict[str, Any]) -> str:
    """The setup command writing ~/.mlflow/credentials on every node."""
    (command,) = [c for c in aws["setup_commands"] if ".mlflow" in c]
    return command


def test_aws_nodes_get_mlflow_credentials_from_secrets_manager_into_a_file(aws):
    command = mlflow_credentials_command(aws)
    code = re.fullmatch(r'python -c "(.*)" \|\| echo \'[^\']*\'', command).group(1)
    compile(code, "setup_commands", "exec")  # valid Python as bash hands it over
    assert f"region_name='{aws['provider']['region']}'" in code
    assert "SecretId='ran/mlflow'" in code
    commands = [c for key, cs in aws.items() if key.endswith("_commands") for c in cs]
    commands += aws["docker"].get("run_options", [])
    assigned = {n for c in commands for n in re.findall(r"\b([A-Z][A-Z0-9_]*)=", c)}
    assert [n for n in assigned if looks_secret(n)] == []  # no secret set in a node's environment
