"""Ray Jobs: submit ``ran train`` (or ``ran tune``) to a cluster; list, inspect, follow, stop jobs.

``ran submit JOB.yaml --address http://HEAD:8265`` is ``ray job submit --address ... --working-dir .
-- ran train JOB.yaml`` with the chores done: the job is validated here first (a bad key fails in a
second, not after the upload), the project is uploaded without data, runs and the MLflow store, the
MLflow and S3 *settings* travel with the job (never a credential: see PASS_ENV), and local paths are
made absolute when the cluster runs on this machine, so that the job reads the same shards and
writes the same MLflow store as ``ran train`` would here.

Credentials stay where they belong. A job's runtime env is stored with the job, readable by anyone
who can list the cluster's jobs, so no secret goes into it unless the user names it (``--env``, with
a warning); the cluster's nodes hold their own (cluster/README.md). The Ray token goes only where
:func:`token_for` says, and a dashboard runs any code it is sent.

Jobs are addressed by their submission id (``ran-<job>-<time>-<hex>``); the Ray dashboard and
``ray job ...`` show the same ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import getpass
import ipaddress
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.parse import urlparse

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from ran import tracking
from ran.config import JobConfig, load_config, parse_set
from ran.table import format_table
from ran.train import console
from ran.train.localray import auth_token, ray_address
from ran.tune.space import from_command_line, load_space

# Environment passed to the job: where runs and artifacts go and which S3 endpoint and region to
# use, never a credential. The runtime env is stored with the job and shown to anyone who can list
# the cluster's jobs; the nodes get keys and passwords the way clusters do (instance profiles,
# IRSA, Kubernetes secrets, ~/.mlflow/credentials: cluster/README.md). AWS_ACCESS_KEY_ID and
# AWS_PROFILE stay behind too: without their secret (or this machine's ~/.aws) they would only
# hide the node's own role from boto3.
PASS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_INSECURE_TLS",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

# Names that look like credentials: `--env NAME` still passes them, with a warning.
SECRET_NAMES = ("*SECRET*", "*TOKEN*", "*PASSWORD*", "*KEY*")

# Not uploaded with the working directory (gitignore syntax, relative to it; a leading / anchors
# at the top, so /data/ skips the shards but not the ran/data/ package).
EXCLUDES = ["/.venv/", "/.git/", "/data/", "/runs/", "/mlruns/", "/mlartifacts/", "/mlflow.db",
            "/ray_results/", "/out/", "__pycache__/", "*.egg-info/", ".pytest_cache/"]

# Job keys holding paths that the job resolves against its own working directory (a fresh copy on
# the cluster): made absolute when the cluster is this machine.
PATH_KEYS = ("data.path", "storage.path")

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ---------------------------------------------------------------------------------------------
# Building a submission


@dataclass
class Submission:
    """What ``ran submit`` sends: the entrypoint, its runtime env and metadata."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    config: JobConfig
    local: bool  # the cluster runs on this machine
    notes: list[str] = field(default_factory=list)  # what was resolved or should be checked
    warnings: list[str] = field(default_factory=list)  # what the user should reconsider


def normalize_address(address: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; Ray Jobs talk to the dashboard over HTTP(S)."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        return f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address}: Ray Jobs need the dashboard's http(s):// address, "
                         f"e.g. http://HEAD:8265 (not the ray:// or GCS address)")
    return address


def entrypoint(job: str, overrides: list[str], tune: str | None = None) -> str:
    """``ran train JOB --set k=v ...`` (or ``ran tune SPACE --job JOB ...``), shell-quoted."""
    argv = ["ran", "tune", tune, "--job", job] if tune else ["ran", "train", job]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def relative_to_working_dir(path: str | Path, working_dir: Path, what: str) -> str:
    """``path`` as the job sees it: relative to the uploaded working directory."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return resolved.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{what} {path} is outside the working directory {working_dir}: the "
                         f"cluster only sees files under it; move it there or pass "
                         f"--working-dir") from None


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name looks like a credential (SECRET_NAMES)."""
    return any(fnmatch.fnmatchcase(name.upper(), pattern) for pattern in SECRET_NAMES)


def job_env(local: bool, notes: list[str], extra: list[str] | None = None,
            warnings: list[str] | None = None) -> dict[str, str]:
    """The environment passed to the job: PASS_ENV, and ``--env`` items (a warning in
    ``warnings`` for each name that looks like a secret)."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV}
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"--env {key}: not set here; pass --env {key}=VALUE")
            value = os.environ[key]
        env[key] = value
        if looks_secret(key) and warnings is not None:
            warnings.append(f"--env {key} looks like a secret: its value is stored with the job, "
                            f"readable by anyone who can list the cluster's jobs; give the nodes "
                            f"their own credentials instead (cluster/README.md)")
    uri = tracking.tracking_uri()  # MLFLOW_TRACKING_URI or the embedded sqlite store, made absolute
    if urlparse(uri).password:
        raise ValueError("MLFLOW_TRACKING_URI holds a password, which would be stored with the job: "
                         "drop it from the URI and give the cluster's nodes MLFLOW_TRACKING_USERNAME "
                         "and MLFLOW_TRACKING_PASSWORD (cluster/README.md)")
    file_store = uri.startswith(("sqlite:", "file:", "/"))
    if local:
        if uri != env.get("MLFLOW_TRACKING_URI"):
            notes.append(f"MLflow: the job writes to {tracking.shown(uri)}")
        env["MLFLOW_TRACKING_URI"] = uri
    elif file_store:
        notes.append(f"MLflow: {tracking.shown(uri)} is a file on this machine, out of the cluster's reach: the "
                     f"job records its run on the cluster's disk. Set MLFLOW_TRACKING_URI="
                     f"http://MLFLOW_HOST:5000 (an MLflow server both can reach) to keep it.")
    return env


def resolve_paths(cfg: JobConfig, local: bool, notes: list[str]) -> list[str]:
    """``--set`` items making PATH_KEYS absolute (local cluster), or notes about them (remote)."""
    flat = cfg.flat()
    extra = []
    for key in PATH_KEYS:
        value = str(flat[key])
        if "://" in value:
            continue
        if local and not Path(value).is_absolute():
            extra.append(f"{key}={Path(value).resolve()}")
            notes.append(f"{key}: {value} -> {Path(value).resolve()}")
        elif not local and not Path(value).is_absolute():
            notes.append(f"{key}={value} is relative: on the cluster it points into the job's "
                         f"temporary copy of the working directory; use s3://... or an absolute "
                         f"path that every node mounts")
        elif not local:
            notes.append(f"{key}={value} must exist on every node of the cluster (a shared "
                         f"filesystem), or use s3://...")
    return extra


def submission_id(cfg: JobConfig) -> str:
    """``ran-<job name>-<UTC time>-<4 hex>``: readable, sortable and unique."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)[:40]
    return f"ran-{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def validate(job: str, overrides: list[str], tune: str | None = None) -> JobConfig:
    """The job config (and the Tune space over it) through the stage of the Launcher's pre-flight
    that needs no data (:func:`ran.train.launch.check_job`, :func:`ran.tune.search.check_search`):
    the data and the run directory are the cluster's, checked there when the job starts. With
    ``tune``, ``--set search.*`` keys size the search (:func:`ran.tune.space.from_command_line`).

    Raises:
        ConfigError: one line naming the key.
    """
    if not tune:
        from ran.train.launch import check_job  # Ray Train and MLflow: after the arguments parse

        cfg = load_config(job, overrides)
        check_job(cfg)
        return cfg
    from ran.tune.search import check_search  # Ray Tune: only for a search

    space, job_pairs = from_command_line(load_space(tune), parse_set(overrides))
    cfg = load_config(job, job_pairs)
    check_search(space, cfg.model_dump())
    return cfg


def build_submission(job: str, overrides: list[str], *, local: bool, tune: str | None = None,
                     working_dir: str | Path = ".", env: list[str] | None = None) -> Submission:
    """Describe the Ray Job running ``job``; ``local``: the cluster runs on this machine."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a directory")
    cfg = validate(job, overrides, tune)
    notes: list[str] = []
    warnings: list[str] = []
    overrides = list(overrides) + resolve_paths(cfg, local, notes)
    job_rel = relative_to_working_dir(job, wd, "job config")
    space_rel = relative_to_working_dir(tune, wd, "search space") if tune else None
    runtime_env: dict[str, Any] = {
        "working_dir": str(wd),
        "excludes": EXCLUDES,
        "env_vars": job_env(local, notes, env, warnings),
    }
    if not (wd / "ran" / "__init__.py").is_file():  # ship the package we run, unless the upload holds one
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
    # tracking tags the MLflow run with it (ray.submission_id): from a run to its Ray Job and back
    runtime_env["env_vars"]["RAY_JOB_SUBMISSION_ID"] = sid = submission_id(cfg)
    metadata = {"ran.job": job_rel, "ran.name": cfg.name, "ran.kind": "tune" if tune else "train",
                "ran.user": getpass.getuser()}
    return Submission(entrypoint(job_rel, overrides, space_rel), runtime_env, metadata, sid, cfg,
                      local, notes, warnings)


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1): this machine, or a tunnel from it."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: not resolved here, so never taken for this machine
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def token_named() -> bool:
    """Whether the user gave the Ray token for the address in use: ``RAY_AUTH_TOKEN``, or
    ``RAY_AUTH_MODE=token`` (which makes Ray's own clients send the token file too)."""
    return bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or \
        os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def token_for(address: str, *, insecure: bool = False) -> str | None:
    """The Ray token to send to the dashboard at ``address``, or None: the one place that decides.

    A dashboard runs any code it is sent, so its token goes only where it belongs:
    - to a loopback address (this machine's head, or a tunnel to a remote one: ``ray dashboard``,
      ``kubectl port-forward``), whichever token Ray would find (:func:`auth_token`);
    - to any other address only when the user named the token (:func:`token_named`): a token
      that merely sits in ``~/.ray/auth_token`` is this machine's, as Ray itself keeps it;
    - and then over ``https://``, or plain ``http://`` only with ``insecure`` (``--insecure``).

    Raises:
        ValueError: a named token would cross the network in clear text without ``insecure``.
    """
    token = auth_token()
    if token is None:
        return None
    url = normalize_address(address)
    parts = urlparse(url)
    if is_loopback(parts.hostname or ""):
        return token
    if not token_named():
        return None
    if parts.scheme == "http" and not insecure:
        raise ValueError(f"--address {url}: plain http:// would send the Ray token in clear text "
                         f"to another host; use https://, or a tunnel to 127.0.0.1 (`ray dashboard "
                         f"CLUSTER.yaml`, `kubectl port-forward`), or pass --insecure on a network "
                         f"you trust")
    return token


def auth_headers(address: str, *, insecure: bool = False) -> dict[str, str]:
    """The bearer header for the dashboard at ``address`` (empty when :func:`token_for` sends
    no token)."""
    token = token_for(address, insecure=insecure)
    return {"Authorization": f"Bearer {token}"} if token else {}


def how_to_give_token(address: str, refused: bool) -> str:
    """What to do when the dashboard at ``address`` wanted a token (``refused``: it got a wrong
    one)."""
    what = "refused the Ray token sent" if refused else "needs the cluster's Ray token"
    hint = (f"Ray dashboard at {address} {what}: set RAY_AUTH_TOKEN to the cluster's token "
            f"(`ray get-auth-token` on the head prints it)")
    if not refused and auth_token() and token_for(address, insecure=True) is None:
        hint += "; the token in ~/.ray/auth_token goes only to 127.0.0.1 unless RAY_AUTH_MODE=token"
    return hint


def connect(address: str | None, insecure: bool = False) -> JobSubmissionClient:
    """A JobSubmissionClient for ``address`` (else RAY_API_SERVER_ADDRESS or an http RAY_ADDRESS),
    with the Ray token where :func:`token_for` sends it.

    Call it from a process that has not joined a Ray cluster itself (``ran submit`` and ``ran
    jobs`` never do): after ``ray.init`` to a token-auth Ray, Ray's client adds that process's
    token to every request whatever the address.

    Raises:
        ValueError: no address, or a named token over plain http:// without ``insecure``.
        ConnectionError: the dashboard wanted a token (the message says how to give it)."""
    address = ray_address(address, dashboard=True)
    if not address:
        raise ValueError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    url = normalize_address(address)
    headers = auth_headers(url, insecure=insecure)
    try:
        return JobSubmissionClient(url, headers=headers)
    except ConnectionError:
        raise ConnectionError(f"cannot reach the Ray dashboard at {url}: is the cluster up and "
                              f"the dashboard port (default 8265) reachable? "
                              f"(`cluster/local.sh status` for a local head)") from None
    except AuthenticationError as err:
        refused = "Authentication failed" in str(err)  # 403: a token was sent, not this one
        raise ConnectionError(how_to_give_token(url, refused)) from None
    except Exception as err:  # one line, with what to do
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(f"Ray dashboard at {url}: {first}") from None


def this_machine_ips() -> set[str]:
    """Loopback, the hostname's addresses and the address of the default route (what Ray picks)."""
    ips = {"127.0.0.1", "::1"}
    try:
        ips.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP: nothing is sent
            ips.add(probe.getsockname()[0])
        except OSError:
            pass
    return ips


def cluster_is_local(address: str, insecure: bool = False) -> bool:
    """Whether every node of the cluster runs on this machine (asked through the State API).

    The dashboard address alone cannot tell: ``http://127.0.0.1:8265`` is just as often a port
    forward (``ray dashboard``, ``kubectl port-forward``) to a remote cluster.
    """
    url = f"{normalize_address(address)}/api/v0/nodes?limit=1000"
    try:
        response = requests.get(url, headers=auth_headers(address, insecure=insecure), timeout=30)
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return False  # unknown: treat as remote, which changes no path
    ips = {n.get("node_ip") for n in nodes if n.get("state") == "ALIVE"}
    return bool(ips) and ips <= this_machine_ips()


def _job_info(client: "JobSubmissionClient", job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise ValueError(f"no job {job_id} on this cluster; `ran jobs list` shows them") from None
        raise


def wait_until_done(client: "JobSubmissionClient", job_id: str,
                    timeout: float | None = 60.0) -> Any:
    """Poll until the job is terminal or ``timeout`` seconds pass (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    info = _job_info(client, job_id)
    while str(info.status) not in TERMINAL and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.5)
        info = _job_info(client, job_id)
    return info


def follow(client: "JobSubmissionClient", job_id: str, out: TextIO | None = None) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED, else 1."""
    out = out or sys.stdout

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    _job_info(client, job_id)  # a clear error for an unknown id, before the stream opens
    try:
        asyncio.run(stream())
        info = _job_info(client, job_id)
        if str(info.status) not in TERMINAL:  # the stream closed, the job did not end
            print(f"(log stream closed; waiting for {job_id} to end)", file=sys.stderr, flush=True)
            info = wait_until_done(client, job_id, timeout=None)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. `ran jobs stop {job_id}` stops it.",
              file=sys.stderr)
        raise
    return report_end(info, out)


def report_end(info: Any, out: TextIO | None = None) -> int:
    """Print how the job ended (with the reason when it failed); 0 for SUCCEEDED, else 1."""
    out = out or sys.stdout
    status = str(info.status)
    line = f"job {info.submission_id} {status}"
    if status != "SUCCEEDED" and info.message:
        line += f": {_first_line(info.message)}"
    print(line, file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1


# ---------------------------------------------------------------------------------------------
# Commands


# Ray's loggers that talk while the working directory is packaged and uploaded: "Directory '.git'
# is now ignored by default when packaging" (ran's own excludes say what is left out), "Pushing
# file package ...". Shown with -v only.
UPLOAD_LOGGERS = ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging",
                  "ray.dashboard.modules.dashboard_sdk")


@contextlib.contextmanager
def _quiet_upload() -> Iterator[None]:
    """Ray's upload loggers at ERROR for the block, unless ``ran -v``."""
    if console.verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in UPLOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def submit(client: "JobSubmissionClient", sub: Submission) -> str:
    """Submit to the cluster; returns the submission id. Ray's packaging lines only with -v."""
    with _quiet_upload():
        return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                 metadata=sub.metadata, submission_id=sub.submission_id)


def cli_submit(args: argparse.Namespace) -> int:
    """``ran submit JOB [--set k=v]... --address URL [--tune SPACE] [--wait]``."""
    validate(args.job, args.overrides, args.tune)  # fail fast, before talking to the cluster
    args.address = ray_address(args.address, dashboard=True)  # the fallback `ran jobs` has too
    insecure = getattr(args, "insecure", False)
    client = connect(args.address, insecure)
    sub = build_submission(args.job, args.overrides,
                           local=cluster_is_local(args.address, insecure), tune=args.tune,
                           working_dir=getattr(args, "working_dir", None) or ".",
                           env=getattr(args, "env", None))
    for warning in sub.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in sub.notes:
        print(f"note: {note}")
    job_id = submit(client, sub)
    url = normalize_address(args.address)
    print(f"submitted {job_id}: {sub.entrypoint}")
    print(f"  follow:  ran jobs logs {job_id} --follow --address {url}")
    print(f"  status:  ran jobs status {job_id} --address {url}")
    print(f"  stop:    ran jobs stop {job_id} --address {url}")
    print(f"  dashboard: {url}/#/jobs/{job_id}", flush=True)
    if not args.wait:
        return 0
    return follow(client, job_id)


def cli_jobs(args: argparse.Namespace) -> int:
    """``ran jobs list | status ID | logs ID [--follow] | stop ID``."""
    if args.action != "list" and not args.job_id:
        raise ValueError(f"ran jobs {args.action} needs a job id; `ran jobs list` shows them")
    client = connect(args.address, getattr(args, "insecure", False))
    if args.action == "list":
        print_jobs(client.list_jobs())
        return 0
    if args.action == "status":
        print_status(_job_info(client, args.job_id))
        return 0
    if args.action == "logs":
        if args.follow:
            return follow(client, args.job_id)
        _job_info(client, args.job_id)
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    return stop(client, args.job_id)


def stop(client: "JobSubmissionClient", job_id: str, timeout: float = 60.0) -> int:
    """Ask the job to stop and wait for it to end; 0 once it is no longer running."""
    info = _job_info(client, job_id)
    if str(info.status) in TERMINAL:
        print(f"job {job_id} already ended: {info.status}")
        return 0
    client.stop_job(job_id)
    info = wait_until_done(client, job_id, timeout)
    if str(info.status) not in TERMINAL:
        print(f"job {job_id} still {info.status} after {timeout:.0f}s; Ray kills it soon",
              file=sys.stderr)
        return 1
    print(f"job {job_id} {info.status}")
    return 0


def _first_line(message: str) -> str:
    """Ray's job message without the log tail it appends after the first line."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line.split(", last available logs")[0]


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _took(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_jobs(jobs: list[Any], out: TextIO | None = None) -> None:
    """One line per submitted job, oldest first."""
    out = out or sys.stdout
    jobs = sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)
    rows = [(j.submission_id, str(j.status), _when(j.start_time), _took(j), j.entrypoint)
            for j in jobs]
    header = ("SUBMISSION ID", "STATUS", "STARTED", "TOOK", "ENTRYPOINT")
    print(format_table(header, rows, free_last=True), file=out)
    if not rows:
        print("(no submitted jobs)", file=out)


def print_status(info: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    fields = [("submission id", info.submission_id), ("ray job id", info.job_id or "-"),
              ("status", str(info.status)),
              ("entrypoint", info.entrypoint), ("started", _when(info.start_time)),
              ("ended", _when(info.end_time)), ("took", _took(info))]
    if info.driver_exit_code is not None:
        fields.append(("exit code", str(info.driver_exit_code)))
    for key, value in sorted((info.metadata or {}).items()):
        fields.append((key, value))
    if info.message:
        fields.append(("message", _first_line(info.message)))
    print(format_table(None, fields, free_last=True), file=out)
