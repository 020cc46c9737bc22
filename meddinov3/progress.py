"""Progress reporting shared by `segment`, `train` and `pretrain`.

Three consumers: a person at a terminal (tqdm bar), the Slicer modules (one JSON object per line on stdout,
`--json-progress`), and a later Slicer session reattaching to a job (`status.json` in the run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .files import read_json, write_json


def _jsonable(value: Any) -> Any:
    """Numbers from numpy/torch become plain floats/ints so every event is valid JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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

    def event(self, name: str, **fields: Any) -> dict:
        record = {"event": name, "time": round(time.time(), 3), **_jsonable(fields)}
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


class RunStatus:
    """The `status.json` of a training or pretraining run: what a reattaching GUI reads.

    States: "starting", "running", "stopping", "stopped", "finished", "failed".
    """

    def __init__(self, run_dir: str | os.PathLike, total: int, kind: str):
        self.path = Path(run_dir) / "status.json"
        self.total = total
        self.kind = kind
        self._start = time.monotonic()
        self._start_step: int | None = None
        self.data: dict[str, Any] = {
            "kind": kind, "state": "starting", "step": 0, "total": total, "eta_s": None,
            "pid": os.getpid(), "metrics": {}, "error": None, "started": time.time(), "updated": time.time(),
        }

    def update(self, state: str | None = None, step: int | None = None, metrics: dict | None = None,
               error: str | None = None, **extra: Any) -> dict:
        if state is not None:
            self.data["state"] = state
        if step is not None:
            if self._start_step is None:
                self._start_step, self._start = step, time.monotonic()
            self.data["step"] = step
            done = step - self._start_step
            if done > 0:
                rate = done / (time.monotonic() - self._start)
                self.data["eta_s"] = round(max(self.total - step, 0) / rate, 1)
        if metrics:
            self.data["metrics"].update(_jsonable(metrics))
        if error is not None:
            self.data["error"] = error
        self.data.update(_jsonable(extra))
        self.data["updated"] = time.time()
        write_json(self.path, self.data)
        return self.data

    @staticmethod
    def read(run_dir: str | os.PathLike) -> dict | None:
        path = Path(run_dir) / "status.json"
        return read_json(path) if path.exists() else None


@contextlib.contextmanager
def report_failure(status: RunStatus | None, progress: Progress, user_errors: tuple[type, ...] = ()):
    """Record an exception escaping a run as its "failed" state (status.json and a `failed` event), then re-raise.

    A user error (one of `user_errors`) is reported by its message alone, anything else with its type name.
    `status` is None on the ranks of a distributed run that do not report.
    """
    try:
        yield
    except BaseException as e:
        if status is not None and not isinstance(e, SystemExit):
            message = str(e) if isinstance(e, user_errors) else f"{type(e).__name__}: {e}"
            status.update(state="failed", error=message)
            progress.event("failed", message=message)
        raise


class StopRequest:
    """SIGTERM / SIGINT during a training or pretraining run: remembered, so the loop saves and stops cleanly."""

    def __init__(self):
        self.requested = False
        self.signal = ""
        self._previous: dict = {}

    def __call__(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def install(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def peak_gpu_memory_gb(device) -> float | None:
    """Peak memory PyTorch has reserved on a CUDA device in this process (GiB): what training reports so the
    Slicer module can show it without querying the GPU itself. None on other devices."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
