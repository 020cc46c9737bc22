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
