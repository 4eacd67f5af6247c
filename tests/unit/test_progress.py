"""Long commands say how far they are: a line every RAN_PROGRESS_EVERY_S seconds in a pipe."""

from __future__ import annotations

import io
import re

import pytest

from ran.progress import Progress, counted, every_s, waiting


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_lines_with_counts_rate_and_eta(monkeypatch):
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "0")
    out = io.StringIO()
    with Progress("evaluating val", 4, "img", stream=out) as shown:
        assert list(counted(["a", "b"], shown, size=lambda _: 2)) == ["a", "b"]
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per update, and the last on close
    assert re.fullmatch(r"evaluating val: 2/4 img \(50%\), [0-9.]+ img/s, ETA \d:\d\d:\d\d", lines[0])
    assert lines[-1].startswith("evaluating val: 4/4 img (100%)")


def test_nothing_before_the_interval_and_nothing_when_disabled(monkeypatch):
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "3600")
    out = io.StringIO()
    with Progress("writing shards", 10, stream=out) as shown:
        shown.update(10)
    with Progress("x", 1, stream=out, enabled=False) as off:
        off.update(1)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines(monkeypatch):
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "0")
    out = Terminal()
    with Progress("evaluating val", 4, stream=out) as shown:
        shown.update(4)
    assert "\r" in out.getvalue() and "4/4" in out.getvalue()
    assert "ETA" not in out.getvalue()  # tqdm's bar, not the pipe's lines


def test_waiting_ticks_while_a_task_of_unknown_length_runs(monkeypatch):
    import threading

    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "0.01")
    out = io.StringIO()
    ticked = threading.Event()

    class Watch(io.StringIO):
        def write(self, text):
            ticked.set()
            return out.write(text)

    with waiting("logging the model to MLflow", stream=Watch()):
        assert ticked.wait(30)  # the ticker spoke while the task was still running
    assert out.getvalue().startswith("logging the model to MLflow ... 0:00:00")
    assert "logging the model to MLflow: done in" in out.getvalue()


def test_a_bad_interval_is_one_line(monkeypatch):
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "soon")
    with pytest.raises(ValueError, match="RAN_PROGRESS_EVERY_S='soon': give the seconds"):
        every_s()
