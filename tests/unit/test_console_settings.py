"""What ``ran`` prints: plain text off a terminal, ``-v`` / ``RAN_LOG_LEVEL``, and the filter that
keeps Ray's INFO records off a worker's console (ran/train/console.py); ``ran tune``'s lines."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ran.cli import build_parser, main
from ran.train import console
from ran.train.console import PlainText

QUIET_KEYS = ("RAN_LOG_LEVEL", "RAY_COLOR_PREFIX", *console.quiet_env())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the variables :func:`console.configure` reads or sets."""
    for key in QUIET_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _plain(*writes: str, close: bool = False) -> str:
    out = io.StringIO()
    stream = PlainText(out)
    for text in writes:
        stream.write(text)
    if close:
        stream.close()
    return out.getvalue()


# -- PlainText


def test_colour_codes_are_dropped():
    assert _plain("\x1b[36m(RayTrainWorker pid=7)\x1b[0m epoch 1/5\n",
                  "\x1b[32m [repeated 2x across cluster]\x1b[0m\n", "\x1b[1mbold\x1b[22m\n") == \
        "(RayTrainWorker pid=7) epoch 1/5\n [repeated 2x across cluster]\nbold\n"


def test_a_redrawn_line_is_written_once_in_its_last_state():
    bar = ["\rshards:   0%|          | 0/4", "\rshards:  50%|#####     | 2/4",
           "\rshards: 100%|##########| 4/4", "\n"]
    assert _plain("before\n", *bar, "after\n") == "before\nshards: 100%|##########| 4/4\nafter\n"


def test_a_redrawn_line_split_over_writes_keeps_its_last_state():
    # tqdm may write the carriage return and the bar in separate calls.
    assert _plain("\r", "1/3", "\r", "2/3", "\r3/3\nnext\n") == "3/3\nnext\n"


def test_text_without_carriage_return_is_passed_on_as_it_comes():
    out = io.StringIO()
    stream = PlainText(out)
    stream.write("no newline yet")
    assert out.getvalue() == "no newline yet"
    stream.write(", now\n")
    assert out.getvalue() == "no newline yet, now\n"


def test_closing_writes_a_bar_that_never_ended_and_keeps_the_stream_open():
    out = io.StringIO()
    stream = PlainText(out)
    stream.write("\r1/4\r3/4")
    assert out.getvalue() == ""
    stream.close()
    assert out.getvalue() == "3/4\n"
    assert not out.closed


def test_the_wrapped_stream_answers_everything_else(tmp_path: Path):
    with open(tmp_path / "log", "w") as f:
        stream = PlainText(f)
        assert stream.fileno() == f.fileno()
        assert stream.encoding == f.encoding
        assert stream.isatty() is False


# -- -v, RAN_LOG_LEVEL and configure()


def test_verbose_is_a_global_flag():
    assert build_parser().parse_args(["-v", "models"]).verbose is True
    assert build_parser().parse_args(["--verbose", "models"]).verbose is True
    assert build_parser().parse_args(["models"]).verbose is False


@pytest.mark.parametrize(("value", "verbose", "ray_level"), [
    (None, False, "WARNING"), ("warning", False, "WARNING"), ("ERROR", False, "WARNING"),
    ("INFO", True, "INFO"), ("debug", True, "DEBUG"),
])
def test_ran_log_level_decides_what_gets_through(clean_env, value, verbose, ray_level):
    if value is not None:
        clean_env.setenv("RAN_LOG_LEVEL", value)
    assert console.verbose() is verbose
    assert console.ray_log_level() == ray_level


def test_a_bad_ran_log_level_is_refused_before_the_command_runs(clean_env, capsys):
    clean_env.setenv("RAN_LOG_LEVEL", "LOUD")
    assert main(["models", "attention56"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: RAN_LOG_LEVEL='LOUD': use one of DEBUG, INFO, WARNING, ERROR "
                            "(INFO is what `ran -v` sets)\n")


def test_quiet_settings_hold_for_the_command_and_are_undone_after(clean_env):
    streams = sys.stdout, sys.stderr  # pytest's captures: not terminals
    with console.configure():
        assert isinstance(sys.stdout, PlainText) and sys.stdout.stream is streams[0]
        assert isinstance(sys.stderr, PlainText) and sys.stderr.stream is streams[1]
        assert {k: os.environ.get(k) for k in QUIET_KEYS} == {
            "RAN_LOG_LEVEL": None, "RAY_COLOR_PREFIX": "0",
            "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
            "RAY_DEDUP_LOGS_SKIP_REGEX": console.SKIPPED_LINES,
            "MLFLOW_LOGGING_LEVEL": "WARNING"}
    assert (sys.stdout, sys.stderr) == streams
    assert {k: os.environ.get(k) for k in QUIET_KEYS} == dict.fromkeys(QUIET_KEYS)


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unanswering_servers_retry_chatter_is_left_out_unless_verbose(clean_env, verbose):
    """urllib3's warning at every retry of MLflow's client and MLflow's system metrics monitor's
    failure: dropped during the command (not with -v), kept for other messages and after."""
    retry = logging.LogRecord("urllib3.connectionpool", logging.WARNING, "connectionpool.py", 1,
                              "Retrying (%r) after connection broken by '%r': %s", ("R", "E", "/x"),
                              None)
    monitor = logging.LogRecord("mlflow.system_metrics.system_metrics_monitor", logging.WARNING,
                                "m.py", 1, "Failed to get mlflow run: refused.", None, None)
    other = logging.LogRecord("urllib3.connectionpool", logging.WARNING, "connectionpool.py", 1,
                              "Connection pool is full, discarding connection", None, None)

    def passed(record: logging.LogRecord) -> bool:
        return logging.getLogger(record.name).filter(record)

    with console.configure(verbose_flag=verbose):
        assert [passed(r) for r in (retry, monitor, other)] == [verbose, verbose, True]
    assert [passed(r) for r in (retry, monitor, other)] == [True, True, True]


def test_verbose_sets_ran_log_level_for_children_and_leaves_rays_defaults(clean_env):
    with console.configure(verbose_flag=True):
        assert os.environ["RAN_LOG_LEVEL"] == "INFO"
        assert console.verbose()
        assert os.environ["RAY_COLOR_PREFIX"] == "0"  # still no colour into a pipe
        assert [k for k in console.quiet_env() if k in os.environ] == []
    assert "RAN_LOG_LEVEL" not in os.environ


def test_variables_the_user_set_are_kept(clean_env):
    clean_env.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    clean_env.setenv("RAY_COLOR_PREFIX", "1")
    with console.configure():
        assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"
        assert os.environ["RAY_COLOR_PREFIX"] == "1"
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"


def test_the_preemption_watcher_line_is_what_the_skip_pattern_matches():
    import re

    line = ("[2026-11-30 05:31:16,439 E 24211 24321] core_worker.cc:2465: Actor with class name: "
            "'PreemptionWatcher' and ID: 'cdf1389a9dca215944b0be8301000000' has constructor "
            "arguments in the object store and max_restarts > 0. If the arguments in the object "
            "store go out of scope or are lost, the actor restart will fail.")
    assert re.search(console.PREEMPTION_WATCHER_LINE, line)
    assert not re.search(console.PREEMPTION_WATCHER_LINE, "Actor with class name: 'RayTrainWorker' "
                                                          "... max_restarts > 0")


def test_rays_skip_pattern_drops_the_c10d_hostname_warning_and_keeps_other_worker_lines():
    """Ray's own driver-side filter (its log deduplicator, given the skip pattern) drops the
    warning a GPU machine without reverse DNS prints on every worker, and nothing else."""
    from ray._private.ray_logging import LogDeduplicator

    dedup = LogDeduplicator(5, None, console.SKIPPED_LINES)
    c10d = ("[W1204 18:02:11.123456 socket.cpp:752] [c10d] The hostname of the client socket "
            "cannot be retrieved. err=-3")
    kept = "epoch 1/1 sample 64/384 (global step 2/12) loss 1.3860"
    batch = {"ip": "10.0.0.1", "pid": 7, "job": "01", "actor_name": "RayTrainWorker",
             "task_name": "", "is_err": True, "lines": [c10d, kept]}
    assert [b["lines"] for b in dedup.deduplicate(batch)] == [[kept]]


# -- Ray's INFO records on a worker's console


@pytest.fixture
def root_console(monkeypatch: pytest.MonkeyPatch):
    """The root logger with one console handler and one file handler of its own, for the test."""
    import ray  # noqa: F401 - importing Ray configures logging: before the handlers are set

    out = io.StringIO()
    handlers = [logging.StreamHandler(out), logging.FileHandler(os.devnull)]
    monkeypatch.setattr(logging.getLogger(), "handlers", list(handlers))  # pytest adds its own
    yield handlers
    handlers[1].close()


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("x", level, path, 1, "message", None, None)


def test_rays_info_records_are_dropped_from_the_console_only(root_console):
    import ray

    console.quiet_ray_console()
    console.quiet_ray_console()  # idempotent: one filter per handler
    stream, file = root_console
    ray_file = str(Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py")
    assert len(stream.filters) == 1 and file.filters == []
    assert not stream.filter(_record(ray_file, logging.INFO))  # "Reporting training result ..."
    assert stream.filter(_record(ray_file, logging.WARNING))
    assert stream.filter(_record("/work/ran/train/trainer.py", logging.INFO))  # a worker's print
    assert file.filter(_record(ray_file, logging.INFO))


def test_a_workers_traceback_of_an_expected_error_is_dropped_from_the_console(root_console):
    import ray

    console.quiet_ray_console()
    stream, file = root_console
    util = str(Path(ray.__file__).parent / "train" / "v2" / "_internal" / "util.py")

    def failed(last: str) -> logging.LogRecord:
        record = _record(util, logging.ERROR)
        record.msg = f"Error in training function:\nTraceback (most recent call last):\n  ...\n{last}\n"
        return record

    assert not stream.filter(failed("ran.data.DataError: 64 of 64 samples unreadable"))
    assert not stream.filter(failed("OSError: [Errno 28] No space left on device"))
    assert not stream.filter(failed("OSError: [Errno 122] Disk quota exceeded"))
    assert not stream.filter(failed("ran.train.rundir.StorageFullError: no space left writing "
                                    "checkpoint /runs/r/epoch=0002_step=0000024 (File too large)"))
    assert stream.filter(failed("OSError: [Errno 5] Input/output error"))  # not a full disk
    assert stream.filter(failed("KeyError: 'model'"))  # a bug: its traceback stays
    assert file.filter(failed("ran.data.DataError: 64 of 64 samples unreadable"))

    upload = _record(util, logging.ERROR)  # Ray's logger.exception of a failed async upload
    upload.exc_info = (OSError, OSError(28, "No space left on device"), None)
    assert not stream.filter(upload)
    from ran.train.rundir import StorageFullError

    upload.exc_info = (StorageFullError, StorageFullError(27, "no space left writing ..."), None)
    assert not stream.filter(upload)
    upload.exc_info = (ValueError, ValueError("a bug"), None)
    assert stream.filter(upload)


# -- ran tune's line per trial result


def test_trial_lines_say_trial_epoch_metric_and_values(capsys):
    from ran.tune.search import TrialLines
    from ran.tune.space import parse_space

    space = parse_space({"space": {"model.depth": {"grid": [56, 92]},
                                   "model.mask_activation": {"choice": ["mixed", "spatial"]}},
                         "search": {"metric": "eval/top1", "mode": "max"}})
    trial = SimpleNamespace(trial_id="2e582_00001", config={"model.depth": 92,
                                                            "model.mask_activation": "spatial"})
    lines = TrialLines(space)
    lines.on_trial_result(3, [trial], trial, {"epoch": 2, "eval/top1": 0.84375})
    lines.on_trial_result(4, [trial], trial, {"epoch": 3})
    lines.on_trial_error(5, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "trial 2e582_00001 epoch 2: eval/top1 0.8438 (depth=92 mask_activation=spatial)",
        "trial 2e582_00001 epoch 3: eval/top1 - (depth=92 mask_activation=spatial)",
        "trial 2e582_00001 failed (depth=92 mask_activation=spatial); its error is in the summary "
        "at the end",
    ]
