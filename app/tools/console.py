"""What a run prints, and ``OUT/run.log``: everything the console showed, plus Flower's log and
the lines Ray's worker processes print, which stay out of the console unless asked for.

Ray forwards each worker's output to the driver's stdout and stderr with a ``(name pid=N)``
prefix: start-up chatter, actor shutdown notices and, once seen, an abseil "Fatal Python error:
Aborted" from a worker Ray starts for itself. fedws's own clients report their errors through
Flower's replies (``clients_failed``), so those lines are noise on the console; they go to
``run.log`` only, with the rest of what the run printed and Flower's log at ``--log-level`` or
INFO, whichever is more detailed.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from app.rundir import writing

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes: the console's, never the file's
RAY_LINE = re.compile(r"^\s*(\x1b\[[0-9;]*m)*\((raylet|[\w.]+ pid=\d+|pid=\d+)[^)]*\)")


class _Tee:
    """A text stream writing to the console and the log file: each line to the file (a
    progress bar's carriage-return redraws collapsed to their last state), to the console as it
    comes, except the lines of Ray's workers (unless ``workers``), held until the line ends."""

    def __init__(self, console: TextIO, log: TextIO, workers: bool) -> None:
        self.console, self.log, self.workers = console, log, workers
        self.line, self.held, self.fresh = "", False, True
        self.lock = threading.Lock()  # Ray's log thread, Flower's server thread, the main one

    def write(self, text: str) -> int:
        with self.lock:
            self._write(text)
        return len(text)

    def _write(self, text: str) -> None:
        for piece in re.split(r"(\n)", text):
            if piece == "\n":
                self._end_line()
            elif piece:
                if self.fresh:  # a worker's line starts with "(" (or a colour code first)
                    self.held = piece.lstrip()[:1] in ("(", "\x1b")
                    self.fresh = False
                self.line += piece
                if not self.held:
                    self.console.write(piece)

    def _end_line(self) -> None:
        self.log.write(ANSI.sub("", self.line.rsplit("\r", 1)[-1]) + "\n")
        if not self.held:
            self.console.write("\n")
        elif self.workers or not RAY_LINE.match(self.line):
            self.console.write(self.line + "\n")
        self.line, self.held, self.fresh = "", False, True

    def close_line(self) -> None:
        with self.lock:
            if self.line:
                self._end_line()

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")


class _NotOnConsole(logging.Filter):
    """Flower's warnings about a setting fedws chose on purpose: in ``run.log``, not on the
    console (without a local validation split, ``val_fraction: 0``, fedws sets
    ``fraction_evaluate`` to 0: the server tests the global model itself)."""

    EXPECTED = ("fraction_evaluate is set to 0.0",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


def flower_console_level(level: str) -> None:
    """Flower's console output at ``level`` (its own handler), its logger at least INFO."""
    flwr = logging.getLogger("flwr")
    console_level = getattr(logging, level.upper())
    flwr.setLevel(min(console_level, logging.INFO))
    for handler in flwr.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(console_level)
            if not any(isinstance(f, _NotOnConsole) for f in handler.filters):
                handler.addFilter(_NotOnConsole())


def console_stream() -> TextIO:
    """The terminal's stderr, past any tee: for progress bars, which redraw one line and have
    no place in a log file."""
    return getattr(sys.stderr, "console", sys.stderr)


@contextmanager
def teed(
    path: Path, level: str = "warning", workers: bool = False, append: bool = False
) -> Iterator[None]:
    """Inside: stdout and stderr also go to ``path`` (``append``: a resumed run continues
    it; the server adds Flower's log there), Ray workers' lines only there unless ``workers``;
    Flower's console output at ``level``. An exception leaving the block leaves its traceback
    in the file (the console gets it from Python as usual)."""
    with writing(path):  # an unwritable run folder is one line, not a traceback
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("")
        # appending (O_APPEND) even to a fresh file: the server's log handler writes to it
        # too, and each write must land at the end rather than at this handle's own offset
        handle = open(path, "a", buffering=1)  # noqa: SIM115 - closed by the with below
    flower_console_level(level)
    with handle as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log, workers), _Tee(err, log, workers)
        try:
            yield
        except BaseException:
            for stream in (sys.stdout, sys.stderr):
                stream.close_line()
            log.write(traceback.format_exc())
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.close_line()
            sys.stdout, sys.stderr = out, err
