"""The child process that runs `meddinov3 segment`, read without blocking the caller (no Slicer, no Qt).

`ChildProcess(command)` starts the command in its own process group (session on POSIX), with one reader
thread per pipe: stdout lines that parse as JSON objects are queued as events, other lines and stderr are
kept (the last ones) for error messages. `drain()` returns the queued events on the caller's thread, so
MRML changes stay on the thread that polls. `kill()` ends the whole process tree.
"""

from __future__ import annotations

import collections
import json
import queue
import subprocess
import threading

from meddinov3 import processes
from meddinov3.processes import child_environment, kill_process_tree, own_group_options

__all__ = ["ChildProcess", "child_environment", "errorMessageFromChild", "python_executable"]

_TAIL_LINES = 50


def python_executable() -> str:
    """Python for the child: Slicer's `PythonSlicer` inside Slicer (the one beside the running application first),
    else the running interpreter (see `meddinov3.processes.python_executable`)."""
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    return processes.python_executable(getattr(app, "slicerHome", "") if app is not None else None)


class ChildProcess:
    """A command whose stdout carries JSON events, one per line."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None):
        self.command = [str(c) for c in command]
        self._events: queue.Queue = queue.Queue()
        self.stdoutTail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
        self.stderrTail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env if env is not None else child_environment(), cwd=cwd, text=True, encoding="utf-8",
            errors="replace", bufsize=1, **own_group_options())  # its own process group: kill() reaches all it starts
        self._threads = [
            threading.Thread(target=self._readStdout, name="meddinov3-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="meddinov3-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _readStdout(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._events.put(event)
            else:
                self.stdoutTail.append(line)

    def _readStderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self.stderrTail.append(line)

    def drain(self) -> list[dict]:
        """Events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def returncode(self) -> int | None:
        """None while running. Once the process ended, waits briefly for the readers to see the pipes close."""
        code = self.process.poll()
        if code is not None:
            for thread in self._threads:
                thread.join(timeout=2.0)
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode()

    def kill(self, timeout: float = 1.0) -> None:
        """Kill the process and everything it started; returns once it is gone (or after `timeout`)."""
        if self.process.poll() is not None:
            return
        # the child leads its own process group (its pid): that reaches the interpreter that PythonSlicer, a
        # launcher that forwards no signal, started as its child
        kill_process_tree(self.process.pid, group=self.process.pid)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def errorMessageFromChild(returncode: int, failedMessage: str | None, stderrLines: list[str]) -> str:
    """One line describing why the child failed: its `failed` event, else its last stderr line."""
    message = (failedMessage or "").strip()
    if not message:
        lines = [line.strip() for line in stderrLines if line.strip()]
        message = lines[-1] if lines else f"the segmentation process exited with code {returncode}"
    for prefix in ("meddinov3 segment: error: ", "meddinov3 segment: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    lower = message.lower()
    if "out of memory" in lower and ("cuda" in lower or "gpu" in lower or "outofmemory" in lower.replace(" ", "")):
        message = (f"The GPU ran out of memory ({message}). Try a smaller batch size, an ROI, fast mode, "
                   "or the CPU device.")
    return message.splitlines()[0] if message else message

