"""Starting a child in its own process group, telling whether a process is alive, and stopping it with everything
it started: the one place for process handling of the core and both Slicer modules (torch-free, no Slicer import).

No psutil: 3D Slicer does not ship it. POSIX: `os.kill(pid, 0)`, and on Linux `/proc/PID/stat` for zombies and the
start time. Windows: `OpenProcess` + `GetExitCodeProcess` (STILL_ACTIVE) and `GetProcessTimes` through ctypes,
`taskkill /T /F` for a tree.

Why the worker's own pid matters: inside Slicer, `PythonSlicer` is a launcher (CTKAppLauncher) that starts the real
interpreter as its child and forwards no signal. A job therefore records the pid and process group of the process
that does the work (`status.json`, written by that process), and stops that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

#: A process that started more than this many seconds after the time a record says it was running is another
#: program that got the same pid. Linux's boot time is in whole seconds, hence the margin.
START_TOLERANCE_S = 2.0

_WINDOWS = os.name == "nt"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding this `meddinov3` package
_STILL_ACTIVE = 259
_ERROR_ACCESS_DENIED = 5
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_FILETIME_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601-01-01


def _kernel32():
    """Windows' kernel32 (a seam: tests on other systems replace it)."""
    import ctypes

    return ctypes.WinDLL("kernel32", use_last_error=True)


def _windows_open(pid: int):
    """(kernel32, handle or None, access denied?) for a query of `pid`."""
    import ctypes

    kernel32 = _kernel32()
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, int(pid))
    denied = not handle and ctypes.get_last_error() == _ERROR_ACCESS_DENIED
    return kernel32, handle or None, denied


def _windows_alive(pid: int) -> bool:
    import ctypes

    kernel32, handle, denied = _windows_open(pid)
    if handle is None:
        return denied  # denied: it exists (another user's); else no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _windows_start_time(pid: int) -> float | None:
    import ctypes

    kernel32, handle, _ = _windows_open(pid)
    if handle is None:
        return None
    try:
        times = [ctypes.c_ulonglong() for _ in range(4)]  # creation, exit, kernel, user (FILETIMEs)
        if not kernel32.GetProcessTimes(handle, *map(ctypes.byref, times)):
            return None
        return (times[0].value - _FILETIME_EPOCH) / 1e7
    finally:
        kernel32.CloseHandle(handle)


def _linux_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None (gone, or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _linux_start_time(pid: int) -> float | None:
    fields = _linux_stat(pid)
    if fields is None:
        return None
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None when it is gone or the system does not say
    (macOS without psutil)."""
    if _WINDOWS:
        return _windows_start_time(pid)
    return _linux_start_time(pid)


def _posix_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    if Path("/proc/self/stat").exists():  # Linux: a zombie (exited, not yet reaped) still answers signal 0
        fields = _linux_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    return True


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """True if `pid` is a live process (not a zombie).

    `started`: a time (seconds since the epoch) at which the process was known to run, e.g. what it wrote into its
    status.json. A process with that pid that started later is another program that reuses the pid: False.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    alive = _windows_alive(pid) if _WINDOWS else _posix_alive(pid)
    if alive and started is not None:
        begun = process_start_time(pid)
        if begun is not None and begun > float(started) + START_TOLERANCE_S:
            return False
    return alive


def _safe_group(group: int | None) -> int | None:
    """`group` unless it is missing or our own process group (never signal ourselves and our parents)."""
    if not group or group <= 0 or _WINDOWS:
        return None
    try:
        return None if group == os.getpgid(0) else group
    except OSError:
        return None


def signal_process_tree(pid: int | None, group: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to `pid` and to its process `group` (POSIX; everything a launcher and the worker started, when
    the launcher was started in its own session). On Windows there is no such signal: the tree is killed."""
    if _WINDOWS:
        kill_process_tree(pid)
        return
    group = _safe_group(group)
    if group:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        if pid and (not group or os.getpgid(int(pid)) != group):  # once: a second SIGTERM could cut short the
            os.kill(int(pid), sig)  # clean stop the first one started
    except (ProcessLookupError, PermissionError):
        pass


def kill_process_tree(pid: int | None, group: int | None = None) -> None:
    """Kill `pid` and what it started, at once: POSIX SIGKILL to `group` and `pid`; Windows `taskkill /T /F`
    (the tree as Windows records it)."""
    if _WINDOWS:
        if pid:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(int(pid))], capture_output=True)
        return
    signal_process_tree(pid, group, signal.SIGKILL)


def own_process_record() -> dict:
    """What a worker writes about itself so that another process can find and stop it: pid, process group
    (POSIX) and start time."""
    record = {"pid": os.getpid(), "pid_started": process_start_time(os.getpid())}
    if not _WINDOWS:
        record["pgid"] = os.getpgid(0)
    return record


def own_group_options(detached: bool = False) -> dict:
    """Keyword arguments for `subprocess.Popen` that make the child the leader of its own process group, so that
    `kill_process_tree(child.pid, group=child.pid)` reaches whatever it starts (the interpreter a launcher runs).

    POSIX: a new session, which also keeps the child running when the parent's terminal closes. Windows: a new
    process group without a console window; `detached` also leaves the parent's console (a training job that
    outlives Slicer)."""
    if not _WINDOWS:
        return {"start_new_session": True}
    flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    if detached:
        flags |= getattr(subprocess, "DETACHED_PROCESS", 0)
    return {"creationflags": flags}


def child_environment(base: dict | None = None) -> dict:
    """Environment for a child that runs `python -m meddinov3.cli`: `base` (default: ours) with the folder holding this
    `meddinov3` package first on PYTHONPATH (Slicer run from a checkout has it only on its own sys.path), and
    PYTHONUNBUFFERED set so that progress lines reach the reader as they are written.

    Returns a new dict; `base` is not changed."""
    env = dict(os.environ if base is None else base)
    root = str(_PACKAGE_ROOT)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_executable(application_home: str | os.PathLike | None = None) -> str:
    """The Python a child process runs: with `application_home` (a 3D Slicer's `slicer.app.slicerHome`), that
    Slicer's `bin/PythonSlicer` (else one on PATH), whose environment has Slicer's packages; else the running
    interpreter. PythonSlicer is a launcher that runs the real interpreter as its child (see above)."""
    if application_home is None:
        return sys.executable
    for name in ("PythonSlicer.exe", "PythonSlicer"):
        candidate = Path(application_home) / "bin" / name
        if str(application_home) and candidate.is_file():
            return str(candidate)
    import shutil

    return shutil.which("PythonSlicer") or sys.executable
