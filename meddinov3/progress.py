"""Progress reporting shared by `segment`, `train` and `pretrain`.

Three consumers: a person at a terminal (tqdm bar), the Slicer modules (one JSON object per line on stdout,
`--json-progress`), and a later Slicer session reattaching to a job (`status.json` in the run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .files import read_json, write_json
from .processes import own_process_record, process_alive


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


class RunStopped(Exception):
    """SIGTERM / SIGINT outside the training loop (start-up, final save): raised from the signal handler."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal = signal_name


@contextlib.contextmanager
def report_failure(status: RunStatus | None, progress: Progress, user_errors: tuple[type, ...] = ()):
    """Record how a run that raised ended, in status.json and as an event.

    `RunStopped` (a signal during start-up) is a clean stop: state "stopped", a `stopped` event, not re-raised.
    Anything else is "failed" and re-raised: a user error (one of `user_errors`) is reported by its message alone,
    anything else with its type name; a resume that fails before training starts puts the previous status back.
    `status` is None on the ranks of a distributed run that do not report.
    """
    try:
        yield
    except RunStopped as e:
        if status is not None:
            status.update(state="stopped")
            progress.event("stopped", step=status.data["step"], signal=e.signal)
    except BaseException as e:
        if status is not None and not isinstance(e, SystemExit):
            message = str(e) if isinstance(e, user_errors) else f"{type(e).__name__}: {e}"
            if status.previous is not None and status.data["state"] == "starting":
                write_json(status.path, status.previous)
            else:
                status.update(state="failed", error=message)
            progress.event("failed", message=message)
        raise


class StopRequest:
    """SIGTERM / SIGINT during a training or pretraining run: remembered, so the loop saves and stops cleanly.

    `immediate`: raise `RunStopped` from the handler instead, for the start-up (dataset checks, caches), which
    has no point at which it could look at a flag; temporary files are removed as the exception unwinds.
    """

    def __init__(self, immediate: bool = False):
        self.requested = False
        self.signal = ""
        self.immediate = immediate
        self._previous: dict = {}

    def __call__(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.immediate:
            raise RunStopped(self.signal)

    def install(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


BUSY_STATES = ("starting", "running", "stopping")
# what the Slicer Train module writes into the run folder before it launches us: its job record and log
# (MedDINOv3TrainLib/jobs.py), the options it passes with --config and the dataset it exported from the scene
# (MedDINOv3TrainLib/logic.py startJob)
JOB_FILES = ("job.json", "log.txt", "job_config.json", "dataset")


class RunFolderError(Exception):
    """The run folder cannot be used as asked: busy, not empty, nothing to resume, or changed options."""


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


def open_run(run_dir: str | os.PathLike, section: str, resume: bool, explicit: dict | None = None,
             leftovers: tuple[str, ...] = ("status.json",), longer: str = "") -> tuple[dict | None, dict | None]:
    """Check, before anything is written, that a run may go into `run_dir`: (saved options, previous status.json).

    Refused (RunFolderError): a folder another live process trains into; a new run into a folder holding anything
    but `leftovers` (what a failed start of the same command leaves) and the Slicer module's JOB_FILES; `resume`
    without config.json, or with `explicit` options (those given on the command line, paths absolute) that differ
    from the saved `section` of config.json (only the device may change: `longer` says how to train further).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: is a file; --out names the run's folder")
    try:
        previous = RunStatus.read(run_dir)
    except (OSError, ValueError):
        previous = None  # a damaged status.json says nothing about a live process; it is rewritten
    pid = running_pid(previous)
    if pid is not None:
        raise RunFolderError(f"{run_dir}: another process (pid {pid}) is {previous['state']} this run; stop it "
                             "first, or choose another --out")
    config = run_dir / "config.json"
    killed = run_state(previous) == "killed"
    if resume:
        if not config.is_file():
            raise RunFolderError(f"{run_dir}: nothing to resume (no config.json)")
        saved = read_json(config)[section]
        changed = [f"{key} {value!r} (saved: {saved.get(key)!r})" for key, value in (explicit or {}).items()
                   if key not in ("out", "device") and saved.get(key) != value]
        if changed:
            raise RunFolderError(f"{run_dir}: --resume continues the saved configuration (only --device and "
                                 f"--json-progress may differ), but {'; '.join(changed)}; {longer}")
        if killed:
            print(f"[meddinov3] {killed_message(run_dir, previous)}: resuming", file=sys.stderr, flush=True)
        return saved, previous
    if config.exists():
        what = f"a run that was killed at step {previous.get('step', 0)}" if killed else "a run"
        raise RunFolderError(f"{run_dir}: already holds {what} (pass --resume to continue it, or another --out)")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (*leftovers, *JOB_FILES)) \
        if run_dir.is_dir() else []
    if others:
        raise RunFolderError(f"{run_dir}: not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
                             "choose a new or empty --out")
    return None, previous


def absolute_path(path: str | os.PathLike) -> Path:
    """`path` absolute, `~` and `..` resolved, symbolic links kept (what the user named)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def absolute_paths(options: dict, paths: tuple[str, ...], paths_if_existing: tuple[str, ...] = ()) -> dict:
    """`options` with the values under `paths` (strings or lists of them) made absolute, and those under
    `paths_if_existing` when they name an existing file or folder (else they are model names): config.json then
    works from any working directory (`--resume`, `--config`)."""

    def absolute(value):
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return str(absolute_path(value)) if isinstance(value, str) and value else value

    out = dict(options)
    for key in set(paths) & set(out):
        out[key] = absolute(out[key])
    for key in set(paths_if_existing) & set(out):
        if isinstance(out[key], str) and Path(out[key]).expanduser().exists():
            out[key] = absolute(out[key])
    return out


def is_finished(status: dict | None) -> bool:
    return bool(status) and status.get("state") == "finished" and status.get("step") == status.get("total")


def peak_gpu_memory_gb(device) -> float | None:
    """Peak memory PyTorch has reserved on a CUDA device in this process (GiB): what training reports so the
    Slicer module can show it without querying the GPU itself. None on other devices."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
