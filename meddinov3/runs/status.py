"""`status.json`: what a training or pretraining run says about itself, and what a reader concludes from it.

Written by the run (`RunStatus`); read by `meddinov3 info`, by a later run into the same folder (`open_run`) and by
the Slicer Train module reattaching to a job (torch-free: the Slicer Lib imports this module).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from ..files import read_json, write_json
from ..processes import own_process_record, process_alive
from ..progress import jsonable

BUSY_STATES = ("starting", "running", "stopping")


class RunStatus:
    """The `status.json` of a training or pretraining run: what a reattaching GUI reads.

    States: "starting", "running", "stopping", "stopped", "finished", "failed" (readers add "killed", see
    `run_state`). The process records itself (pid, process group, start time: `processes.own_process_record`), so
    that a GUI that started it through a launcher (Slicer's `PythonSlicer`) stops the worker, not the launcher.
    """

    def __init__(self, run_dir: str | os.PathLike, total: int, kind: str, previous: dict | None = None):
        self.path = Path(run_dir) / "status.json"
        self.total = total
        self.kind = kind
        self._start = time.monotonic()
        self._start_step: int | None = None
        self.data: dict[str, Any] = {
            "kind": kind, "state": "starting", "step": 0, "total": total, "eta_s": None, **own_process_record(),
            "host": socket.gethostname(), "metrics": {}, "error": None, "started": time.time(), "updated": time.time(),
        }
        # `previous`: status.json of the run this one resumes (its step and metrics carry on); put back when the
        # resume fails before training starts, so a stopped run stays "stopped" instead of becoming "failed"
        self.previous = previous
        if previous:
            self.data.update(step=previous.get("step", 0), metrics=dict(previous.get("metrics") or {}))

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
            self.data["metrics"].update(jsonable(metrics))
        if error is not None:
            self.data["error"] = error
        self.data.update(jsonable(extra))
        self.data["updated"] = time.time()
        write_json(self.path, self.data)
        return self.data

    def put_back_previous(self) -> None:
        """status.json as it was before this launch (a resume that failed before training started)."""
        write_json(self.path, self.previous)

    @staticmethod
    def read(run_dir: str | os.PathLike) -> dict | None:
        path = Path(run_dir) / "status.json"
        return read_json(path) if path.exists() else None


def run_process_alive(status: dict | None) -> bool:
    """True if the process that wrote `status` (a status.json) runs on this host, and is not another program that
    got its pid later."""
    return bool(status) and status.get("host") == socket.gethostname() and process_alive(
        status.get("pid"), status.get("pid_started") or status.get("started"))


def running_pid(status: dict | None) -> int | None:
    """The pid of the live process on this host that `status` (a status.json) says uses its run folder.

    A dead pid, or one reused by a process started after the run recorded itself, is not a running run.
    """
    if not status or status.get("state") not in BUSY_STATES or status.get("pid") == os.getpid():
        return None
    return status.get("pid") if run_process_alive(status) else None


def run_state(status: dict | None) -> str | None:
    """The state of a run as its status.json says, or "killed": a run busy on this host whose process is gone
    without writing a final state (the kernel's out-of-memory killer, `kill -9`, a crash). A busy run on another
    host keeps its state: its process cannot be checked from here."""
    if not status:
        return None
    state = status.get("state")
    if state in BUSY_STATES and status.get("host") == socket.gethostname() and status.get("pid") != os.getpid() \
            and not run_process_alive(status):
        return "killed"
    return state


def killed_message(run_dir: str | os.PathLike, status: dict) -> str:
    """What happened to a killed run and how to continue it (one line)."""
    verb = "pretrain" if status.get("kind") == "pretrain" else "train"
    return (f"{run_dir}: the {verb} process (pid {status.get('pid')}) was killed at step {status.get('step', 0)} of "
            f"{status.get('total')} without saving its state (out of memory, kill -9 or a crash); "
            f"`meddinov3 {verb} --out {run_dir} --resume` continues it from its last checkpoint")


def is_finished(status: dict | None) -> bool:
    """True when `status` says its run trained all of its steps (a `--resume` then has nothing to do)."""
    return bool(status) and status.get("state") == "finished" and status.get("step") == status.get("total")
