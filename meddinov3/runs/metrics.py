"""`metrics.jsonl`: one JSON object per line, appended by a run (rank 0), cut back when it resumes, read by the
charts (`curves.png`) and by the Slicer Train module's live chart (torch-free; matplotlib optional).

Records carry `kind` ("step", "validation", "probe") and `step`. A kill can cut the last line short: readers skip
what is not a complete JSON object.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def parse_records(text: str) -> list[dict]:
    """The JSON objects of `text`, one a line; other lines (cut by a kill, not objects) are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of the metrics file at `path` ([] when there is none yet)."""
    p = Path(path)
    return parse_records(p.read_text()) if p.exists() else []


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    """Add `record` as one line (written whole, so a reader sees it complete or not at all)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def cut_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop the records past `step` (a resumed run's checkpoint): the resumed run writes them again."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsFollower:
    """Reads a growing metrics file incrementally: each `read()` parses only the lines appended since the last.

    Why: a GUI asks every second, and a long run has tens of thousands of records. A line still being written
    waits for the next call; a file that became shorter (a run started anew) is read again from its start.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        self.offset = 0  # bytes of the file parsed so far (whole lines only)

    def read(self) -> list[dict]:
        """All records so far (a new list)."""
        try:
            if self.path.stat().st_size < self.offset:
                self.records, self.offset = [], 0
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return list(self.records)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        self.records.extend(parse_records(complete.decode("utf-8", "replace")))
        return list(self.records)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed (a Slicer Python
    without it still trains; the Slicer module plots metrics.jsonl itself)."""
    try:
        import matplotlib
    except ImportError:
        if not getattr(pyplot, "warned", False):
            logger.warning("matplotlib is not installed: curves.png is not drawn (metrics.jsonl has the data)")
            pyplot.warned = True
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
