"""Training jobs: `meddinov3 train|pretrain` child processes that outlive the GUI (no Slicer, no Qt).

A job is its run folder. The child runs in its own session / process group with stdout and stderr going to
`RUN_DIR/log.txt` (no pipe the GUI has to drain), so closing the module or Slicer does not stop it. What a later
session needs to reattach is on disk:

- `job.json`  (written here): mode, command, pid of the process started here, start time, data, base, launches
  (one per start / resume), time of the last stop request, registered model reference.
- `status.json` (written by the trainer): state, step, total, eta_s, metrics, error, and the trainer's own pid,
  process group and start time.
- `metrics.jsonl`, `log.txt`, `checkpoints/`, `model/` (fine-tune) or `backbone/` (pretrain).

Two processes: inside Slicer the process started here is `PythonSlicer`, a launcher (CTKAppLauncher) that starts
the real interpreter as its child and forwards no signal. Running, Stop, Resume and Delete therefore look at both:
the job runs while either lives, Stop signals the trainer and the process groups of both (SIGTERM: the trainer saves
a checkpoint; Windows: the trees are ended with taskkill), Resume and Delete are refused while either runs.

`TrainJob.status()` merges both files: a trainer that died while status.json still says "running" is reported as
"killed" (out of memory, kill -9...; Resume continues from the last checkpoint), a process that ended without
writing a status as "failed" with the end of the log, and either as "stopped" if Stop was asked for (e.g. during its
start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from meddinov3.files import read_json_or, write_json
from meddinov3.processes import kill_process_tree, own_group_options, process_alive, signal_process_tree
from meddinov3.runs import MetricsFollower, run_process_alive, run_state

FINAL_STATES = ("finished", "stopped", "failed", "killed")
MODES = ("finetune", "pretrain")

#: Popen objects of the children this process launched, by run folder: reaped here so they never linger as
#: zombies.
_CHILDREN: dict[str, subprocess.Popen] = {}


class TrainJobError(RuntimeError):
    """A job request that cannot be done (bad folder, job still running...); one-line message."""


def jobsRoot() -> Path:
    """Default parent of new run folders: `MEDDINOV3_HOME/jobs`."""
    from meddinov3.resources import user_dir

    root = user_dir() / "jobs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def registryPath() -> Path:
    from meddinov3.resources import user_dir

    return user_dir() / "train_jobs.json"


def rememberedFolders() -> list[str]:
    data = read_json_or(registryPath())
    return [str(p) for p in data] if isinstance(data, list) else []


def remember(runDir) -> None:
    path = str(Path(runDir).resolve())
    folders = rememberedFolders()
    if path not in folders:
        write_json(registryPath(), folders + [path])


def forget(runDir) -> None:
    path = str(Path(runDir).resolve())
    folders = rememberedFolders()
    if path in folders:
        write_json(registryPath(), [p for p in folders if p != path])


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200 * max(lines, 1) - 4096))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines > 0 else []


def _lastError(lines: list[str]) -> str:
    """The most telling line of a log tail: a `failed` JSON event, an error line, else the last line."""
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "failed" and event.get("message"):
            return str(event["message"])
    lines = [line for line in lines if not line.startswith("# ")]  # the launch headers written here (commands)
    for line in reversed(lines):
        text = line.strip()
        if "error" in text.lower() and not text.startswith("{"):
            return text
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "the training process ended without a status"


class TrainJob:
    """One training / pretraining run folder and its (possibly detached) process."""

    def __init__(self, runDir, onFinished=None):
        self.runDir = Path(runDir).resolve()
        #: called with (job, status) once when this object first sees the job finished (model registration).
        self.onFinished = onFinished
        self._finishedSeen = False
        self._metrics = MetricsFollower(self.runDir / "metrics.jsonl")

    # -- files ------------------------------------------------------------------------------------

    @property
    def jobFile(self) -> Path:
        return self.runDir / "job.json"

    @property
    def logFile(self) -> Path:
        return self.runDir / "log.txt"

    def info(self) -> dict:
        return read_json_or(self.jobFile) or {}

    @property
    def mode(self) -> str:
        return self.info().get("mode", "finetune")

    @property
    def name(self) -> str:
        return self.runDir.name

    def __repr__(self) -> str:
        return f"TrainJob({str(self.runDir)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainJob) and other.runDir == self.runDir

    def __hash__(self) -> int:
        return hash(self.runDir)

    # -- launching --------------------------------------------------------------------------------

    @classmethod
    def launch(cls, runDir, command: list[str], info: dict, env: dict | None = None, onFinished=None) -> "TrainJob":
        job = cls(runDir, onFinished=onFinished)
        job.runDir.mkdir(parents=True, exist_ok=True)
        record = {**info, "command": [str(c) for c in command], "launches": []}
        write_json(job.jobFile, record)
        job._spawn(command, env)
        return job

    def _spawn(self, command: list[str], env: dict | None) -> None:
        started = time.time()
        with open(self.logFile, "ab") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, command))}\n".encode())
            log.flush()
            process = subprocess.Popen([str(c) for c in command], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=str(self.runDir), env=env,
                                       **own_group_options(detached=True))  # closing Slicer does not reach it
        _CHILDREN[str(self.runDir)] = process
        record = self.info()
        record.update(pid=process.pid, started=started, lastCommand=[str(c) for c in command])
        record.setdefault("created", started)
        record.setdefault("launches", []).append({"pid": process.pid, "started": started,
                                                   "command": [str(c) for c in command]})
        write_json(self.jobFile, record)

    # -- state ------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of the process started here (PythonSlicer, a launcher, inside Slicer)."""
        return self.info().get("pid")

    def _launcherAlive(self, info: dict) -> bool:
        child = _CHILDREN.get(str(self.runDir))
        if child is not None and child.pid == info.get("pid"):
            return child.poll() is None  # ours: reaped here
        return process_alive(info.get("pid"), info.get("started"))

    def _processes(self) -> tuple[dict, dict | None, bool, bool]:
        """(job.json, status.json, launcher alive, trainer alive): the trainer as it recorded itself."""
        info, raw = self.info(), self.rawStatus()
        return info, raw, self._launcherAlive(info), run_process_alive(raw)

    def isProcessRunning(self) -> bool:
        """True while the process started here or the trainer (its child inside Slicer) runs."""
        _, _, launcher, trainer = self._processes()
        return launcher or trainer

    def rawStatus(self) -> dict | None:
        """The trainer's status.json as written (None before it exists)."""
        data = read_json_or(self.runDir / "status.json")
        return data if isinstance(data, dict) else None

    def status(self) -> dict:
        """state, step, total, eta_s, metrics, error (+ pid, mode, runDir); see the module docstring."""
        info, raw, launcher, trainer = self._processes()
        raw = raw or {}
        alive = launcher or trainer
        status = {"state": None, "step": 0, "total": None, "eta_s": None, "metrics": {}, "error": None, **raw}
        started = info.get("started") or 0
        # written by this launch's trainer (started after `started` was taken): a status the previous trainer wrote
        # when it stopped, even a moment before Resume, is the previous launch's
        fresh = bool(raw) and float(raw.get("updated", raw.get("started", 0)) or 0) >= started
        ended = not alive and (status["state"] not in FINAL_STATES or not fresh)
        if alive and not fresh:
            # status.json is absent or from the previous launch (e.g. just resumed): the child is starting
            status.update(state="starting", error=None, eta_s=None)
        elif ended and float(info.get("stopRequested") or 0) >= started:
            # stopped (SIGTERM) before the trainer took over its signals: nothing to resume from this launch
            status.update(state="stopped", error=None, eta_s=None)
        elif ended and fresh and run_state(raw) == "killed":
            # the trainer died in the middle of its work without a word: out of memory, kill -9, a crash
            status.update(state="killed", eta_s=None, logTail=self.logTail(40), error=(
                f"The training process (pid {raw.get('pid')}) was killed at step {raw.get('step', 0)} of "
                f"{raw.get('total')} without saving its state (out of memory, kill -9 or a crash). Resume continues "
                "from its last checkpoint."))
        elif ended:
            # ended without a final status (a relaunch that failed before writing one, a crash at start-up)
            tail = self.logTail(40)
            status["state"] = "failed"
            status["error"] = (raw.get("error") if fresh else None) or _lastError(tail)
            status["logTail"] = tail
        status.update(mode=info.get("mode", "finetune"), runDir=str(self.runDir), pid=info.get("pid"),
                      trainerPid=raw.get("pid") if fresh else None, processRunning=alive)
        if status["state"] == "finished" and not self._finishedSeen:
            self._finishedSeen = True
            if self.onFinished is not None:
                self.onFinished(self, status)
        return status

    @property
    def state(self) -> str:
        return self.status()["state"]

    def isRunning(self) -> bool:
        return self.isProcessRunning()

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> str:
        """Poll until the job reaches a final state and its processes exited (returns the state), or `timeout`
        seconds passed (returns the current state)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            state = status["state"]
            if state in FINAL_STATES and not status["processRunning"]:
                return state  # the process has also exited (it writes its final status just before)
            if deadline is not None and time.monotonic() >= deadline:
                return state
            time.sleep(interval)

    # -- control ----------------------------------------------------------------------------------

    def _signal(self, kill: bool) -> None:
        """SIGTERM (or SIGKILL with `kill`) to the trainer and to the process groups of the trainer and of the
        process started here (its own session's leader): whatever the launcher between them forwards. Windows:
        both trees are ended (taskkill /T /F)."""
        info, raw, launcher, trainer = self._processes()
        raw = raw or {}  # no status.json yet: Stop during start-up reaches the launcher's group only
        send = kill_process_tree if kill else signal_process_tree
        signalled = set()  # process groups: the trainer is usually in the launcher's, and is signalled once
        processes = ((trainer, raw.get("pid"), raw.get("pgid")), (launcher, info.get("pid"), info.get("pid")))
        for alive, pid, group in processes:
            if alive and (group is None or group not in signalled):
                send(pid, group)
                signalled.add(group)

    def stop(self, timeout: float = 15.0) -> str:
        """Ask the trainer to stop (SIGTERM: it saves a resumable checkpoint); waits up to `timeout` s."""
        if not self.isProcessRunning():
            return self.status()["state"]
        record = self.info()
        record["stopRequested"] = time.time()  # a child killed by this signal before its handler is "stopped"
        write_json(self.jobFile, record)
        self._signal(kill=False)
        return self.wait(timeout)

    def kill(self) -> None:
        """Kill the trainer and the process started here at once (no checkpoint beyond the last periodic one)."""
        if not self.isProcessRunning():
            return
        self._signal(kill=True)
        child = _CHILDREN.get(str(self.runDir))
        if child is not None:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def resume(self, python: str | None = None, env: dict | None = None, device: str | None = None) -> "TrainJob":
        """Relaunch with --resume (continues from checkpoints/latest.pt, step count included)."""
        if self.isProcessRunning():
            raise TrainJobError(f"Job {self.name} is still running: stop it before resuming it.")
        info = self.info()
        if not info:
            raise TrainJobError(f"{self.runDir} is not a job folder (no job.json).")
        if not (self.runDir / "config.json").is_file():
            raise TrainJobError(f"Job {self.name} cannot be resumed: it stopped before writing its configuration.")
        command = resumeCommand(info, str(self.runDir), python=python, device=device)
        self._finishedSeen = False
        self._spawn(command, env)
        return self

    def delete(self) -> None:
        """Remove the run folder (refused while the process runs)."""
        if self.isProcessRunning():
            raise TrainJobError(f"Job {self.name} is running: stop it before deleting it.")
        _CHILDREN.pop(str(self.runDir), None)
        forget(self.runDir)
        shutil.rmtree(self.runDir, ignore_errors=True)

    # -- outputs ----------------------------------------------------------------------------------

    def logTail(self, n: int = 50) -> list[str]:
        return _tail(self.logFile, n)

    def metrics(self) -> list[dict]:
        """Records of metrics.jsonl (`kind` "step": loss, lr...; "validation": dice per class, mean_dice).

        Incremental: each call parses only the lines appended since the last one (the Widget asks every second;
        a long run has tens of thousands of records). A shorter file (a run started anew) is read again.
        """
        return self._metrics.read()

    def modelPath(self) -> str:
        return str(self.runDir / ("backbone" if self.mode == "pretrain" else "model"))

    def hasModel(self) -> bool:
        return (Path(self.modelPath()) / "model.json").is_file() or Path(self.modelPath()).is_dir() and any(
            Path(self.modelPath()).iterdir())


def resumeCommand(info: dict, runDir: str, python: str | None = None, device: str | None = None) -> list[str]:
    """The command that continues a job: its original verb, `--out`, `--resume` (and the device)."""
    original = list(info.get("command") or [])
    python = python or (original[0] if original else sys.executable)
    verb = "pretrain" if info.get("mode") == "pretrain" else "train"
    command = [python, "-m", "meddinov3.cli", verb, "--out", runDir, "--resume"]  # the run's saved config
    device = device or info.get("device")
    if device:
        command += ["--device", str(device)]
    return command + ["--json-progress"]


def findJobs(root=None) -> list[TrainJob]:
    """Job folders (with job.json) under `root` (default jobsRoot()) and in the registry, newest first."""
    folders = []
    roots = [Path(root)] if root is not None else [jobsRoot()]
    for base in roots:
        if base.is_dir():
            folders += [p for p in base.iterdir() if (p / "job.json").is_file()]
    if root is None:
        folders += [Path(p) for p in rememberedFolders() if (Path(p) / "job.json").is_file()]
    unique = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), folder)
    jobs = [TrainJob(p) for p in unique]
    jobs.sort(key=lambda j: j.info().get("created", 0), reverse=True)
    return jobs
