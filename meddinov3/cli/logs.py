"""Where the package's log lines go when it runs as the `meddinov3` command.

The core package only logs (`logging.getLogger("meddinov3.<module>")`); whoever runs it decides where the lines go.
The command line sends them to stderr, one line each, tagged with the command that wrote them
(`[meddinov3 train] ...`, `[meddinov3] ...` for shared modules), warnings marked `WARNING:`; in a torchrun job only
rank 0 writes information lines (the other ranks: warnings and errors). Progress events (`--json-progress`) are not
log lines: they stay on stdout, one JSON object each, as the Slicer modules parse them.
"""

from __future__ import annotations

import logging
import os
import sys

TAGGED = ("train", "pretrain")  # subpackages whose lines carry their command's name


class LineFormatter(logging.Formatter):
    """`[meddinov3 train] message`, `[meddinov3] WARNING: message` (a traceback, if any, on the lines after)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        tag = f"meddinov3 {parts[1]}" if len(parts) > 1 and parts[1] in TAGGED else "meddinov3"
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        text = f"[{tag}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged (a test harness may replace it), as `print` does:
    an exception while a line is written propagates instead of being swallowed by `logging`. That matters for
    signals: SIGTERM during a run's start-up raises `runs.RunStopped` from its handler wherever the process is,
    often in the middle of a log line, and the run must stop there."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + self.terminator)
        self.stream.flush()


def configure_logging() -> None:
    """Send the "meddinov3" loggers' lines to stderr (once per process, however often the CLI runs in it). They
    still reach the root logger's handlers too (none in the command; a test harness's capture)."""
    logger = logging.getLogger("meddinov3")
    if any(isinstance(h, StderrHandler) for h in logger.handlers):
        return
    handler = StderrHandler()
    handler.setFormatter(LineFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
