"""`meddinov3 pretrain` with the inputs researchers have: refused in one line before anything is built, or warned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.pretrain.data import PretrainDataError, build_slice_index, collect_volumes
from meddinov3.pretrain.loop import PretrainConfig, PretrainError, pretrain

REPO = Path(__file__).resolve().parents[2]
TINY = {"size": "tiny", "model": {"depth": 2, "patch_size": 8},
        "head": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}, "global_size": 64, "local_size": 32,
        "n_local": 2, "batch_size": 4, "steps": 2, "probe_every": 0, "device": "cpu"}


def _ct(path, low=-1000.0):
    """A CT-like volume (air rows at -1000 HU), or with `low` >= 0 an MR-like one (no negative values)."""
    arr = np.abs(np.random.default_rng(0).normal(0, 200, (6, 32, 32))).astype(np.float32)
    arr[:, :4] = low
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def _cli(args, home):
    return subprocess.run([sys.executable, "-m", "meddinov3.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MEDDINOV3_HOME": str(home)})


def test_data_that_is_a_binary_file_is_refused(tmp_path):
    pth = tmp_path / "model.pth"
    pth.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PretrainDataError, match="model.pth: neither a CT volume"):
        collect_volumes(pth)


def test_data_as_nnunet_dataset_json(tmp_path):
    ds = tmp_path / "Dataset001_Liver"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    a = _ct(ds / "imagesTr" / "liver_000_0000.nii.gz")
    _ct(ds / "labelsTr" / "liver_000.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                 "numTraining": 1, "file_ending": ".nii.gz"}))
    assert collect_volumes(ds / "dataset.json") == collect_volumes(ds) == [a]


def test_volume_without_air_is_flagged_as_not_hu(tmp_path):
    messages = []
    build_slice_index([_ct(tmp_path / "mr.nii.gz", low=0.0)], tmp_path / "idx", log=messages.append)
    assert any("does not look like CT in Hounsfield units" in m for m in messages)
    messages.clear()
    build_slice_index([_ct(tmp_path / "ct.nii.gz")], tmp_path / "idx2", log=messages.append)
    assert not any("WARNING" in m for m in messages)


@pytest.mark.parametrize("key,value", [("steps", -3), ("steps", 0), ("steps", "x"), ("batch_size", 1.5),
                                       ("warmup_steps", -1), ("lr", "fast"), ("micro_batch", 0)])
def test_bad_numbers_are_refused_by_the_config(key, value):
    with pytest.raises(ValueError, match=f"{key} must be"):
        PretrainConfig.from_dict({**TINY, "data": "x", key: value})


def test_stage2_from_random_init_is_refused_before_any_folder(tmp_path):
    with pytest.raises(ValueError, match="stage 2 anchors the patch features"):
        PretrainConfig.from_dict({**TINY, "data": "x", "stage": 2})
    vol = _ct(tmp_path / "ct.nii.gz")
    r = _cli(["pretrain", "--data", str(vol), "--out", str(tmp_path / "run"), "--size", "tiny", "--stage", "3",
              "--steps", "2"], tmp_path / "home")
    assert r.returncode == 2 and "stage 3 anchors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_stage2_falling_back_to_random_init_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_HOME", str(tmp_path / "home"))  # no imported official backbone
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = PretrainConfig.from_dict({**TINY, "size": None, "stage": 2, "data": str(_ct(tmp_path / "ct.nii.gz")),
                                    "out": str(tmp_path / "run")})
    with pytest.raises(PretrainError, match="stage 2 anchors"):
        pretrain(cfg, stream=open(os.devnull, "w"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_size_with_base_is_ignored_with_a_warning_not_recorded(tmp_path):
    from meddinov3.cli.main import build_parser
    from meddinov3.cli.pretrain import build_config

    args = build_parser().parse_args(["pretrain", "--data", "x", "--out", str(tmp_path / "run"), "--base",
                                      str(tmp_path / "prev"), "--size", "base", "--steps", "2", "--device", "cpu"])
    r = _cli(["pretrain", "--data", str(_ct(tmp_path / "ct.nii.gz")), "--out", str(tmp_path / "run"), "--base",
              str(tmp_path / "prev"), "--size", "base"], tmp_path / "home")
    assert r.returncode == 2 and "warning: --size base is ignored: the architecture comes from --base" in r.stderr
    assert "prev: unknown model" in r.stderr  # the base is still checked, before any folder is built
    assert not (tmp_path / "run" / "slices").exists()
    from meddinov3.cli.pretrain import run
    import meddinov3.pretrain.loop as loop

    seen = {}
    orig = loop.pretrain
    try:
        loop.pretrain = lambda cfg, **kw: seen.setdefault("cfg", cfg) and {}
        run(args)
    finally:
        loop.pretrain = orig
    assert seen["cfg"].size is None and build_config(args).base.endswith("prev")
