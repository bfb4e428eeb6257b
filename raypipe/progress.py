"""Progress on the driver's console: plain lines, and one status line per stage.

Workers log their lines with a mark (`progress`, `status`); the driver forwards only marked
lines to its `console` (see pipeline). A status (pretraining's step/total and throughput, the
sweep's trials done) updates one line in place on a terminal. In a log file, where nothing can
be redrawn, a status is written at most every `RAYPIPE_PROGRESS_EVERY_S` seconds (30), and the
latest one is always written before the next plain line and when the stage ends, so a log still
ends each stage with its final state.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import threading
import time
from typing import TextIO

#: Progress lines from workers carry this mark; the driver forwards only these.
PROGRESS_MARK = "[raypipe]"
#: A worker's status update (replaces the stage's status line).
STATUS_MARK = "[raypipe:status]"
_log = logging.getLogger("raypipe")


_in_driver = False


def in_driver(on: bool = True) -> None:
    """Mark this process as the driver: its own `progress` and `status` (training that runs
    in this process) go straight to the console instead of through the log."""
    global _in_driver
    _in_driver = on


def progress(message: str) -> None:
    """One progress line for the driver's console. Logged at WARNING so that Ray's worker
    logging level (INFO or above) never hides it."""
    if _in_driver:
        console.line(message)
    else:
        _log.warning("%s %s", PROGRESS_MARK, message)


def status(message: str) -> None:
    """A new state of this stage's status line on the driver's console."""
    if _in_driver:
        console.status(message)
    else:
        _log.warning("%s %s", STATUS_MARK, message)


class Console:
    def __init__(self, stream: TextIO | None = None, *, every_s: float | None = None):
        self._stream = stream
        self._every_s = every_s
        self._lock = threading.Lock()
        self._status: str | None = None  # the current status text
        self._drawn = False  # terminal: the status line is on screen
        self._pending = False  # log file: the current status is not written yet
        self._written_at = -float("inf")

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout  # looked up late: tests and the CLI swap sys.stdout

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _interval(self) -> float:
        if self._every_s is not None:
            return self._every_s
        return float(os.environ.get("RAYPIPE_PROGRESS_EVERY_S", "30"))

    def line(self, text: str) -> None:
        """A plain line; a status line stays below it on a terminal."""
        with self._lock:
            out = self.stream
            if self._tty():
                out.write(("\r\033[K" if self._drawn else "") + text + "\n")
                if self._status is not None:
                    out.write(self._fit(self._status))
                self._drawn = self._status is not None
            else:
                self._write_pending()
                out.write(text + "\n")
            out.flush()

    def status(self, text: str) -> None:
        """Replace the status line: drawn in place on a terminal, throttled in a log file."""
        with self._lock:
            self._status = text
            out = self.stream
            if self._tty():
                out.write("\r\033[K" + self._fit(text))
                self._drawn = True
            elif time.monotonic() - self._written_at >= self._interval():
                out.write(text + "\n")
                self._written_at = time.monotonic()
                self._pending = False
            else:
                self._pending = True
            out.flush()

    def end_status(self) -> None:
        """The stage is over: its last status stays as a line of its own."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
            self._write_pending()
            self.stream.flush()
            self._status, self._drawn = None, False
            self._written_at = -float("inf")

    def _write_pending(self) -> None:
        if self._pending and self._status is not None:
            self.stream.write(self._status + "\n")
            self._written_at = time.monotonic()
        self._pending = False

    @staticmethod
    def _fit(text: str) -> str:
        width = shutil.get_terminal_size((120, 20)).columns
        return text if len(text) < width else text[: max(1, width - 2)] + "…"


#: The driver's console (one process, one console).
console = Console()


class _Without(io.TextIOBase):
    """A stream that passes on everything but the lines starting with `prefixes`."""

    def __init__(self, stream: TextIO, prefixes: tuple[str, ...]):
        self.stream, self.prefixes, self.dropped = stream, prefixes, False

    def write(self, text: str) -> int:
        # print() writes its line, then its end ("\n") apart: that goes with the line.
        drop = text.lstrip().startswith(self.prefixes) or (self.dropped and text == "\n")
        self.dropped = drop and text != "\n"
        if not drop:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def stderr_without(*prefixes: str):
    """Standard error, inside the `with`, without the lines that start with `prefixes` (a
    library's prints that say what raypipe says better); everything else goes on."""
    return contextlib.redirect_stderr(_Without(sys.stderr, prefixes))
