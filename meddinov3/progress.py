"""Progress reporting shared by `segment`, `train` and `pretrain`.

Two consumers: a person at a terminal (tqdm bar) and the Slicer modules (one JSON object per line on stdout,
`--json-progress`). A later Slicer session reattaching to a job reads the run's `status.json` (`meddinov3.runs`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


def jsonable(value: Any) -> Any:
    """Numbers from numpy/torch become plain floats/ints so every event is valid JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Progress:
    """Emit events as JSON lines and/or drive a tqdm bar.

    `event(name, **fields)` always works; `update(done, total, stage=...)` moves the bar. Only rank 0 of a
    distributed job should report: pass `enabled=False` elsewhere.
    """

    def __init__(self, json_lines: bool = False, stream: TextIO | None = None, desc: str = "",
                 bar: bool | None = None, enabled: bool = True):
        self.json_lines = json_lines and enabled
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.desc = desc
        if bar is None:
            bar = (not json_lines) and sys.stderr.isatty()
        self._use_bar = bar and enabled
        self._bar = None
        self._start = time.monotonic()

    @property
    def shows_bar(self) -> bool:
        """Whether a tqdm bar shows the progress (log lines that repeat it would only break it up)."""
        return self._use_bar

    def event(self, name: str, **fields: Any) -> dict:
        record = {"event": name, "time": round(time.time(), 3), **jsonable(fields)}
        if self.json_lines:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        return record

    def update(self, done: int, total: int, stage: str = "", **fields: Any) -> None:
        if self.json_lines:
            elapsed = time.monotonic() - self._start
            eta = elapsed / done * (total - done) if done > 0 else None
            self.event("progress", stage=stage, done=done, total=total,
                       fraction=done / total if total else 1.0,
                       eta_s=None if eta is None else round(eta, 2), **fields)
        if self._use_bar:
            from tqdm import tqdm

            if self._bar is None or self._bar.total != total:
                if self._bar is not None:
                    self._bar.close()
                self._bar = tqdm(total=total, desc=stage or self.desc, file=sys.stderr, leave=False)
            self._bar.set_description(stage or self.desc)
            self._bar.n = done
            if fields:
                self._bar.set_postfix({k: v for k, v in fields.items() if isinstance(v, (int, float, str))})
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
