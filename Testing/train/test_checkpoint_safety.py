"""Run checkpoints are read with restricted unpickling: a crafted latest.pt in a run folder handed to `train
--resume` or `pretrain --base` is refused with one line and runs nothing; real checkpoints, old and new, resume."""

from __future__ import annotations

import json
import pathlib
import random

import numpy as np
import pytest
import torch

from meddinov3.pretrain.loop import FORMAT as PRETRAIN_FORMAT
from meddinov3.train.checkpoint import FORMAT, load_state, rng_states, set_rng_states

from ._datasets import phantom_dataset, run_cli, tiny_args

pytestmark = pytest.mark.slicer_python  # safe loading of run checkpoints under Slicer 5.8's Python

REFUSED = "contains objects other than weights and plain data"


class _Touch:
    """Unpickled without restriction, creates `marker`: what a crafted checkpoint could do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant(path: pathlib.Path, marker: pathlib.Path, fmt: str = FORMAT) -> None:
    """A crafted latest.pt that looks like a run checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": fmt, "step": 1, "rng": _Touch(marker)}, path)


def test_planted_file_would_run_code_without_restriction(tmp_path):
    """The test files are dangerous for real: full unpickling creates the marker."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "latest.pt", marker)
    torch.load(tmp_path / "latest.pt", weights_only=False)
    assert marker.exists()


def test_rng_states_are_plain_data_and_restore_exactly(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state too
    torch.save({"rng": rng_states()}, tmp_path / "s.pt")
    expected = (np.random.standard_normal(3), random.random(), torch.rand(3))
    set_rng_states(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])  # no allow-list needed
    np.testing.assert_array_equal(np.random.standard_normal(3), expected[0])
    assert random.random() == expected[1] and torch.equal(torch.rand(3), expected[2])


def test_checkpoint_of_the_previous_layout_still_loads(tmp_path):
    """Before, numpy's state was saved as get_state() (a tuple holding an array)."""
    np.random.seed(5)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"format": FORMAT, "step": 2, "rng": state}, tmp_path / "latest.pt")
    expected = np.random.standard_normal(3)
    set_rng_states(load_state(tmp_path / "latest.pt")["rng"])
    np.testing.assert_array_equal(np.random.standard_normal(3), expected)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_dataset(tmp_path_factory.mktemp("phantom") / "ds", n=2, shape=(6, 32, 32))


def test_train_resume_refuses_a_crafted_checkpoint(phantom, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    r = run_cli(["train", "--data", str(phantom), "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--val-fraction", "0", *tiny_args(tmp_path / "cache"), "--set", "patch_size=[32, 32]"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    status = {**json.loads((out / "status.json").read_text()), "state": "stopped"}  # resumable
    (out / "status.json").write_text(json.dumps(status))
    latest = out / "checkpoints" / "latest.pt"
    _plant(latest, marker)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "status.json"}
    r = run_cli(["train", "--out", str(out), "--resume"], timeout=300)
    assert not marker.exists()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"meddinov3 train: error: {latest}: refused to load") and REFUSED in error
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "status.json"} == files
    assert json.loads((out / "status.json").read_text()) == status  # still stopped, as before


def test_pretrain_base_refuses_a_crafted_run_checkpoint(phantom, tmp_path):
    base, out, marker = tmp_path / "colleague-run", tmp_path / "run", tmp_path / "marker"
    latest = base / "checkpoints" / "latest.pt"
    _plant(latest, marker, PRETRAIN_FORMAT)
    r = run_cli(["pretrain", "--data", str(phantom / "imagesTr" / "case0_0000.nii.gz"), "--out", str(out),
                 "--base", str(base), "--steps", "1", "--batch-size", "2", "--device", "cpu"],
                env_extra={"MEDDINOV3_HOME": str(tmp_path / "home")}, timeout=120)
    assert not marker.exists()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"meddinov3 pretrain: error: {latest}: refused to load") and REFUSED in error
    assert not out.exists() or [p.name for p in out.iterdir()] == ["status.json"]  # no index, no checkpoint
