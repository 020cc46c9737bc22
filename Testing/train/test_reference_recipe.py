"""The reference fine-tuning recipe (issue 21): nnU-Net's folds, recipe files, drop path, sampling, augmentation,
the nnU-Net batch rule, the 896 px configuration, and a tiny run with `--recipe reference --fold 0`."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from meddinov3.data.augment import AugmentConfig, affine_warp, augment
from meddinov3.data.sampler import PatchSampler
from meddinov3.train.splits import fold_cases, nnunet_folds, read_splits

from ._datasets import events, phantom_dataset, run_cli, tiny_args

# The validation lists of nnU-Net's generate_crossval_split, computed once with scikit-learn 1.9.1:
#   KFold(n_splits=5, shuffle=True, random_state=12345).split(sorted(names))
# (sorted as strings: liver_10 and liver_11 come before liver_2).
SKLEARN_VAL_12 = [["liver_0", "liver_11", "liver_6"], ["liver_5", "liver_8", "liver_9"], ["liver_4", "liver_7"],
                  ["liver_1", "liver_2"], ["liver_10", "liver_3"]]
SKLEARN_VAL_7 = [["case3", "case6"], ["case0", "case4"], ["case1"], ["case5"], ["case2"]]


def _parse(argv: list[str]):
    from meddinov3.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli, parser.parse_args(["train", "--data", "d", "--out", "o", *argv])


def test_folds_are_nnunets_kfold_over_sorted_names():
    names = [f"liver_{i}" for i in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)]  # any order in: sorted inside
    for case_names, expected in ((names, SKLEARN_VAL_12), ([f"case{i}" for i in range(7)], SKLEARN_VAL_7)):
        splits = nnunet_folds(case_names)
        assert [s["val"] for s in splits] == expected
        for s in splits:  # each fold: the other cases train, in sorted order
            assert s["train"] == sorted(set(case_names) - set(s["val"]))
    with pytest.raises(ValueError, match="at least 5 cases"):
        nnunet_folds(["a", "b", "c"])


def test_splits_file_round_trip_and_checks(tmp_path):
    names = [f"case{i}" for i in range(7)]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(nnunet_folds(names)))
    splits = read_splits(path)
    assert fold_cases(splits, 2, names, str(path)) == ([n for n in names if n != "case1"], ["case1"])
    with pytest.raises(ValueError, match="fold 5 is not in"):
        fold_cases(splits, 5, names, str(path))
    with pytest.raises(ValueError, match=r"case\(s\) \['case6'\] are not in the dataset"):
        fold_cases(splits, 0, names[:6], str(path))
    path.write_text(json.dumps({"train": names}))
    with pytest.raises(ValueError, match="splits_final.json: expected nnU-Net's splits format"):
        read_splits(path)


def test_recipes_load_and_set_what_they_claim():
    from meddinov3.model import build_model
    from meddinov3.train.plan import build_network

    train_cli, args = _parse(["--recipe", "reference", "--size", "tiny"])
    cfg = train_cli.build_config(args)
    assert (cfg.drop_path, cfg.batch_size, cfg.case_sampling, cfg.fold, cfg.val_tta) == (0.2, "nnunet", "uniform", 0,
                                                                                          "final")
    assert (cfg.lr_decoder, cfg.lr_backbone, cfg.weight_decay, cfg.betas, cfg.grad_clip) == (3e-4, 3e-5, 0.05,
                                                                                             [0.9, 0.98], 12.0)
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.image_resampling, cfg.export_weights) == (1000, 250, "cubic", "final")
    assert cfg.weight_decay_all and cfg.lr_per_epoch and cfg.augment_config == AugmentConfig()
    net, _ = build_network(cfg, 3, ["background", "a", "b"], print)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in net.backbone.vit.blocks]
    assert type(net.backbone.vit.blocks[0].drop_path1).__name__ == "SubsetDropPath"
    assert rates == [(0.2, 0.2)] * len(net.backbone.vit.blocks)  # every block, not timm's ramp from 0
    assert [type(b.drop_path1).__name__ for b in build_model(net.config.replace(drop_path_rate=0.0)).backbone.vit.blocks
            ] == ["Identity"] * len(rates)
    # later sources win: --set over the recipe; the 896 variant adds its resolution
    _, args = _parse(["--recipe", "reference-896", "--set", "drop_path=0.1", "--val-cases", "x"])
    cfg = train_cli.build_config(args)
    assert (cfg.resolution, cfg.drop_path, cfg.val_cases, cfg.fold) == (896, 0.1, ["x"], None)


def test_drop_path_keeps_dinov3s_batch_subset():
    from meddinov3.model.backbone import SubsetDropPath

    drop = SubsetDropPath(0.2)
    x = torch.ones(12, 5, 3)
    out = drop(x)
    kept = out.flatten(1).abs().sum(1) > 0
    assert int(kept.sum()) == 9 and torch.allclose(out[kept], torch.full_like(out[kept], 12 / 9))
    assert int((drop(torch.ones(2, 4)).sum(1) > 0).sum()) == 1  # int(2 * 0.8) = 1 of 2, scaled by 2
    assert torch.equal(drop.eval()(x), x)


def test_recipe_and_fold_errors_are_one_line(tmp_path):
    from meddinov3.cli.common import CommandError

    train_cli, args = _parse(["--recipe", "nope"])
    with pytest.raises(CommandError, match="--recipe nope: no such file or recipe .*reference, reference-896"):
        train_cli.build_config(args)
    _, args = _parse(["--splits", "s.json", "--val-fraction", "0.1"])
    with pytest.raises(CommandError, match="--splits chooses the validation cases"):
        train_cli.build_config(args)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"val_cases": ["a"]}))
    _, args = _parse(["--recipe", "reference", "--config", str(config)])
    with pytest.raises(CommandError, match="val_cases and fold/splits both choose"):
        train_cli.build_config(args)
    with pytest.raises(SystemExit):
        _parse(["--fold", "5"])


def test_nnunet_batch_rule():
    from meddinov3.train.plan import nnunet_batch_size

    big = [(300, 512, 512)] * 3
    assert nnunet_batch_size(big, 100, (512, 512)) == 12                 # the 2D plans' batch for 512 x 512
    assert nnunet_batch_size(big, 100, (256, 256)) == 48                 # smaller patch, larger batch
    assert nnunet_batch_size([(20, 128, 128)], 4, (128, 128)) == 4        # 5 % of 4 x 20 slices
    assert nnunet_batch_size([(5, 64, 64)], 2, (64, 64)) == 2             # never below 2


def test_cases_are_drawn_uniformly_not_by_slice_count():
    from meddinov3.data.cache import CachedCase

    def case(value: float, slices: int) -> CachedCase:
        return CachedCase(str(value), np.full((slices, 8, 8), value, np.float16), np.zeros((slices, 8, 8), np.uint8),
                          {1: np.zeros((0, 3), np.int32)})

    cases = [case(1.0, 1), case(2.0, 49)]  # one slice vs 49 slices
    share = {}
    for mode in ("uniform", "slices"):
        images = np.concatenate([PatchSampler(cases, (8, 8), 8, 0.0, seed=0, case_sampling=mode).sample(step)[0]
                                 for step in range(50)])
        share[mode] = float(np.mean(images[:, 0, 0, 0] == 1.0))  # fraction of patches from the one-slice case
    assert abs(share["uniform"] - 0.5) < 0.08 and share["slices"] < 0.06


def test_foreground_samples_follow_nnunets_rounding():
    from ._datasets import cached_cases

    # nnU-Net forces foreground from index round(B * (1 - 0.33)) on: B = 3 -> 1 sample, B = 12 -> 4 samples
    for batch, n_fg in ((3, 1), (12, 4), (2, 1)):
        _, labels = PatchSampler(cached_cases(), (8, 8), batch, 0.33, seed=1).sample(0)
        assert all(labels[i].any() for i in range(batch - n_fg, batch))


def test_rotation_is_a_true_rotation_on_a_non_square_patch_with_onehot_labels():
    """A 90-degree turn sampled as a 40 x 24 patch from a 40 x 40 one lands on the input's pixel centres: image and
    labels are exactly the rotated input (the old code rotated in [-1, 1] units: a shear on non-square patches)."""
    image = torch.arange(40 * 40, dtype=torch.float32).view(1, 1, 40, 40)
    labels = torch.arange(40 * 40).view(1, 40, 40) % 3
    out, lab = affine_warp(image, labels, torch.tensor([math.pi / 2]), torch.ones(1), -5.0, (40, 24), 3)
    r, c = torch.meshgrid(torch.arange(40), torch.arange(24), indexing="ij")
    # output offset (x, y) reads the input at R(90) (x, y) = (-y, x): out[r, c] = in[c + 8, 39 - r]
    torch.testing.assert_close(out[0, 0], image[0, 0][c + 8, 39 - r], atol=0.05, rtol=0)
    assert torch.equal(lab[0], labels[0][c + 8, 39 - r])
    # zooming out (scale 1.4, nnU-Net's sense: a larger region) reaches outside: padded image, background labels
    out, lab = affine_warp(image, labels + 1, torch.zeros(1), torch.tensor([1.4]), -5.0, (40, 40), 4)
    assert out[0, 0, 0, 0] == -5.0 and lab[0, 0, 0] == 0 and lab[0, 20, 20] > 0
    cfg = AugmentConfig()
    assert cfg.rotation_for((24, 40)) == 15.0 and cfg.rotation_for((32, 40)) == 180.0  # nnU-Net's aspect rule


def test_enlarged_patch_sizes_and_unmoved_samples_are_cropped():
    cfg = AugmentConfig()
    assert cfg.sampled_patch((512, 512)) == (602, 602)   # get_patch_size: 512 / 0.85 (180-degree rotation -> 90)
    assert cfg.sampled_patch((128, 320))[0] > 128 and (cfg.sampled_patch((128, 320))[0] - 128) % 2 == 0
    assert AugmentConfig(enlarged_patch=False).sampled_patch((64, 64)) == (64, 64)
    x = torch.randn(2, 1, 12, 14)
    y = torch.randint(0, 3, (2, 12, 14))
    still = AugmentConfig(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                          p_gamma=0, p_gamma_inverted=0, p_mirror=0)
    a, b = augment(x, y, torch.Generator().manual_seed(0), still, out_size=(8, 10))
    assert torch.equal(a, x[..., 2:10, 2:12]) and torch.equal(b, y[..., 2:10, 2:12])


def test_noise_std_is_the_drawn_value_as_in_nnunet():
    x = torch.zeros(64, 1, 32, 32)
    cfg = AugmentConfig(p_rotation=0, p_scale=0, p_noise=1, noise_variance=(0.1, 0.1), p_blur=0, p_brightness=0,
                        p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_inverted=0, p_mirror=0)
    noisy, _ = augment(x, torch.zeros(64, 32, 32, dtype=torch.long), torch.Generator().manual_seed(0), cfg)
    assert float(noisy.std()) == pytest.approx(0.1, rel=0.03)  # sqrt(0.1) = 0.32 before


@pytest.fixture(scope="module")
def phantom5(tmp_path_factory):
    return phantom_dataset(tmp_path_factory.mktemp("phantom5") / "ds", n=5, shape=(6, 40, 40))


def test_resolution_scales_spacing_by_patch_over_resolution(phantom5, tmp_path):
    from meddinov3.data import SliceCache, load_dataset
    from meddinov3.train import TrainConfig
    from meddinov3.train.plan import prepare_cache

    ds = load_dataset(phantom5)
    names = [c.name for c in ds.cases]
    base, batch = prepare_cache(ds, names, tmp_path, TrainConfig(patch_size=[48, 32], batch_size="nnunet"), 16,
                                lambda m: None)
    high, batch_high = prepare_cache(ds, names, tmp_path, TrainConfig(patch_size=[48, 32], resolution=96,
                                                                      batch_size="nnunet"), 16, lambda m: None)
    s0, s1 = SliceCache(base).spacing, SliceCache(high).spacing
    assert s1 == pytest.approx((s0[0] * 48 / 96, s0[1] * 32 / 96))
    assert batch_high == batch  # 2d_896 inherits the 2d plan's batch


def test_tiny_run_with_reference_recipe_and_fold0_writes_splits_and_summary(phantom5, tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train", "--data", str(phantom5), "--out", str(out), "--recipe", "reference", "--fold", "0",
                 "--steps", "2", "--json-progress", *tiny_args(tmp_path / "cache"), "--set", "patch_size=[32, 32]",
                 "val_tta=false"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits == nnunet_folds([f"case{i}" for i in range(5)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["validation_cases"] == splits[0]["val"]
    assert cfg["resolved"]["model"]["drop_path_rate"] == 0.2 and cfg["resolved"]["batch_size"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["foreground_mean", "mean", "metric_per_case"]
    assert [c["prediction_file"] for c in summary["metric_per_case"]] == [
        str(out / "validation" / f"{n}.nii.gz") for n in splits[0]["val"]]
    # the same numbers as `meddinov3 evaluate` on the kept predictions
    gt = tmp_path / "gt"
    gt.mkdir()
    for n in splits[0]["val"]:
        (gt / f"{n}.nii.gz").symlink_to(phantom5 / "labelsTr" / f"{n}.nii.gz")
    r2 = run_cli(["evaluate", str(out / "validation"), str(gt), "-o", str(tmp_path / "s.json"),
                  "--labels", str(phantom5 / "dataset.json")])
    assert r2.returncode == 0, r2.stderr
    again = json.loads((tmp_path / "s.json").read_text())
    for key in ("mean", "foreground_mean"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(summary[key], sort_keys=True)
    finished = [e for e in events(r.stdout) if e["event"] == "finished"][0]
    assert finished["step"] == 2 and (out / "model" / "model.json").is_file()
    assert not math.isnan(summary["foreground_mean"]["TN"])
