"""What ``ran`` prints, and how much of Ray's and MLflow's own output gets through.

By default a command prints ran's own lines (rank 0's progress at a fixed cadence and its epoch
summaries, the final summary), warnings and errors; ``ran -v`` (or ``RAN_LOG_LEVEL=INFO``) lets the
rest through as Ray and MLflow print it. When stdout or stderr is not a terminal, what reaches it
is plain text either way: no ANSI colour codes, and of a line redrawn with carriage returns (a
progress bar) only its last state.

What the default leaves out, and the switch that does it (:func:`configure`,
:mod:`ran.train.localray`, :meth:`Console.use_stdout_logger`, ``ran tune``'s reporter):

- the ``(RayTrainWorker pid=...)`` prefix Ray puts before every forwarded worker line (only rank 0
  prints): ``RAY_DISABLE_WORKER_LOG_PREFIX=1``, Ray's opt-out, read when Ray is imported (not in its
  docs; ``ray.init(logging_config=ray.LoggingConfig(...))`` drops the prefix too, but also reformats
  every record of the driver's root and ``ray`` loggers with the job's ids appended);
- Ray's INFO lines on the driver ("Started a local Ray instance", Tune's result-file notes, Ray
  Train's "A run snapshot was found ..." when a search reads its best trial back):
  ``ray.init(logging_level=WARNING)``;
- Ray Train's ``Reporting training result N: TrainingReport(...)`` from every worker at every report
  (Ray logs it at INFO under a logger named after its file, which Ray Train's
  ``LoggingConfig(log_level)`` does not reach): a filter on the workers' console handler that drops
  Ray's own records below WARNING;
- the notice that token authentication is on, at every local Ray start: a filter on the one Ray
  logger that prints it, for the start (``RAY_AUTH_MODE=token``, which also silences it, counts
  only before Ray is imported, and would change how an explicit address is reached);
- the error-level ``core_worker.cc ... 'PreemptionWatcher' ... max_restarts > 0`` line a Ray
  Train controller prints when it starts its preemption watcher, and torch.distributed's
  ``[c10d] The hostname of the client socket cannot be retrieved`` warning from the workers:
  ``RAY_DEDUP_LOGS_SKIP_REGEX``;
- MLflow's INFO lines ("Creating initial MLflow database tables", "Validating input example"):
  ``MLFLOW_LOGGING_LEVEL=WARNING``;
- ``ran tune``'s status tables and its trials' own output: a line per trial result from the driver
  instead (:mod:`ran.tune.search`), with ``ray.init(log_to_driver=False)``.

Colour: ``RAY_COLOR_PREFIX=0`` when stdout is not a terminal (Ray's documented switch), and every
other escape (Ray's "[repeated 2x across cluster]" note, coloured exception headers) is stripped by
:class:`PlainText`. Variables the user set are left as they are.

Imports nothing heavy: ``ran.cli`` imports this module before it knows the command.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from typing import Any, Iterator, TextIO

LOG_LEVEL_ENV = "RAN_LOG_LEVEL"  # DEBUG, INFO (= ran -v), WARNING (the default) or ERROR
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LEVEL = "WARNING"

PROGRESS_EVERY_S = 10.0  # seconds between rank 0's progress lines within an epoch

# Ray's C++ line when a Ray Train controller starts its preemption watcher (max_restarts=-1, with
# constructor arguments in the object store); nothing a user can or should act on.
PREEMPTION_WATCHER_LINE = r"Actor with class name: 'PreemptionWatcher'.*max_restarts > 0"
# torch.distributed's C++ warning on a worker whose host name does not resolve back (a container,
# a GPU machine without reverse DNS); the process group works, nothing to act on (issue 21).
C10D_HOSTNAME_LINE = r"\[c10d\] The hostname of the client socket cannot be retrieved"
# What never reaches the driver's console from a worker or a Ray process (Ray's skip pattern).
SKIPPED_LINES = f"{PREEMPTION_WATCHER_LINE}|{C10D_HOSTNAME_LINE}"

log = logging.getLogger("ran.train")


def log_level() -> str:
    """``RAN_LOG_LEVEL`` (default WARNING), upper-cased.

    Raises:
        ValueError: a value that is not a level name.
    """
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().upper() or DEFAULT_LEVEL
    if level not in LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={os.environ[LOG_LEVEL_ENV]!r}: use one of "
                         f"{', '.join(LEVELS)} (INFO is what `ran -v` sets)")
    return level


def verbose() -> bool:
    """Whether Ray's and MLflow's own INFO lines are shown (``ran -v``, ``RAN_LOG_LEVEL=INFO``)."""
    try:
        return logging.getLevelName(log_level()) <= logging.INFO
    except ValueError:
        return False


def ray_log_level() -> str:
    """The level of the ``ray`` logger on the driver (``ray.init(logging_level=...)``) and of Ray
    Train's ``LoggingConfig``: ``RAN_LOG_LEVEL`` when verbose (INFO, DEBUG), else WARNING."""
    return log_level() if verbose() else "WARNING"


def quiet_env() -> dict[str, str]:
    """Environment that keeps Ray's and MLflow's chatter out of the default output; read when Ray
    and MLflow are imported, and inherited by a local Ray's processes."""
    return {
        "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
        "RAY_DEDUP_LOGS_SKIP_REGEX": SKIPPED_LINES,
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }


@contextlib.contextmanager
def configure(verbose_flag: bool = False) -> Iterator[None]:
    """The output settings of one ``ran`` command, for the block (``ran.cli.main`` runs the command
    inside it); the environment and ``sys.stdout``/``sys.stderr`` are restored afterwards.

    ``verbose_flag`` (``-v``) sets ``RAN_LOG_LEVEL=INFO`` for this process and its children. Unless
    verbose, :func:`quiet_env` is set where the user has not set those variables. A stream that is
    not a terminal is wrapped in :class:`PlainText`.

    Raises:
        ValueError: ``RAN_LOG_LEVEL`` is not a level name.
    """
    saved = {key: os.environ.get(key) for key in (LOG_LEVEL_ENV, "RAY_COLOR_PREFIX", *quiet_env())}
    streams = sys.stdout, sys.stderr
    try:
        if verbose_flag:
            os.environ[LOG_LEVEL_ENV] = "INFO"
        log_level()  # refuse a bad value before anything runs
        if not verbose():
            for key, value in quiet_env().items():
                os.environ.setdefault(key, value)
        if not _is_terminal(sys.stdout):
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            sys.stdout = PlainText(sys.stdout)
        if not _is_terminal(sys.stderr):
            sys.stderr = PlainText(sys.stderr)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, PlainText):
                stream.close()
        sys.stdout, sys.stderr = streams
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# CSI sequences (colours, cursor moves: ESC [ ... final byte) and two-byte escapes (ESC c, ESC 7).
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


class PlainText:
    """A text stream for a file or pipe: writes what a terminal would end up showing.

    ANSI escape sequences are dropped; a line redrawn with carriage returns (a progress bar) is
    written once, in its last state, when it ends. Text without a carriage return is passed on as it
    comes. Everything else (``fileno``, ``encoding``, ``buffer``) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._redrawn: str | None = None  # a line being redrawn: its state since the latest \r
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._write(_ESCAPE.sub("", text))
        return len(text)

    def _write(self, text: str) -> None:
        *ended, rest = text.split("\n")
        if ended:
            lines = [(self._redrawn or "") + ended[0], *ended[1:]]
            self._redrawn = None
            self.stream.write("\n".join(line.rsplit("\r", 1)[-1] for line in lines) + "\n")
        if "\r" in rest or self._redrawn is not None:
            self._redrawn = ((self._redrawn or "") + rest).rsplit("\r", 1)[-1]
        elif rest:
            self.stream.write(rest)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):  # flushed after the stream was closed
            self.stream.flush()

    def close(self) -> None:
        """Write a progress line that never ended (its last state), then flush; the wrapped stream
        stays open."""
        with self._lock:
            if self._redrawn:
                self.stream.write(self._redrawn + "\n")
            self._redrawn = None
        self.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


# The last line of a worker's traceback for errors ran expects and the driver reports in one
# `error:` line (bad data, a config found wrong in the worker, a full disk).
EXPECTED_WORKER_ERRORS = ("ran.data.DataError: ", "ran.config.ConfigError: ",
                          "OSError: [Errno 28] ")


class _RayInfo(logging.Filter):
    """Drops Ray's own records below WARNING (by the file that logged them), and Ray Train's
    ``Error in training function:`` traceback of an expected error (:data:`EXPECTED_WORKER_ERRORS`),
    which the driver prints as ran's one ``error:`` line."""

    def __init__(self, ray_dir: str) -> None:
        super().__init__("ran-quiet-ray")
        self.ray_dir = ray_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(self.ray_dir):
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.exc_info and expected_error(record.exc_info[1]):
            return False  # e.g. "checkpoint upload failed in the background thread" + traceback
        message = record.getMessage()
        return not (message.startswith("Error in training function:")
                    and message.rstrip().splitlines()[-1].startswith(EXPECTED_WORKER_ERRORS))


def expected_error(err: BaseException | None) -> bool:
    """Whether ``err`` is one ran reports in one line (:data:`EXPECTED_WORKER_ERRORS`): a full disk
    (ENOSPC), ran's DataError or ConfigError."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return err is not None and f"{type(err).__module__}.{type(err).__name__}: " in \
        EXPECTED_WORKER_ERRORS


class Console:
    """Progress lines of one worker: printed on rank 0 only, straight to stdout once each.

    Inside Ray Train workers ``print`` is patched to log *and* print (every line twice) and the
    console handler filters at the run's log level (Ray Train's ``LoggingConfig``: WARNING unless
    verbose); a ``ran.train`` logger with its own stdout handler goes around both.
    """

    def __init__(self, enabled: bool = True, every_s: float = PROGRESS_EVERY_S) -> None:
        self.enabled = enabled
        self.every_s = every_s  # seconds between progress lines within an epoch

    @staticmethod
    def use_stdout_logger() -> None:
        """Route ``ran.train`` lines to stdout and, unless verbose, keep Ray's INFO records off the
        console (call once per Ray Train worker, after Ray Train has set up its logging)."""
        if not log.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        if not verbose():
            quiet_ray_console()

    def say(self, message: str) -> None:
        """One line, on rank 0."""
        if not self.enabled:
            return
        if log.handlers:
            log.info(message)
        else:
            print(message, flush=True)


def quiet_ray_console() -> None:
    """Drop Ray's own records below WARNING from the root logger's console handlers (log files keep
    them). Ray Train's ``Reporting training result ...`` is one: its logger is named after its file,
    so ``LoggingConfig(log_level)``, which filters the ``ray.train`` loggers, lets it through.
    Also a worker's traceback of an expected error (:class:`_RayInfo`)."""
    import ray  # a Ray Train worker has Ray imported already; ran.cli imports this module without

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _RayInfo) for f in handler.filters):
            handler.addFilter(_RayInfo(ray_dir))
