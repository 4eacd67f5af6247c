"""Where runs go: the tracking URI, the one MLflow client helper, experiments, run context tags,
and the pre-flight check of a tracking server (:func:`check_server`).

``mlflow`` is imported inside functions, not at the top: importing it costs every Ray Train
worker process a second of CPU before its first step (see :data:`MLFLOW_IMPORT_NOTE`), and only
the driver and rank 0 talk to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from ran.tracking.names import TAG_RAY_JOB, TAG_RAY_SUBMISSION

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Measured on the 2-core CI machine (python -X importtime, torch already imported):
MLFLOW_IMPORT_NOTE = "import mlflow + MlflowClient after torch: 0.96 s per process (-X importtime)"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded ``sqlite:///mlflow.db``, made absolute.

    Ray Train workers run in their own working directory, so relative sqlite and file URIs are
    resolved against the caller's working directory before they are handed to workers.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def shown(uri: str) -> str:
    """``uri`` as ran prints it: a password in its user part replaced by ``***``
    (``https://alice:***@mlflow.internal``), so that no console, log file or error message
    carries it. Every message naming a tracking URI goes through this."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def refuse_password(uri: str, verb: str) -> None:
    """Refuse an MLflow server URI that carries a password (``https://alice:PW@host``): MLflow
    prints it in its own "View run at" lines and it reaches every process of the job; the login
    belongs in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``. A database URI (the
    store itself, as ``mlflow server`` is given it) keeps its own credentials.

    Raises:
        ValueError: one line naming ``verb`` and what to set instead (the password never shown).
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.password:
        raise ValueError(f"{verb}: MLFLOW_TRACKING_URI {shown(uri)} holds a password, which MLflow "
                         "would print with every run's link: drop it from the URI and set "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores besides sqlite


def is_database(uri: str) -> bool:
    """Whether ``uri`` is a database MLflow opens through SQLAlchemy (``postgresql://``,
    ``mysql+pymysql://``, ...), other than sqlite."""
    return uri.split("://", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES and "://" in uri


def _check_database(uri: str, timeout: float) -> None:
    """One connection to the database store at ``uri``.

    Raises:
        ConnectionError: it does not answer or refuses us (one line: the store, the driver's
            reason, what to do; the password shown as ``***``).
    """
    import sqlalchemy

    try:
        dialect = uri.split("://", 1)[0].split("+", 1)[0]
        # psycopg and the MySQL drivers take connect_timeout; other drivers keep their own default
        timeouts = {"connect_timeout": max(1, int(timeout))} if dialect in ("postgresql", "mysql") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=timeouts, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except Exception as err:  # the driver's own errors (OperationalError, ImportError of it, ...)
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()
        password = urllib.parse.urlsplit(uri).password
        if password:  # a driver may quote the URL it could not use
            reason = [line.replace(password, "***") for line in reason]
        why = reason[0] if reason else type(err).__name__
        raise ConnectionError(
            f"MLflow store {shown(uri)} does not answer ({why}): start the database, or set "
            "MLFLOW_TRACKING_URI to a store or server that is up") from None


def is_server(uri: str) -> bool:
    """Whether ``uri`` is an MLflow tracking server (``http(s)://``), not a store ``ran`` opens."""
    return uri.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# Pre-flight: the server answers, takes our credentials, and lets us write where we will write

CREDENTIALS_HINT = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"  # or ~/.mlflow/credentials


def check_server(uri: str | None = None, *, experiment: str | None = None,
                 registered_model: str | None = None, timeout: float = 30.0) -> str | None:
    """Check an MLflow server before any work starts; returns the user it knows us as (None for a
    server without basic-auth, or a URI that is not a server, which is not checked).

    A database store (``postgresql://``, ``mysql://``, ``mssql://``; not sqlite) is checked
    for answering: one connection with a ``timeout`` of at most 10 s (MLflow itself retries for
    minutes and then raises a traceback).

    In order: the server answers ``/health``; it accepts the credentials of the environment
    (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or a token); the user may create
    runs in ``experiment`` and versions of ``registered_model`` where those exist (EDIT or more;
    what does not exist yet, the user creates and so owns). One request each, no retries.

    Raises:
        ConnectionError: the server does not answer (one line: the server, what to do).
        PermissionError: credentials missing or refused, or too little permission (one line).
    """
    uri = uri or tracking_uri()
    if is_database(uri):
        if (uri,) not in _CHECKED:
            _check_database(uri, min(timeout, 10.0))
            _CHECKED[(uri,)] = None
        return None
    if not is_server(uri):
        return None
    key = (uri, experiment, registered_model, os.environ.get("MLFLOW_TRACKING_USERNAME"),
           os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("MLFLOW_TRACKING_TOKEN"))
    if key not in _CHECKED:  # once per process: a verb may look up several models
        _CHECKED[key] = _check_server(uri, experiment, registered_model, timeout)
    return _CHECKED[key]


_CHECKED: dict[tuple[str | None, ...], str | None] = {}


def _check_server(uri: str, experiment: str | None, registered_model: str | None,
                  timeout: float) -> str | None:
    base = uri.rstrip("/")
    _get(base, "/health", timeout)
    status, body = _get(base, "/api/2.0/mlflow/users/current", timeout)
    if status == 404:  # no basic-auth app: anyone may do anything
        return None
    _refuse_credentials(base, status)
    user = body["user"]
    if user.get("is_admin"):
        return user["username"]
    if experiment:
        status, found = _get(base, "/api/2.0/mlflow/experiments/get-by-name", timeout,
                             params={"experiment_name": experiment})
        if status == 200:
            _check_permission(base, user["username"], "experiment",
                              found["experiment"]["experiment_id"], f"experiment {experiment!r}",
                              "set tracking.experiment to one of yours", timeout)
        elif status == 403:
            raise PermissionError(f"MLflow server {shown(base)}"
                                  f": user {user['username']!r} may not read "
                                  f"experiment {experiment!r}; ask its owner or an admin for EDIT, "
                                  "or set tracking.experiment to one of yours")
    if registered_model:
        status, _ = _get(base, "/api/2.0/mlflow/registered-models/get", timeout,
                         params={"name": registered_model})
        if status in (200, 403):
            _check_permission(base, user["username"], "registered_model", registered_model,
                              f"registered model {registered_model!r}",
                              "set tracking.registered_model to one of yours", timeout)
    return user["username"]


def answers(uri: str | None = None, timeout: float = 10.0) -> bool:
    """Whether the tracking server answers ``/health`` now (always True for a store that is not
    a server); one try, for deciding whether to write a run's end or report that it cannot."""
    uri = uri or tracking_uri()
    if not is_server(uri):
        return True
    try:
        _get(uri.rstrip("/"), "/health", timeout)
    except ConnectionError:
        return False
    return True


def _get(base: str, path: str, timeout: float,
         params: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``base + path`` once, with the environment's credentials: (status, JSON body or None).

    Raises:
        ConnectionError: nothing answered.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(base), path, "GET", max_retries=0,
                                timeout=timeout, params=params, raise_on_status=False)
    except Exception as err:  # noqa: BLE001 - MLflow wraps every transport error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        cause = err.__cause__ or err.__context__
        while cause is not None and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            reason = type(cause).__name__
        raise ConnectionError(f"MLflow server {shown(base)} does not answer ({reason}): start it "
                              "(cluster/tracking/README.md) or point MLFLOW_TRACKING_URI at a "
                              "running one") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if path == "/health" and response.status_code != 200:
        raise ConnectionError(f"MLflow server {shown(base)}"
                              f": /health answered {response.status_code}; "
                              "is that an MLflow server? check MLFLOW_TRACKING_URI")
    return response.status_code, body


def _refuse_credentials(base: str, status: int) -> None:
    from mlflow.utils.credentials import get_default_host_creds

    if status == 200:
        return
    user = get_default_host_creds(base).username  # environment or ~/.mlflow/credentials
    if status == 401 and not user:
        raise PermissionError(f"MLflow server {shown(base)} needs a login: set {CREDENTIALS_HINT}")
    if status == 401:
        raise PermissionError(f"MLflow server {shown(base)}"
                              f" refused user {user!r} (401 Unauthorized): "
                              f"check {CREDENTIALS_HINT}")
    raise PermissionError(f"MLflow server {shown(base)} answered {status} to who-am-I: check "
                          f"{CREDENTIALS_HINT} and MLFLOW_TRACKING_URI")


def _check_permission(base: str, user: str, resource_type: str, resource_id: str, what: str,
                      instead: str, timeout: float) -> None:
    """PermissionError unless ``user`` may update ``resource_id`` (EDIT or MANAGE)."""
    status, found = _get(base, "/api/3.0/mlflow/users/permissions/get", timeout, params={
        "username": user, "resource_type": resource_type, "resource_id": resource_id})
    if status != 200 or found is None:
        return  # a server without per-user permissions: the writes themselves will tell
    if found.get("permission") not in ("EDIT", "MANAGE"):
        raise PermissionError(f"MLflow server {shown(base)}"
                              f": user {user!r} has {found.get('permission')} "
                              f"on {what}, and writing there needs EDIT: ask its owner or an admin "
                              f"for EDIT, or {instead}")


def client(uri: str | None = None) -> Any:
    """The ``MlflowClient`` of ``uri`` (default :func:`tracking_uri`): the one way ``ran`` reaches
    MLflow."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def use_uri(uri: str | None = None) -> None:
    """Point MLflow's fluent API (``mlflow.log_model``, artifact downloads) at ``uri``."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri or tracking_uri())


def default_artifact_location(experiment: str, uri: str | None = None) -> str | None:
    """Artifacts of a sqlite store live beside it in ``mlartifacts/<experiment>``; None lets a
    server (or any other store) decide."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS / experiment)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created (artifacts in ``./mlartifacts``) or restored if
    deleted."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(name, uri))


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the source tree of ``ran`` (or ``path``), None outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def ray_job_tags(job_id: str | None = None) -> dict[str, str]:
    """Tags linking a run to its Ray job (``job_id``, given by the caller that has Ray up) and to
    its Ray Jobs submission (``RAY_JOB_SUBMISSION_ID``, set by Ray in a submitted job)."""
    tags = {}
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        tags[TAG_RAY_SUBMISSION] = os.environ["RAY_JOB_SUBMISSION_ID"]
    if job_id:
        tags[TAG_RAY_JOB] = job_id
    return tags


def existing_store(uri: str | None = None) -> str:
    """The tracking URI of a store that already exists, for verbs that only read (``ran eval``,
    ``ran registry``, ``ran explain``, ``ran promote``): MLflow would create an empty sqlite store
    on first use, and then every model would look missing.

    A tracking server is checked as :func:`check_server` does (it answers, it takes our
    credentials) before the verb does anything.

    Raises:
        FileNotFoundError: a sqlite store whose file does not exist (the message says where it
            looked and how to point at the right store).
        ConnectionError, PermissionError: see :func:`check_server`.
    """
    uri = uri or tracking_uri()
    check_server(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            where = ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                     else "MLFLOW_TRACKING_URI is unset, so the embedded store of this directory")
            raise FileNotFoundError(f"no MLflow store at {shown(uri)}"
                                    f" ({where}); run where `ran train` "
                                    "ran, or set MLFLOW_TRACKING_URI to its store or server")
    return uri
