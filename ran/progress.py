"""Progress of long commands (``ran eval``, ``ran explain`` on many images, ``ran data build``,
logging a model): a bar on a terminal, a line every ``RAN_PROGRESS_EVERY_S`` seconds (default 10)
in a pipe or a log file, where a bar would be a smear of carriage returns. On stderr, so that
what a command prints as its result (stdout) stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TextIO, TypeVar

EVERY_ENV = "RAN_PROGRESS_EVERY_S"  # seconds between progress lines in a pipe
DEFAULT_EVERY_S = 10.0

T = TypeVar("T")


def every_s() -> float:
    """Seconds between progress lines in a pipe: ``RAN_PROGRESS_EVERY_S``, else 10.

    Raises:
        ValueError: the variable is not a number >= 0.
    """
    text = os.environ.get(EVERY_ENV)
    if text is None:
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"{EVERY_ENV}={text!r}: give the seconds between progress lines, e.g. 10")
    return value


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts of one long task: ``update(n)`` as work is done, ``close()`` at the end (or use it as
    a context manager). ``total``: the count at the end (None: unknown); ``unit``: what is
    counted (``img``, ``shard``). Disabled (``enabled=False``) it prints nothing.

    On a terminal it draws a tqdm bar; elsewhere it prints ``LABEL: DONE/TOTAL UNIT (P%), R
    UNIT/s, ETA H:MM:SS`` at most every :func:`every_s` seconds, and a last line when closed.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "img", *,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._every = every_s() if enabled else 0.0
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=label, file=self.stream)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self._every:
            self._last_line = now
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as a pipe gets it."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            return (f"{self.label}: {self.done}/{self.total} {self.unit} "
                    f"({self.done / self.total:.0%}), {rate:.1f} {self.unit}/s, ETA {_clock(eta)}")
        return f"{self.label}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s, {_clock(elapsed)}"

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or print the last line (only when a line was printed before)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._last_line != self.start:
            self._say(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def counted(items: Iterable[T], progress: Progress, size: Any = None) -> Iterator[T]:
    """Yield ``items``, counting each into ``progress`` (``size(item)`` units, default 1)."""
    for item in items:
        yield item
        progress.update(size(item) if size else 1)


@contextlib.contextmanager
def waiting(label: str, *, enabled: bool = True, stream: TextIO | None = None) -> Iterator[None]:
    """A task of unknown length (uploading a model): ``LABEL ... N s`` every :func:`every_s`
    seconds while it runs, in a pipe and on a terminal alike, and ``LABEL: done in N s`` at the
    end if it took longer than one interval."""
    stream = stream or sys.stderr
    if not enabled:
        yield
        return
    start, every, stop = time.monotonic(), every_s(), threading.Event()

    def tick() -> None:
        while not stop.wait(every or 0.1):
            print(f"{label} ... {_clock(time.monotonic() - start)}", file=stream, flush=True)

    thread = threading.Thread(target=tick, name="ran-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        took = time.monotonic() - start
        if took >= every:
            print(f"{label}: done in {_clock(took)}", file=stream, flush=True)
