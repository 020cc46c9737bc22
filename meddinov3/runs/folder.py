"""Whether a run may go into a folder: checked before anything is written (torch-free)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..files import read_json
from .status import RunStatus, killed_message, run_state, running_pid

# what the Slicer Train module writes into the run folder before it launches us: its job record and log
# (MedDINOv3TrainLib/jobs.py), the options it passes with --config and the dataset it exported from the scene
# (MedDINOv3TrainLib/logic.py startJob)
JOB_FILES = ("job.json", "log.txt", "job_config.json", "dataset")


logger = logging.getLogger(__name__)


class RunFolderError(Exception):
    """The run folder cannot be used as asked: busy, not empty, nothing to resume, or changed options."""


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
    killed = run_state(previous) == "killed"
    if resume:
        return _saved_options(run_dir, section, explicit, longer), _announce_killed(run_dir, previous, killed)
    if (run_dir / "config.json").exists():
        what = f"a run that was killed at step {previous.get('step', 0)}" if killed else "a run"
        raise RunFolderError(f"{run_dir}: already holds {what} (pass --resume to continue it, or another --out)")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (*leftovers, *JOB_FILES)) \
        if run_dir.is_dir() else []
    if others:
        raise RunFolderError(f"{run_dir}: not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
                             "choose a new or empty --out")
    return None, previous


def _saved_options(run_dir: Path, section: str, explicit: dict | None, longer: str) -> dict:
    """The options a resumed run continues with: its config.json's `section`, which `explicit` may not change."""
    config = run_dir / "config.json"
    if not config.is_file():
        raise RunFolderError(f"{run_dir}: nothing to resume (no config.json)")
    saved = read_json(config)[section]
    changed = [f"{key} {value!r} (saved: {saved.get(key)!r})" for key, value in (explicit or {}).items()
               if key not in ("out", "device") and saved.get(key) != value]
    if changed:
        raise RunFolderError(f"{run_dir}: --resume continues the saved configuration (only --device and "
                             f"--json-progress may differ), but {'; '.join(changed)}; {longer}")
    return saved


def _announce_killed(run_dir: Path, previous: dict | None, killed: bool) -> dict | None:
    if killed:
        logger.info(f"{killed_message(run_dir, previous)}: resuming")
    return previous
