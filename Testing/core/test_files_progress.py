"""Atomic writing and progress reporting (shared by segment, train and pretrain)."""

import io
import json
import os
import stat

import numpy as np
import pytest

from meddinov3.files import atomic_path, read_json, write_json
from meddinov3.progress import Progress, RunStatus


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out" / "labels.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert list(target.parent.iterdir()) == []


def test_atomic_path_replaces_with_normal_permissions(tmp_path):
    target = tmp_path / "status.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_progress_json_lines_are_valid_json_with_numpy_values():
    stream = io.StringIO()
    progress = Progress(json_lines=True, stream=stream)
    progress.event("started", model="m", value=np.float32(0.5), bad=float("nan"))
    progress.update(3, 12, stage="inference")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "started" and lines[0]["value"] == 0.5 and lines[0]["bad"] is None
    assert lines[1]["event"] == "progress" and lines[1]["fraction"] == 0.25 and lines[1]["stage"] == "inference"


def test_run_status_is_rewritten_atomically_with_eta(tmp_path):
    status = RunStatus(tmp_path, total=100, kind="train")
    status.update(state="running", step=10)
    status.update(step=20, metrics={"loss": np.float64(0.25)})
    data = read_json(tmp_path / "status.json")
    assert data["state"] == "running" and data["step"] == 20 and data["total"] == 100
    assert data["metrics"] == {"loss": 0.25} and data["eta_s"] is not None and data["eta_s"] >= 0
    assert RunStatus.read(tmp_path)["pid"] == os.getpid()
    write_json(tmp_path / "other.json", {"a": 1})
    assert RunStatus.read(tmp_path / "missing") is None


def test_report_failure_records_the_error_and_reraises(tmp_path):
    from meddinov3.progress import report_failure

    class UserError(Exception):
        pass

    stream = io.StringIO()
    progress = Progress(json_lines=True, stream=stream)
    status = RunStatus(tmp_path, total=10, kind="train")
    with pytest.raises(UserError):
        with report_failure(status, progress, (UserError,)):
            raise UserError("case7: label value 9 is not declared")
    assert read_json(tmp_path / "status.json")["error"] == "case7: label value 9 is not declared"
    with pytest.raises(ZeroDivisionError):
        with report_failure(status, progress, (UserError,)):
            1 / 0
    data = read_json(tmp_path / "status.json")
    assert data["state"] == "failed" and data["error"].startswith("ZeroDivisionError: ")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["failed", "failed"]
    status.update(state="stopped", error="")
    with pytest.raises(SystemExit):
        with report_failure(status, progress, (UserError,)):
            raise SystemExit(0)
    assert read_json(tmp_path / "status.json")["state"] == "stopped"


def test_atomic_dir_gives_its_files_normal_permissions(tmp_path):
    from meddinov3.files import atomic_dir

    with atomic_dir(tmp_path / "model") as tmp:
        fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors creates it
        os.close(fd)
        (tmp / "sub").mkdir()
        fd = os.open(tmp / "sub" / "w.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "sub/w.bin"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o666 & ~mask, name


def _status(tmp_path, **fields):
    import socket

    data = {"kind": "train", "state": "running", "step": 3, "total": 10, "pid": os.getpid(),
            "host": socket.gethostname(), **fields}
    write_json(tmp_path / "status.json", data)
    return data


def test_running_pid_needs_a_live_process_on_this_host_not_a_reused_pid(tmp_path):
    import subprocess
    import sys
    import time

    from meddinov3.progress import run_state, running_pid

    before = time.time() - 60  # a run that recorded itself a minute ago
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert running_pid(_status(tmp_path, pid=trainer.pid)) == trainer.pid
        for state in ("starting", "stopping"):
            assert running_pid(_status(tmp_path, pid=trainer.pid, state=state)) == trainer.pid
        assert running_pid(_status(tmp_path, pid=trainer.pid, state="stopped")) is None
        assert running_pid(_status(tmp_path, pid=trainer.pid, host="another-host")) is None
        # the pid now belongs to a process that started after the run recorded itself: another program
        assert running_pid(_status(tmp_path, pid=trainer.pid, started=before)) is None
        assert run_state(_status(tmp_path, pid=trainer.pid, started=before)) == "killed"
        assert run_state(_status(tmp_path, pid=trainer.pid)) == "running"
    finally:
        trainer.kill()
        trainer.wait()
    assert running_pid(_status(tmp_path, pid=trainer.pid)) is None  # dead
    assert run_state(_status(tmp_path, pid=trainer.pid)) == "killed"
    assert run_state(_status(tmp_path, pid=trainer.pid, host="another-host")) == "running"  # cannot be checked
    assert run_state(_status(tmp_path, pid=trainer.pid, state="stopped")) == "stopped"


def test_open_run_refuses_a_busy_or_foreign_folder(tmp_path):
    import subprocess
    import sys

    from meddinov3.progress import RunFolderError, open_run

    run = tmp_path / "run"
    run.mkdir()
    for name in ("job.json", "log.txt", "job_config.json"):  # the Slicer module's job files, written before it
        (run / name).write_text("{}")  # launches the trainer, and the dataset it exported
    (run / "dataset").mkdir()
    _status(run, state="failed", pid=1)  # a failed start of the same command
    assert open_run(run, "train", resume=False)[0] is None
    (run / "model").mkdir()
    with pytest.raises(RunFolderError, match=r"not empty \(model\)"):
        open_run(run, "train", resume=False)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        open_run(run, "train", resume=True)
    write_json(run / "config.json", {"train": {"data": "/d", "steps": 4, "device": "cpu", "out": str(run)}})
    with pytest.raises(RunFolderError, match="already holds a run"):
        open_run(run, "train", resume=False)
    saved, previous = open_run(run, "train", resume=True, explicit={"out": "x", "device": "cuda", "steps": 4})
    assert saved["steps"] == 4 and previous["state"] == "failed"
    with pytest.raises(RunFolderError, match=r"--resume continues the saved configuration .*steps 8 \(saved: 4\); "
                                             r"train longer so"):
        open_run(run, "train", resume=True, explicit={"steps": 8}, longer="train longer so")
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _status(run, pid=trainer.pid)
        with pytest.raises(RunFolderError, match=f"another process \\(pid {trainer.pid}\\) is running"):
            open_run(run, "train", resume=True)
    finally:
        trainer.kill()
        trainer.wait()
    assert open_run(run, "train", resume=True)[0]["steps"] == 4  # its process is gone
    (tmp_path / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(RunFolderError, match=r"notes\.txt: is a file; --out names the run's folder"):
            open_run(tmp_path / "notes.txt", "train", resume=resume)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_config_file_must_hold_an_object(tmp_path):
    from meddinov3.train import TrainConfig

    for text in ("[1, 2]", '"steps"', '{"train": [1]}'):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match="expected a JSON object of training options"):
            TrainConfig.from_file(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"train": {"steps": 3}}')  # a run's config.json
    assert TrainConfig.from_file(tmp_path / "c.json").steps == 3


def test_report_failure_keeps_a_resumed_runs_status_until_it_starts(tmp_path):
    from meddinov3.progress import RunStopped, report_failure

    previous = _status(tmp_path, state="stopped", step=3)
    stream = io.StringIO()
    progress = Progress(json_lines=True, stream=stream)
    status = RunStatus(tmp_path, total=10, kind="train", previous=previous)
    with pytest.raises(ValueError):
        with report_failure(status, progress):
            status.update(state="starting")
            raise ValueError("data/nn: no such dataset folder")
    assert read_json(tmp_path / "status.json") == previous  # still stopped, still resumable
    with report_failure(status, progress):  # a signal during the start-up: a clean stop, not an error
        raise RunStopped("SIGTERM")
    data = read_json(tmp_path / "status.json")
    assert data["state"] == "stopped" and data["step"] == 3
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["failed", "stopped"] and events[1]["signal"] == "SIGTERM"


def test_atomic_dir_replacing_a_file_leaves_nothing_behind(tmp_path):
    from meddinov3.files import atomic_dir

    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "model.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "model.json").is_file()
