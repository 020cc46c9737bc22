"""`meddinov3 demo` with the shipped model: offline, CPU, files on the .mrc grid, Dice printed on the literal split
(held out = source .mrc array axis-0 indices [64, 128))."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from ._datasets import run_cli

HELD_OUT_LIVER_DICE = 0.75  # the shipped model with its post-processing: 0.796 (target 0.95 not reached), see RESULTS.md


def _mrc_labels() -> np.ndarray:
    from meddinov3.phantom import liver_ct_dir

    return np.fromfile(liver_ct_dir() / "lab_117.mrc", np.uint16, offset=1024).reshape(128, 128, 128)


def _dice(a: np.ndarray, b: np.ndarray, v: int) -> float:
    return float(2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)))


def _demo_error(capsys, args: list[str], *words: str) -> None:
    """The project rule: exit != 0, one line naming the problem (no traceback: in-process, an uncaught exception
    fails the test). In-process because these fail before any work, and a CLI start costs seconds."""
    from meddinov3.cli.main import main

    assert main(["demo", *args]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_demo_writes_segmentation_and_overlay(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("segmentation.nii.gz", "overlay.png"):  # an earlier run's files: replaced, as --overwrite asks
        (out / name).write_bytes(b"old")
    r = run_cli(["demo", "--out", str(out), "--overwrite"], timeout=300, env_extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["overlay.png", "segmentation.nii.gz"]  # no temporary left
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert seg.shape == (128, 128, 128) and set(np.unique(seg)) <= {0, 1, 2}
    assert (out / "overlay.png").stat().st_size > 10_000
    assert "post-processing from model.json, applied" in r.stdout  # the shipped package declares its clean-up
    held_text = r.stdout.split("held-out (source array axis-0 indices 64-127)", 1)[1].split("training part", 1)[0]
    liver = float(re.search(r"liver\s+([0-9.]+)", held_text).group(1))
    tumour = float(re.search(r"tumour\s+([0-9.]+)", held_text).group(1))
    lab = _mrc_labels()
    # the printed held-out Dice is the one on the source array's axis-0 indices [64, 128), as a checker computes it
    assert abs(liver - _dice(seg[64:128], lab[64:128], 1)) < 1e-3
    assert abs(tumour - _dice(seg[64:128], lab[64:128], 2)) < 1e-3
    assert liver > HELD_OUT_LIVER_DICE
    # array axes are the source .mrc's: its labels overlap the prediction far better than any transposed view
    assert _dice(seg, lab, 1) > _dice(seg.transpose(2, 1, 0), lab, 1) + 0.1


@pytest.mark.parametrize("existing", ["segmentation.nii.gz", "overlay.png"])
def test_demo_refuses_existing_outputs(tmp_path, capsys, existing):
    """Checked before the model runs: the user's file is untouched and nothing else is written."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / existing).write_bytes(b"the user's file")
    _demo_error(capsys, ["--out", str(out)], f"{out / existing}: output already exists", "--overwrite")
    assert (out / existing).read_bytes() == b"the user's file"
    assert [p.name for p in out.iterdir()] == [existing]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("args, words", [
    (["--device", "bogus"], ["--device bogus"]),
    pytest.param(["--device", "cuda"], ["--device cuda", "CUDA is not available"],
                 marks=pytest.mark.skipif(_cuda(), reason="needs a machine without CUDA")),
    (["--model", "no-such-model"], ["no-such-model"]),
])
def test_demo_bad_input_one_line_and_no_folder(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    _demo_error(capsys, ["--out", str(out), *args], *words)
    assert not out.exists()  # a failed demo leaves no empty --out folder


def test_export_dataset_split_along_source_axis0(tmp_path):
    from meddinov3.cli.demo import export_dataset
    from meddinov3.data import check_dataset, load_dataset

    root = export_dataset(tmp_path / "ds")
    info = check_dataset(load_dataset(root))
    assert sorted(info) == ["liver117_train"]  # the held-out part (imagesTs/labelsTs) is no training/validation case
    assert info["liver117_train"]["size"] == [64, 128, 128]
    lab = _mrc_labels()
    read = lambda p: sitk.ReadImage(str(root / p))  # noqa: E731
    train, held = read("labelsTr/liver117_train.nii.gz"), read("labelsTs/liver117_heldout.nii.gz")
    # SimpleITK arrays are (z, y, x) = source axes reversed
    assert np.array_equal(sitk.GetArrayFromImage(train).transpose(2, 1, 0), lab[0:64])
    assert np.array_equal(sitk.GetArrayFromImage(held).transpose(2, 1, 0), lab[64:128])
    # each half lies where it is in the full volume (origin -64 mm, 1 mm voxels, identity direction)
    assert train.GetOrigin() == (-64.0, -64.0, -64.0) and held.GetOrigin() == (0.0, -64.0, -64.0)
    assert read("imagesTs/liver117_heldout_0000.nii.gz").GetOrigin() == (0.0, -64.0, -64.0)
    assert held.GetSpacing() == train.GetSpacing() == (1.0, 1.0, 1.0)
    assert held.GetDirection() == train.GetDirection()


def test_export_dataset_refuses_existing_files(tmp_path, capsys):
    from meddinov3.cli.demo import export_dataset

    root = tmp_path / "ds"
    (root / "labelsTs").mkdir(parents=True)
    user = root / "labelsTs" / "liver117_heldout.nii.gz"
    user.write_bytes(b"the user's labels")
    with pytest.raises(FileExistsError, match="liver117_heldout.nii.gz: output already exists"):
        export_dataset(root)
    assert [p for p in root.rglob("*") if p.is_file()] == [user]  # refused before writing anything
    _demo_error(capsys, ["--export-dataset", str(root)], f"{user}: output already exists", "--overwrite")
    assert user.read_bytes() == b"the user's labels"
    from meddinov3.cli.main import main

    assert main(["demo", "--export-dataset", str(root), "--overwrite"]) == 0
    assert sitk.ReadImage(str(user)).GetSize() == (64, 128, 128)


def test_export_dataset_writes_atomically(tmp_path, monkeypatch):
    """A writer that fails half-way leaves no partial file under the final name. (A full disk cannot be made here:
    SimpleITK's writer is replaced by one that writes a few bytes, then fails.)"""
    from meddinov3.cli.demo import export_dataset

    def broken(image, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_dataset(tmp_path / "ds")
    assert not [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]


def test_export_dataset_heldout_as_validation_keeps_both_cases(tmp_path):
    """Pipeline tests and benchmarks validate on the held-out half: both halves go to imagesTr/labelsTr."""
    from meddinov3.cli.demo import export_dataset
    from meddinov3.data import load_dataset

    ds = load_dataset(export_dataset(tmp_path / "ds", heldout_as_validation=True))
    assert sorted(c.name for c in ds.cases) == ["liver117_heldout", "liver117_train"]
    assert not any((tmp_path / "ds" / "imagesTs").iterdir())
