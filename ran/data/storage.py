"""Local paths, ``s3://bucket/prefix`` (boto3) and ``http(s)://`` URLs behind a few small functions.

S3 credentials and endpoint come from the standard AWS environment; ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) points at an S3-compatible store such as MinIO. Failures that the user can
fix are raised as one-line :class:`ran.data.DataError` messages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any, BinaryIO

from ran.data import DataError

S3_HINT = "check AWS credentials or AWS_ENDPOINT_URL"
MULTIPART_CHUNK = 64 * 1024 * 1024  # S3 parts; objects above this size are uploaded in parts
HTTP_TIMEOUT = 60.0
# Retries live in one layer, here, per backend: S3 requests are retried by botocore ("standard"
# mode: throttling, 5xx and connection errors, exponential back-off with jitter, a retry quota),
# which knows S3's transient errors better than a loop of ours would; http(s) reads are retried
# by open_read itself (urllib retries nothing); local files not at all (a missing file stays
# missing). Nothing above storage retries again: a loop on top of botocore's multiplied the
# tries of one shard (4 x 4 = 16) and the wait.
OPEN_ATTEMPTS = 4  # tries to open one object or URL, the first included
RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds before the 2nd, 3rd and 4th http(s) try
_RETRY_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_sessions: dict[tuple, Any] = {}  # per configuration; forked loader workers reuse the parent's
_clients: dict[tuple, Any] = {}  # per process and configuration (clients hold connection pools)


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def is_http(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def is_remote(path: str) -> bool:
    return is_s3(path) or is_http(path)


def require_dir(path: str, what: str = "data") -> None:
    """A local shard directory exists (remote prefixes are checked when read), so that a missing
    folder and a folder without shards (``no manifest.json``) are told apart.

    Raises:
        DataError: ``WHAT PATH: no such directory ...``.
    """
    if not is_remote(path) and not os.path.isdir(path):
        raise DataError(f"{what} {path}: no such directory (write shards with `ran data synth "
                        "--output DIR` or `ran data build`)")


def join(base: str, name: str) -> str:
    """``base/name`` for directories, S3 prefixes and URLs alike."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise DataError(f"{url}: no bucket in S3 URL (expected s3://bucket/prefix)")
    return bucket, key


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    """A boto3 S3 client for the current environment, one per process and configuration."""
    endpoint = s3_endpoint()
    env = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
           "AWS_DEFAULT_REGION", "AWS_REGION")
    config_key = (endpoint, *(os.environ.get(name) for name in env))
    client = _clients.get((os.getpid(), config_key))
    if client is None:
        import boto3
        from botocore.config import Config

        session = _sessions.get(config_key)
        if session is None:  # loading the S3 service model takes a good part of a second
            session = _sessions[config_key] = boto3.session.Session()

        config = Config(
            retries={"total_max_attempts": OPEN_ATTEMPTS, "mode": "standard"},  # the one retry layer
            connect_timeout=10,
            read_timeout=60,
            # S3-compatible stores (MinIO, moto, Ceph) rarely resolve virtual-hosted bucket names.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        client = session.client("s3", endpoint_url=endpoint, config=config)
        _clients[(os.getpid(), config_key)] = client
    return client


def s3_error(url: str, exc: BaseException) -> Exception:
    """Translate a boto3/botocore failure into a one-line error (FileNotFoundError for 404s)."""
    from botocore import exceptions as bex

    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound") and "bucket" not in error.get("Message", "").lower():
            return FileNotFoundError(f"{url}: no such object")
        if code == "NoSuchBucket":
            return DataError(f"{url}: bucket {split_s3(url)[0]!r} does not exist")
        if status in (401, 403) or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                                            "ExpiredToken", "InvalidToken"):
            return DataError(f"{url}: {status} {code or 'Forbidden'} — {S3_HINT}")
        return DataError(f"{url}: S3 error {code or status} — {error.get('Message', exc)}")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return DataError(f"{url}: no AWS credentials found — {S3_HINT}")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionError)):
        return DataError(f"{url}: cannot reach S3 endpoint {s3_endpoint() or '(AWS default)'} — {S3_HINT}")
    if isinstance(exc, bex.BotoCoreError):
        return DataError(f"{url}: {exc} — {S3_HINT}")
    return exc if isinstance(exc, Exception) else DataError(f"{url}: {exc!r}")


@contextlib.contextmanager
def _s3_errors(url: str):
    from botocore import exceptions as bex

    try:
        yield
    except (bex.BotoCoreError, bex.ClientError) as exc:
        raise s3_error(url, exc) from None


def open_read(path: str, delays: tuple[float, ...] = RETRY_DELAYS) -> BinaryIO:
    """A binary stream of a local file, S3 object or URL.

    Transient failures are retried here (see ``OPEN_ATTEMPTS``): by botocore for S3, with
    ``delays`` (seconds) between tries for http(s). Raises FileNotFoundError if it does not
    exist, DataError for what a retry cannot fix (credentials, 403, a missing bucket), OSError
    naming the last error once the retries are spent.
    """
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(path):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    if is_http(path):
        return _open_http(path, delays)
    return open(path, "rb")


def _open_http(url: str, delays: tuple[float, ...]) -> BinaryIO:
    import time

    for attempt in range(len(delays) + 1):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{url}: 404 Not Found") from None
            if exc.code not in _RETRY_HTTP_STATUS:
                raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            reason = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if attempt < len(delays):
            time.sleep(delays[attempt])
    raise OSError(f"{url}: {reason} (after {len(delays) + 1} attempts)")


def read_bytes(path: str) -> bytes:
    with contextlib.closing(open_read(path)) as stream:
        return stream.read()


def exists(path: str) -> bool:
    return size(path) is not None


def size(path: str) -> int | None:
    """Size in bytes, or None when the file or object does not exist."""
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(path)
        try:
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 and \
                    exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                return None
            raise s3_error(path, exc) from None
        except Exception as exc:  # botocore connection and credential errors
            raise s3_error(path, exc) from None
    if is_http(path):
        request = urllib.request.Request(path, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                length = response.headers.get("Content-Length")
                return int(length) if length is not None else 0
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise DataError(f"{path}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise DataError(f"{path}: {exc.reason}") from None
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


def listdir(path: str) -> list[str]:
    """Names of the files directly under a local directory or S3 prefix (sorted)."""
    if is_s3(path):
        bucket, key = split_s3(path)
        prefix = key.rstrip("/") + "/" if key else ""
        names = []
        with _s3_errors(path):
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        return sorted(names)
    if is_http(path):
        raise DataError(f"{path}: cannot list an http(s) URL")
    if not os.path.isdir(path):
        return []
    return sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))


def remove(path: str) -> None:
    """Delete a file or object; missing is fine."""
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(path):
            s3_client().delete_object(Bucket=bucket, Key=key)
    elif is_http(path):
        raise DataError(f"{path}: cannot delete an http(s) URL")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def upload(local_path: str, dest: str) -> None:
    """Move a finished local file to ``dest`` atomically (S3: multipart upload for big files)."""
    if is_s3(dest):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(dest)
        config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                max_concurrency=4)
        with _s3_errors(dest), open(local_path, "rb") as f:
            s3_client().upload_fileobj(f, bucket, key, Config=config)
        os.remove(local_path)
    elif is_http(dest):
        raise DataError(f"{dest}: cannot write to an http(s) URL; use a directory or s3://bucket/prefix")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.move(local_path, tmp)  # a rename when on the same filesystem
        os.replace(tmp, dest)


class AtomicWriter:
    """A binary file that appears at its destination only when closed without error.

    Local files are written next to the destination and renamed; S3 objects are staged in a
    temporary file and uploaded on close, so readers never see half a shard.
    """

    def __init__(self, dest: str):
        self.dest = dest
        if is_s3(dest) or is_http(dest):
            fd, self._tmp = tempfile.mkstemp(prefix="ran-upload-")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            self._tmp = f"{dest}.tmp-{os.getpid()}"
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._file = os.fdopen(fd, "wb")
        self.closed = False

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """Commit: the file appears at ``dest``."""
        if self.closed:
            return
        self.closed = True
        self._file.close()
        try:
            upload(self._tmp, self.dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            raise

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()
            with contextlib.suppress(OSError):
                os.remove(self._tmp)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a small file in one step: readers see the old content or the new, never a part."""
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(path):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with AtomicWriter(path) as f:
        f.write(data)


def check_writable(dest: str) -> None:
    """Raise DataError unless files can be created under the directory or S3 prefix ``dest``."""
    if is_http(dest):
        raise DataError(f"{dest}: cannot write to an http(s) URL; use a directory or s3://bucket/prefix")
    probe = join(dest, f".ran-write-test-{os.getpid()}")
    try:
        if not is_s3(dest):
            os.makedirs(dest, exist_ok=True)
        write_bytes_atomic(probe, b"")
        remove(probe)
    except DataError as exc:
        raise DataError(f"cannot write to {dest}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot write to {dest}: {exc.strerror or exc}") from None


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """``webdataset.gopen`` handler for ``s3://`` URLs (streams reads, uploads writes on close)."""
    if mode.startswith("r"):
        return open_read(url)
    if mode.startswith("w"):
        return AtomicWriter(url)
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register_webdataset_opener() -> None:
    """Let plain ``webdataset`` pipelines read and write ``s3://`` URLs through boto3."""
    import importlib

    # ``webdataset.gopen`` is also the name of a function re-exported by the package.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3
