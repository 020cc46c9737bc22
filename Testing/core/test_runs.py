"""The run machinery both training loops use (`meddinov3.runs`): status.json, the run folder and its lock,
failure reporting, metrics.jsonl, the micro-batch policy and the run session."""

import io
import json
import os

import numpy as np
import pytest

from meddinov3.files import read_json, write_json
from meddinov3.progress import Progress
from meddinov3.runs import RunStatus


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
    from meddinov3.runs.session import report_failure

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

    from meddinov3.runs import run_state, running_pid

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

    from meddinov3.runs import RunFolderError, open_run

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


def test_report_failure_keeps_a_resumed_runs_status_until_it_starts(tmp_path):
    from meddinov3.runs import RunStopped
    from meddinov3.runs.session import report_failure

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


def test_metrics_are_cut_back_to_the_resumed_checkpoint(tmp_path):
    from meddinov3.runs import append_metrics, cut_metrics, read_metrics

    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    for step in (10, 20, 30):
        append_metrics(path, {"kind": "step", "step": step, "loss": np.float32(0.5).item()})
    append_metrics(path, {"kind": "validation", "step": 20, "dice": {"liver": 0.9}})
    with open(path, "a") as f:
        f.write('{"kind": "step", "st')  # a line cut by kill -9
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30, 20]
    cut_metrics(path, 20)  # resumed from the checkpoint at step 20: later records are produced again
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [("step", 10), ("step", 20), ("validation", 20)]
    assert path.read_text().endswith("\n") and "st\n" not in path.read_text()


def test_metrics_follower_reads_only_whole_new_lines_and_restarts_on_a_shorter_file(tmp_path):
    from meddinov3.runs import MetricsFollower, append_metrics

    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read() == []  # no file yet
    append_metrics(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2')  # still being written
    assert follower.read() == [{"step": 1}]
    with open(path, "a") as f:
        f.write('}\n[3]\n')  # completed; a line that is not an object is skipped
    assert follower.read() == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 9}\n')  # a run started anew
    assert follower.read() == [{"step": 9}]


def test_micro_batch_policy_start_halving_and_precision():
    import torch

    from meddinov3.runs.batch import amp_dtype, amp_name, halve_micro_batch, start_micro_batch

    assert start_micro_batch(None, 8) == 8 and start_micro_batch(16, 8) == 8 and start_micro_batch(3, 8) == 3
    assert start_micro_batch(None, 8, resumed=2) == 2 and start_micro_batch(2, 8, resumed=4) == 2
    cpu = torch.device("cpu")
    assert [halve_micro_batch(m, cpu) for m in (8, 5, 2, 1)] == [4, 2, 1, None]
    assert amp_dtype("auto", cpu) is None and amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    assert [amp_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bfloat16", "float16", "fp32"]


def _session_kind():
    from dataclasses import dataclass

    from meddinov3.config import JsonOptions
    from meddinov3.runs.session import RunKind

    @dataclass
    class Options(JsonOptions):
        SECTION, KIND, PATHS = "demo", "demo run", ("out",)
        out: str = ""
        steps: int = 5
        device: str = "cpu"

    class DemoError(Exception):
        pass

    return RunKind("demo", Options, DemoError, (DemoError,), output="model", total=lambda cfg: cfg.steps), Options


def test_run_session_reports_a_failure_into_status_json_and_reraises(tmp_path):
    from meddinov3.runs.session import RunSession

    kind, Options = _session_kind()
    stream = io.StringIO()
    with pytest.raises(kind.error):
        with RunSession(kind, Options(out=str(tmp_path / "run")), json_progress=True, stream=stream) as run:
            assert run.main and run.run_dir == tmp_path / "run" and run.status.data["total"] == 5
            run.status.update(state="running", step=2)
            raise kind.error("case3: no labels")
    data = read_json(tmp_path / "run" / "status.json")
    assert data["state"] == "failed" and data["error"] == "case3: no labels" and data["kind"] == "demo"
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["failed"]
    with pytest.raises(kind.error, match="already holds a run"):  # the folder is checked before anything runs
        write_json(tmp_path / "run" / "config.json", {"demo": Options(out=str(tmp_path / "run")).to_dict()})
        with RunSession(kind, Options(out=str(tmp_path / "run"))):
            pytest.fail("a refused folder must not run")


def test_run_session_start_up_stop_and_already_finished_resume(tmp_path):
    import signal

    from meddinov3.runs.session import RunSession

    kind, Options = _session_kind()
    run_dir = tmp_path / "run"
    with RunSession(kind, Options(out=str(run_dir))) as run:
        write_json(run_dir / "config.json", {"demo": run.cfg.to_dict()})
        os.kill(os.getpid(), signal.SIGTERM)  # during the start-up: a clean stop
        pytest.fail("the start-up signal ends the block")
    assert run.result()["state"] == "stopped" and read_json(run_dir / "status.json")["state"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    write_json(run_dir / "status.json", {**read_json(run_dir / "status.json"), "state": "finished", "step": 5})
    stream = io.StringIO()
    with RunSession(kind, Options(out=str(run_dir), device="cpu"), resume=True, json_progress=True,
                    stream=stream) as run:
        assert run.finished and run.status is None and run.previous["step"] == 5
    event = json.loads(stream.getvalue())
    assert event["event"] == "finished" and event["already_finished"] and event["model"] == str(run_dir / "model")
