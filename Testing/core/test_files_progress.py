"""Atomic writing and progress reporting (shared by segment, train and pretrain); run folders: test_runs.py."""

import io
import json
import os
import stat

import numpy as np
import pytest

from meddinov3.files import atomic_path
from meddinov3.progress import Progress


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


def test_config_file_must_hold_an_object(tmp_path):
    from meddinov3.train import TrainConfig

    for text in ("[1, 2]", '"steps"', '{"train": [1]}'):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match="expected a JSON object of training options"):
            TrainConfig.from_file(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"train": {"steps": 3}}')  # a run's config.json
    assert TrainConfig.from_file(tmp_path / "c.json").steps == 3


def test_atomic_dir_replacing_a_file_leaves_nothing_behind(tmp_path):
    from meddinov3.files import atomic_dir

    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "model.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "model.json").is_file()
