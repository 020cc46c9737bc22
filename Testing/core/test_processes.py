"""meddinov3.processes: liveness without psutil, pid reuse, stopping a tree through a launcher that forwards nothing.

The POSIX paths run for real. The Windows branch (ctypes OpenProcess / GetExitCodeProcess / GetProcessTimes,
taskkill) cannot run here: its kernel32 calls are replaced by a recording fake (said so where it is used).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from meddinov3 import processes
from meddinov3.processes import kill_process_tree, own_process_record, process_alive, process_start_time

pytestmark = pytest.mark.slicer_python  # process control without psutil, as in Slicer

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")


def _sleeper(**kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)


@posix_only
def test_alive_dead_zombie_and_reused_pid():
    assert process_alive(os.getpid())
    for nothing in (None, 0, -1, True, "123"):
        assert not process_alive(nothing)
    spawned = time.time()
    child = _sleeper()
    try:
        assert process_alive(child.pid) and process_alive(child.pid, started=time.time())
        assert abs(process_start_time(child.pid) - spawned) < processes.START_TOLERANCE_S
        # a record written a minute before this process started names another program that got the same pid
        assert not process_alive(child.pid, started=spawned - 60)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped: a zombie
        os.kill(child.pid, 0)  # which still answers signal 0
        assert not process_alive(child.pid), "a zombie is not alive"
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


@posix_only
def test_kill_process_tree_reaches_the_grandchild_of_a_launcher_that_ignores_signals(tmp_path):
    """A launcher in its own session that ignores SIGTERM and starts the real worker as its child (as Slicer's
    PythonSlicer does): killing the group ends both."""
    launcher = textwrap.dedent(f"""
        import signal, subprocess, sys
        signal.signal(signal.SIGTERM, lambda *a: None)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(tmp_path / "pid")!r}, "w").write(str(child.pid))
        child.wait()
    """)
    process = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    worker = int((tmp_path / "pid").read_text())
    process.send_signal(signal.SIGTERM)  # forwarded nowhere, ignored
    time.sleep(0.3)
    assert process.poll() is None and process_alive(worker)
    kill_process_tree(process.pid, group=process.pid)
    assert process.wait(5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while process_alive(worker):
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.02)


@posix_only
def test_never_signals_its_own_process_group():
    code = ("import os, signal; from meddinov3.processes import signal_process_tree; "
            "signal_process_tree(None, os.getpgid(0), signal.SIGTERM); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          start_new_session=True)  # its own group: a mistake would end it, not the test run
    assert done.returncode == 0 and done.stdout.strip() == "alive", done


def test_own_process_record():
    record = own_process_record()
    assert record["pid"] == os.getpid()
    if os.name != "nt":
        assert record["pgid"] == os.getpgid(0) and record["pid_started"] <= time.time()


class FakeKernel32:
    """Stands in for Windows' kernel32 (mocked: no Windows here). Processes: pid -> (exit code, creation FILETIME)."""

    def __init__(self, processes_: dict, denied=()):
        self.processes = processes_
        self.denied = set(denied)
        self.closed = []
        self.last_error = 0

    def OpenProcess(self, access, inherit, pid):
        assert access == 0x1000  # PROCESS_QUERY_LIMITED_INFORMATION: enough, and allowed for other users' processes
        if pid in self.denied:
            self.last_error = 5
            return 0
        if pid not in self.processes:
            self.last_error = 87
            return 0
        return 1000 + pid

    def GetExitCodeProcess(self, handle, code_ref):
        code_ref._obj.value = self.processes[handle - 1000][0]
        return 1

    def GetProcessTimes(self, handle, creation, exit_, kernel, user):
        creation._obj.value = self.processes[handle - 1000][1]
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)
        return 1


def test_windows_branch_with_a_mocked_kernel32(monkeypatch):
    now = time.time()
    filetime = int(now * 1e7) + 116444736000000000
    fake = FakeKernel32({10: (259, filetime), 11: (0, filetime)}, denied={12})
    monkeypatch.setattr(processes, "_WINDOWS", True)
    monkeypatch.setattr(processes, "_kernel32", lambda: fake)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: fake.last_error, raising=False)
    assert process_alive(10)  # STILL_ACTIVE
    assert not process_alive(11)  # exited with code 0
    assert not process_alive(13)  # no such process
    assert process_alive(12)  # exists, another user's
    assert process_start_time(10) == pytest.approx(now, abs=1e-3)
    assert process_alive(10, started=now) and not process_alive(10, started=now - 60)  # a reused pid
    assert fake.closed and all(h in (1010, 1011) for h in fake.closed)

    calls = []
    monkeypatch.setattr(processes.subprocess, "run", lambda command, **kw: calls.append(command))
    kill_process_tree(10, group=10)
    processes.signal_process_tree(10, 10, signal.SIGTERM)  # no SIGTERM on Windows: the tree is ended
    assert calls == [["taskkill", "/F", "/T", "/PID", "10"]] * 2
    assert "pgid" not in own_process_record()


@posix_only
def test_own_group_options_make_the_child_lead_its_group():
    """What both modules start their children with: the child's process group is its own pid, so that
    `kill_process_tree(pid, group=pid)` reaches what it starts, and never ours."""
    for detached in (False, True):
        child = _sleeper(**processes.own_group_options(detached=detached))
        try:
            assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        finally:
            kill_process_tree(child.pid, group=child.pid)
            child.wait()


def test_windows_group_options(monkeypatch):
    """Windows (flags only; no Windows here): a new process group without a window, `detached` off the console."""
    monkeypatch.setattr(processes, "_WINDOWS", True)
    for name, value in (("CREATE_NEW_PROCESS_GROUP", 0x200), ("CREATE_NO_WINDOW", 0x8000000), ("DETACHED_PROCESS", 0x8)):
        monkeypatch.setattr(subprocess, name, value, raising=False)
    assert processes.own_group_options() == {"creationflags": 0x200 | 0x8000000}
    assert processes.own_group_options(detached=True) == {"creationflags": 0x200 | 0x8000000 | 0x8}


def test_child_environment_and_python(tmp_path):
    """The child finds this `meddinov3` (first on PYTHONPATH, once) with unbuffered output; its Python is
    PythonSlicer of the Slicer home given, else the running interpreter."""
    root = str(processes._PACKAGE_ROOT)
    env = processes.child_environment({"PYTHONPATH": os.pathsep.join(["/elsewhere", root]), "KEEP": "1"})
    assert env == {"PYTHONPATH": os.pathsep.join(["/elsewhere", root]), "KEEP": "1", "PYTHONUNBUFFERED": "1"}
    env = processes.child_environment({})
    assert env["PYTHONPATH"] == root and (processes._PACKAGE_ROOT / "meddinov3" / "processes.py").is_file()
    assert processes.child_environment()["PATH"] == os.environ["PATH"]
    assert processes.python_executable() == sys.executable
    launcher = tmp_path / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    launcher.parent.mkdir()
    launcher.write_text("")
    assert processes.python_executable(tmp_path) == str(launcher)
