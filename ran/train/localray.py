"""Reaching Ray for one job: an address (``--address`` / ``RAY_ADDRESS``), or a local Ray started
here and stopped when the job ends.

A *lean* local Ray is the Ray of one ``ran train`` on one machine: it starts without the dashboard
(a dozen Python processes competing for the CPUs the job is about to need), without idle workers
started ahead, and tells Ray Train so: no preemption watcher and no placement-group cleaner
(:mod:`ran.train.launch`), whose work ends with this Ray anyway. ``ran tune`` starts a full one:
Tune stops trials, and only the placement-group cleaner frees what a stopped trial's workers held.

How much of Ray's own output reaches the terminal follows :mod:`ran.train.console`: unless verbose,
the ``ray`` logger of this process is at WARNING and a local Ray starts without its notice that
token authentication is on (Ray's default for a local Ray).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import psutil
import ray
import torch

from ran.config import ConfigError, JobConfig
from ran.train import console

# Environment a lean local Ray gives its own processes (they inherit it while it runs).
LEAN_ENV = {
    # Tells the launcher that no dashboard serves the State API (so: no placement-group cleaner).
    "RAN_RAY_NO_DASHBOARD": "1",
    # One machine that we start and stop ourselves: nothing to be preempted.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def auth_token() -> str | None:
    """The Ray auth token where Ray looks for one (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``); None if there is none or ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        try:
            token = token_path().read_text().strip()
        except OSError:
            return None
    return token or None


def token_path() -> Path:
    """The token file Ray reads: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def make_token_private() -> bool:
    """Make the Ray token file readable by its owner only (0600) when it is ours and wider: Ray
    2.60 writes ``~/.ray/auth_token`` with the default umask (0644), where every local user could
    read the token that runs code on the cluster. Returns whether it changed the mode."""
    path = token_path()
    try:
        st = path.stat()
        if not path.is_file() or st.st_uid != os.getuid() or not st.st_mode & 0o077:
            return False
        path.chmod(0o600)
        return True
    except OSError:
        return False


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError unless something listens at a ``host:port`` Ray address (``auto`` and
    ``ray://`` client addresses are left to Ray). Ray itself retries an unanswered address for
    minutes before it gives up."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ConnectionError(f"cannot connect to Ray at {address}: nothing answers there ({err}); "
                              "is the cluster up? (`cluster/local.sh status` for a head on this "
                              "machine)") from None


def auth_hint() -> str:
    """What to try when a connection failed, maybe for want of the auth token.

    ``ray start`` turns token auth on when a token exists (Ray 2.60 writes ``~/.ray/auth_token``
    the first time a local Ray starts), but Ray sends the token to an explicit address only with
    ``RAY_AUTH_MODE=token``: it will not hand a local token to any address it is given.
    """
    if os.environ.get("RAY_AUTH_MODE") is None and auth_token():
        return ("; if the cluster uses token auth (`ray start` turns it on when ~/.ray/auth_token "
                "exists), set RAY_AUTH_MODE=token to send the token")
    return ""


def local_resources() -> dict[str, int]:
    """The CPUs (this process's affinity) and GPUs a local Ray started here gets.

    Ray 2.60 has no public function for the CPU count it would detect; the local Ray is started
    with exactly these numbers, so the pre-flight check and Ray agree.
    """
    cpus = len(psutil.Process().cpu_affinity() or []) or psutil.cpu_count() or 1
    return {"CPU": cpus, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def node_resources() -> list[dict[str, float]]:
    """Each live node's resources in the connected Ray cluster (``ray.nodes()``)."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def resolve_gpu(cfg: JobConfig, nodes: list[dict[str, float]] | None = None) -> JobConfig:
    """``scaling.use_gpu: auto`` decided for this cluster: true when any node has a GPU.

    ``nodes``: each node's resources; default: the live Ray cluster's (:func:`node_resources`).

    Raises:
        ConfigError: auto became false under an option that needs GPUs.
    """
    if cfg.scaling.use_gpu != "auto":
        return cfg
    if nodes is None:
        nodes = node_resources()
    return cfg.with_gpu(any(res.get("GPU", 0) > 0 for res in nodes))


def worker_bundle(cfg: JobConfig) -> dict[str, float]:
    """What one Ray Train worker of ``cfg`` holds on its node: ``scaling.cpus_per_worker`` CPUs
    and, with ``scaling.use_gpu``, one GPU."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {})}


def place(free: list[dict[str, float]], bundles: list[dict[str, float]]) -> bool:
    """Place every bundle (CPUs, GPUs) whole on one node each, as Ray places actors: each on the
    node it leaves the least CPU room on (best fit). On success the bundles' resources are taken
    from ``free`` (one dict per node, changed in place); when one does not fit, ``free`` is left
    unchanged and False is returned."""
    trial = [dict(node) for node in free]
    for bundle in bundles:
        fits = [i for i, node in enumerate(trial)
                if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())]
        if not fits:
            return False
        best = min(fits, key=lambda i: trial[i].get("CPU", 0.0))
        for k, v in bundle.items():
            trial[best][k] = trial[best].get(k, 0.0) - v
    free[:] = trial
    return True


def workers_that_fit(cfg: JobConfig, nodes: list[dict[str, float]]) -> int:
    """How many workers of ``cfg`` the ``nodes`` can hold at once, node by node (at most
    ``scaling.max_workers``)."""
    free = [dict(node) for node in nodes]
    placed = 0
    while placed < cfg.scaling.max_workers and place(free, [worker_bundle(cfg)]):
        placed += 1
    return placed


def check_resources(cfg: JobConfig, nodes: list[dict[str, float]] | None = None) -> None:
    """The cluster can place every worker (CPUs per worker, one GPU each when asked), node by node
    (:func:`place`); for an elastic group, its minimum.

    ``nodes``: each node's resources; default: the live Ray cluster's (:func:`node_resources`).

    Raises:
        ConfigError: not enough room, with what the cluster has.
    """
    s = cfg.scaling
    if nodes is None:
        nodes = node_resources()
    placeable = workers_that_fit(cfg, nodes)
    if placeable < s.min_workers:
        cpus = sum(r.get("CPU", 0) for r in nodes)
        gpus = sum(r.get("GPU", 0) for r in nodes)
        need = f"{s.min_workers} workers x {s.cpus_per_worker:g} CPU" + (" + 1 GPU" if s.use_gpu else "")
        if s.elastic:
            need = f"the minimum of {need} (scaling.num_workers={s.num_workers})"
        raise ConfigError(
            f"the Ray cluster cannot place {need}: it has {cpus:g} CPUs and {gpus:g} GPUs on "
            f"{len(nodes)} node(s), room for {placeable} worker(s); lower scaling.num_workers or "
            "scaling.cpus_per_worker, or add nodes"
        )


def ray_address(given: str | None, *, dashboard: bool = False) -> str | None:
    """The Ray address a verb uses: ``given`` (``--address``), else ``RAY_ADDRESS``; for the
    dashboard (``ran submit``, ``ran jobs``: ``dashboard``), ``RAY_API_SERVER_ADDRESS`` before
    ``RAY_ADDRESS``. None when neither is set (``ran train`` then starts a local Ray)."""
    env = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if dashboard else ("RAY_ADDRESS",)
    return given or next((os.environ[k] for k in env if os.environ.get(k)), None)


def starts_local_ray(address: str | None) -> bool:
    """Whether :func:`connect` would start a local Ray: no Ray yet, no address given."""
    return not ray.is_initialized() and not ray_address(address)


class LocalRay:
    """A Ray instance started in this process (``start``) and shut down (``stop``), or used as a
    context manager. The environment it sets is restored by ``stop``.

    ``log_to_driver``: forward the workers' output to this process (``ray.init(log_to_driver)``).
    Never attaches to another ``ray start`` cluster on this machine (``address="local"``).
    ``RAY_ADDRESS`` is set to it for every process of this instance (they inherit this
    environment), with a GCS port chosen up front: State API calls, such as the polls of Ray Train
    V2's placement-group cleaner, find their cluster through it and fail when several Ray
    instances run on one machine.
    """

    def __init__(self, *, lean: bool = False, log_to_driver: bool = True, **init_kwargs: Any) -> None:
        self.lean = lean
        self.log_to_driver = log_to_driver
        self.init_kwargs = init_kwargs
        self.address: str | None = None
        self._saved: dict[str, str | None] = {}

    def start(self) -> str:
        """Start Ray; returns its GCS address (``host:port``)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        env = {"RAY_ADDRESS": self.address, **(LEAN_ENV if self.lean else {})}
        kwargs = {"logging_level": console.ray_log_level(), **self.init_kwargs}
        if self.lean:
            resources = local_resources()
            kwargs = {"include_dashboard": False, "num_cpus": resources["CPU"],
                      "num_gpus": resources["GPU"],
                      # Idle workers started ahead go unused: Ray Train's actors carry a
                      # runtime env of their own, so each gets a new worker process anyway.
                      "_system_config": {"enable_worker_prestart": False,
                                         "prestart_worker_first_driver": False},
                      **kwargs}
        self._set_env(env)
        # Ray 2.60's ray.init takes no GCS port; the node it starts reads RAY_GCS_SERVER_PORT.
        self._set_env({"RAY_GCS_SERVER_PORT": str(port)})
        try:
            with _token_notice(shown=console.verbose()):
                ray.init(address="local", log_to_driver=self.log_to_driver, **kwargs)
            make_token_private()  # the token Ray may just have written, 0644
        except BaseException:
            self._restore_env()
            raise
        finally:
            self._restore_env(["RAY_GCS_SERVER_PORT"])
        return self.address

    def stop(self) -> None:
        """Shut Ray down and restore the environment."""
        ray.shutdown()
        self._restore_env()

    def __enter__(self) -> "LocalRay":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _set_env(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_env(self, keys: list[str] | None = None) -> None:
        for key in list(keys if keys is not None else self._saved):
            if key not in self._saved:
                continue
            old = self._saved.pop(key)
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# Ray 2.60 prints this WARNING whenever it starts a local Ray with token authentication because
# RAY_AUTH_MODE is unset; setting RAY_AUTH_MODE=token silences it only before Ray is imported.
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _NotThe(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.text)


@contextlib.contextmanager
def _token_notice(*, shown: bool) -> Iterator[None]:
    """Ray's token-authentication notice of a local start, unless ``shown``, left out for the block
    (a filter on the logger of the Ray module that prints it)."""
    if shown:
        yield
        return
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _NotThe(TOKEN_NOTICE)
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def connect(address: str | None, *, lean: bool = False, log_to_driver: bool = True) -> LocalRay | None:
    """Connect to ``address`` / ``RAY_ADDRESS``, else start a local Ray (``lean``: see the module
    docstring); returns the :class:`LocalRay` to stop, or None when Ray was there already or an
    address was given. ``log_to_driver``: forward the workers' output to this process (``ran tune``
    prints its own line per trial result instead, unless verbose).

    Raises:
        ConnectionError: nothing answers at the address, or Ray refused the connection.
    """
    if ray.is_initialized():
        return None
    address = ray_address(address)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=log_to_driver,
                     logging_level=console.ray_log_level())
        except ConnectionError as err:
            raise ConnectionError(f"cannot connect to Ray at {address}: {err}{auth_hint()}") from None
        return None
    local = LocalRay(lean=lean, log_to_driver=log_to_driver)
    local.start()
    return local
