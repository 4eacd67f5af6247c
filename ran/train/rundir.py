"""Run directories: where Ray Train keeps one run, and which one ``--resume`` continues.

A run lives in ``storage.path/<name>``. Without ``storage.name`` each ``ran train`` starts a new
directory ``<job name>-<UTC timestamp>``, so a fresh run never picks up an old one's checkpoints;
``--resume`` continues the newest ``<job name>-*`` directory. With an explicit ``storage.name``, a
fresh run refuses to start when that directory already holds a run, and ``--resume`` continues it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs

from ran.config import ConfigError, JobConfig

_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


@dataclass
class Storage:
    """Where Ray Train keeps one run: ``path`` (as Ray wants it) + ``name`` on ``filesystem``."""

    uri: str  # storage.path as the user sees it: an absolute directory or s3://bucket/prefix
    name: str  # run directory name
    ray_path: str  # storage_path handed to RunConfig (no s3:// when a filesystem is given)
    filesystem: Any = None  # pyarrow filesystem, or None to let Ray resolve the URI

    @property
    def run_uri(self) -> str:
        """The run directory, e.g. ``/abs/runs/demo-20250101-120000`` or ``s3://b/p/demo-...``."""
        return f"{self.uri.rstrip('/')}/{self.name}"

    def _fs(self) -> tuple[Any, str]:
        if self.filesystem is not None:
            return self.filesystem, self.ray_path
        return pyarrow.fs.FileSystem.from_uri(self.uri)

    def exists(self, name: str | None = None) -> bool:
        """Whether the run directory ``name`` (default: this run) holds a Ray Train run."""
        fs, base = self._fs()
        path = f"{base.rstrip('/')}/{name or self.name}"
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def list_runs(self) -> list[str]:
        """Names of the run directories under the storage path."""
        fs, base = self._fs()
        if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


# What a full disk looks like to a write: no space, a quota reached, a file-size limit reached.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageFullError(OSError):
    """A checkpoint could not be written because its storage is full (:data:`NO_SPACE`); its
    text is one line naming the checkpoint and what to do (:func:`storage_full`)."""

    def __str__(self) -> str:
        return str(self.strerror)


def storage_full(err: OSError, path: str | os.PathLike[str]) -> OSError:
    """``err`` as a :class:`StorageFullError` naming ``path`` (the checkpoint being written) when
    it is a full disk, quota or file-size limit (:data:`NO_SPACE`); any other error as it is."""
    if err.errno not in NO_SPACE or isinstance(err, StorageFullError):
        return err
    return StorageFullError(err.errno, f"no space left writing checkpoint {path} "
                                       f"({os.strerror(err.errno)}): free space there or set "
                                       "storage.path to a disk with room")


# Ray Train's record of the checkpoints it registered (2.60: RunConfig storage, JSON with
# "latest_checkpoint_result": {"checkpoint_dir_name": ...}); what a restart or --resume loads.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(storage: Storage) -> str | None:
    """The checkpoint ``--resume`` of ``storage``'s run continues from: the latest one Ray Train
    registered (:data:`RAY_SNAPSHOT`), as a path or ``s3://`` URI; None when there is none. A
    checkpoint directory whose upload failed (a full disk) is not one."""
    fs, base = storage._fs()
    run = f"{base.rstrip('/')}/{storage.name}"
    if fs.get_file_info(f"{run}/{RAY_SNAPSHOT}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{run}/{RAY_SNAPSHOT}") as f:
        snapshot = json.loads(f.read().decode("utf-8"))
    name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not name or fs.get_file_info(f"{run}/{name}").type != pyarrow.fs.FileType.Directory:
        return None
    return f"{storage.run_uri}/{name}"


def storage_for(cfg: JobConfig, *, resume: bool) -> Storage:
    """The run directory of this job: a new one, or the one ``--resume`` continues (module doc).

    Raises:
        ConfigError: a fresh run would reuse a named directory, or there is nothing to resume.
    """
    base = _storage_base(cfg.storage.path, cfg.name)
    if cfg.storage.name:
        base.name = cfg.storage.name
        exists = base.exists()
        if exists and not resume:
            raise ConfigError(f"{base.run_uri} already holds a run: pass --resume to continue it, or "
                              "set storage.name to a new name")
        if resume and not exists:
            raise ConfigError(f"nothing to resume: {base.run_uri} does not exist")
        return base
    if resume:
        runs = [n for n in base.list_runs() if n.startswith(cfg.name + "-") and _STAMP.search(n)]
        if not runs:
            raise ConfigError(f"nothing to resume: no run of job {cfg.name!r} under {base.uri} "
                              "(start one without --resume)")
        base.name = max(runs, key=lambda n: (_STAMP.search(n).group(0)[:16], n))  # type: ignore[union-attr]
        return base
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base.name = f"{cfg.name}-{stamp}"
    suffix = 1
    while base.exists():
        suffix += 1
        base.name = f"{cfg.name}-{stamp}-{suffix}"
    return base


def _storage_base(path: str, job: str) -> Storage:
    if not path.startswith("s3://"):
        return Storage(uri=path, name=job, ray_path=path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return Storage(uri=path, name=job, ray_path=path)
    parsed = urlparse(endpoint)
    # No keys given: the filesystem is pickled to every worker (and kept with the trainer), so
    # each process finds its own credentials by AWS's default chain (its environment, ~/.aws, the
    # node's instance or service-account role), as the cluster's nodes are set up to
    # (cluster/README.md); the driver's keys never travel.
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )
    return Storage(uri=path, name=job, ray_path=path[len("s3://"):].rstrip("/"), filesystem=fs)


