"""Slice index (int16 shards, air slices skipped, reorientation), data lists, step sampler, ridge probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.pretrain.data import (PretrainDataError, SliceIndex, StepSampler, build_slice_index,
                                     collect_volumes)


def _volume(path, flip=False):
    arr = np.full((6, 16, 16), -1000, np.float32)
    arr[1:5, 4:12, 4:12] = np.arange(4, dtype=np.float32)[:, None, None] * 10 + 40  # slices 0 and 5 are air
    img = sitk.GetImageFromArray(arr)
    if flip:  # z runs inferior: canonical order must reverse it
        img = sitk.GetImageFromArray(arr[::-1].copy())
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(img, str(path))
    return path


def test_index_skips_air_and_reorients(tmp_path):
    a = _volume(tmp_path / "a.nii.gz")
    b = _volume(tmp_path / "b.nrrd", flip=True)
    idx = SliceIndex(build_slice_index([a, b], tmp_path / "idx", log=lambda m: None))
    assert len(idx) == 8
    assert [v["kept"] for v in idx.volumes] == [4, 4]
    hu_a = [float(idx.hu(i).max()) for i in range(4)]
    hu_b = [float(idx.hu(i).max()) for i in range(4, 8)]
    assert hu_a == hu_b == [40.0, 50.0, 60.0, 70.0]
    assert idx.hu(0).dtype == np.int16
    assert idx.slice(0).shape == (1, 16, 16) and idx.slice(0).dtype == torch.float32
    # a second build reuses the shards
    mtime = (tmp_path / "idx" / idx.volumes[0]["shard"]).stat().st_mtime_ns
    build_slice_index([a, b], tmp_path / "idx", log=lambda m: None)
    assert (tmp_path / "idx" / idx.volumes[0]["shard"]).stat().st_mtime_ns == mtime


def test_collect_from_folder_text_and_json(tmp_path):
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    (tmp_path / "ds" / "labelsTr").mkdir()
    a = _volume(tmp_path / "ds" / "imagesTr" / "a.nii.gz")
    _volume(tmp_path / "ds" / "labelsTr" / "a.nii.gz")
    assert collect_volumes(tmp_path / "ds") == [a]
    (tmp_path / "list.txt").write_text(f"# comment\n{a}\n")
    assert collect_volumes(tmp_path / "list.txt") == [a]
    (tmp_path / "list.json").write_text(json.dumps({"volumes": ["ds/imagesTr/a.nii.gz"]}))
    assert collect_volumes(tmp_path / "list.json") == [tmp_path / "ds/imagesTr/a.nii.gz"]
    (tmp_path / "bad.txt").write_text("missing.nii.gz\n")
    with pytest.raises(PretrainDataError, match="do not exist"):
        collect_volumes(tmp_path / "bad.txt")
    air = np.full((3, 8, 8), -1000, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(air), str(tmp_path / "air.nii.gz"))
    with pytest.raises(PretrainDataError, match="non-air"):
        build_slice_index([tmp_path / "air.nii.gz"], tmp_path / "idx2", log=lambda m: None)


def test_step_sampler_is_a_function_of_step_and_splits_ranks():
    s0, s1 = StepSampler(10, 2, seed=3, rank=0, world=2), StepSampler(10, 2, seed=3, rank=1, world=2)
    epoch0 = [i for step in range(3) for s in (s0, s1) for i in s.indices(step)][:10]
    assert sorted(epoch0) == list(range(10))  # one epoch covers every slice once across ranks
    assert StepSampler(10, 2, seed=3, rank=1, world=2).indices(7) == s1.indices(7)


def test_ridge_probe_separates_a_feature_that_encodes_foreground():
    from meddinov3.pretrain.probe import DenseProbe

    class Oracle(torch.nn.Module):  # patch features = foreground fraction (a perfect feature)
        config = type("C", (), {"patch_size": 8})()

        def forward_features(self, x):
            m = torch.nn.functional.avg_pool2d((x[:, :1] > 0).float(), 8).flatten(1)
            return {"patch": torch.stack([m, 1 - m, torch.ones_like(m)], -1)}

    imgs = np.full((4, 32, 32), -500, np.float32)
    labs = np.zeros((4, 32, 32), np.int64)
    for k in range(4):
        imgs[k, 8 * (k % 2):16 + 8 * (k % 2), 8:24] = 200
        labs[k] = imgs[k] > 0
    res = DenseProbe(imgs, labs, [0, 1], [2, 3], size=32)(Oracle())
    assert res["probe_dice"] > 0.95 and res["probe_accuracy"] > 0.95


def test_liver_probe_scores_informative_features_and_not_collapsed_ones():
    """The default probe set must hold liver patches in both halves at ViT-B's patch 16 (it once held none, so
    every backbone scored Dice 0); features that encode intensity bands then score well, constant ones do not."""
    from meddinov3.pretrain.probe import DenseProbe

    class Features(torch.nn.Module):
        config = type("C", (), {"patch_size": 16})()

        def __init__(self, collapsed: bool):
            super().__init__()
            self.collapsed = collapsed

        def forward_features(self, x):
            bands = [(x[:, :1] > t).float() for t in torch.linspace(-0.5, 0.9, 8)]
            f = torch.cat([torch.nn.functional.avg_pool2d(b, 16).flatten(1)[..., None] for b in bands], -1)
            return {"patch": torch.ones_like(f) if self.collapsed else f}

    probe = DenseProbe.liver()
    target = torch.nn.functional.avg_pool2d(probe.fg, 16).flatten(1) >= 0.5
    assert target[probe.fit_idx].float().mean() > 0.15 and target[probe.eval_idx].float().mean() > 0.15
    good, collapsed = probe(Features(False)), probe(Features(True))
    assert good["probe_dice"] > 0.7, good
    assert collapsed["probe_dice"] < 0.7 and collapsed["probe_accuracy"] < good["probe_accuracy"] - 0.1, collapsed
