"""Loss, optimiser groups, sampler determinism and augmentation on small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddinov3.config import model_config
from meddinov3.data.augment import AugmentConfig, augment, gaussian_blur
from meddinov3.data.sampler import PatchSampler
from meddinov3.model import build_model
from meddinov3.train.losses import DiceCELoss, dice_per_class, soft_dice
from meddinov3.train.optim import freeze_blocks, make_optimizer, make_scheduler
from meddinov3.train import TrainConfig

from ._datasets import cached_cases


def test_soft_dice_perfect_and_loss_parts():
    target = torch.randint(0, 3, (2, 16, 16))
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice(logits, target) == pytest.approx(torch.ones(2), abs=1e-4)
    loss, parts = DiceCELoss()(logits, target)
    assert float(loss) == pytest.approx(0.0, abs=1e-3)
    bad, _ = DiceCELoss()(-logits, target)
    assert float(bad) > 1.0
    assert dice_per_class(np.array([1, 1, 0]), np.array([1, 0, 0]), [1, 2]) == {1: pytest.approx(2 / 3), 2: 1.0}


def test_optimizer_groups_schedule_and_freezing():
    net = build_model(model_config("tiny", 3, depth=2))
    net.backbone.mask_token.requires_grad_(False)
    n = freeze_blocks(net, 1)
    assert n > 0 and not any(p.requires_grad for p in net.backbone.vit.blocks[0].parameters())
    cfg = TrainConfig()
    opt = make_optimizer(net, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decoder"] == 3e-4 and lrs["backbone"] == 3e-5 and opt.defaults["betas"] == (0.9, 0.98)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["decoder_no_decay"] == 0.0
    sched = make_scheduler(opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lrs[opt.param_groups[0]["name"]])


def test_sampler_is_a_function_of_step_and_rank():
    cases = cached_cases()
    s = PatchSampler(cases, (32, 48), 6, fg_fraction=0.33, seed=1)
    a, la = s.sample(7)
    b, lb = PatchSampler(cases, (32, 48), 6, fg_fraction=0.33, seed=1).sample(7)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape == (6, 1, 32, 48) and la.shape == (6, 32, 48)
    assert not np.array_equal(a, s.sample(8)[0])
    other = PatchSampler(cases, (32, 48), 6, fg_fraction=0.33, seed=1, rank=1, world_size=2).sample(7)[0]
    assert not np.array_equal(a, other)
    # the last round(6 * 0.33) = 2 samples are centred on foreground
    assert all(la[i].any() for i in (4, 5))
    # padding (patch wider than the slice) uses the case's air value
    assert (a[:, 0, :, :] == -3.0).any()


def test_augment_is_reproducible_and_keeps_labels_valid():
    x = torch.randn(4, 1, 32, 32)
    y = torch.randint(0, 3, (4, 32, 32))
    cfg = AugmentConfig(p_rotation=1, p_scale=1, p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_lowres=1,
                        p_gamma=1, p_gamma_inverted=1)
    a = augment(x, y, torch.Generator().manual_seed(3), cfg, pad_value=-1.0)
    b = augment(x, y, torch.Generator().manual_seed(3), cfg, pad_value=-1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == x.shape and a[1].dtype == y.dtype
    assert set(a[1].unique().tolist()) <= {0, 1, 2}
    assert torch.isfinite(a[0]).all() and not torch.equal(a[0], x)
    off = augment(x, y, torch.Generator(), AugmentConfig(enabled=False))
    assert off[0] is x


def test_mirroring_moves_image_and_label_together():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 0, 0] = 1
    y = (x[:, 0] > 0).long()
    cfg = AugmentConfig(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                        p_gamma=0, p_gamma_inverted=0, p_mirror=1.0)
    a, b = augment(x, y, torch.Generator().manual_seed(0), cfg)
    assert a[0, 0, 7, 7] == 1 and b[0, 7, 7] == 1


def test_blur_sigma_zero_is_identity():
    x = torch.randn(2, 1, 16, 16)
    out = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    assert out.stride() == x.stride()  # a compiled step (dynamic=False) would recompile on other strides
    torch.testing.assert_close(out[0], x[0])
    assert not torch.allclose(out[1], x[1])


def test_repeated_set_options_accumulate():
    """`--set a=1 --set b=2` keeps both (argparse's default 'store' kept only the last --set)."""
    import argparse

    from meddinov3.cli import pretrain as pretrain_cli
    from meddinov3.cli import train as train_cli

    for cli, extra in ((train_cli, []), (pretrain_cli, [])):
        parser = argparse.ArgumentParser()
        cli.add_parser(parser.add_subparsers())
        name = "train" if cli is train_cli else "pretrain"
        args = parser.parse_args([name, "--data", "d", "--out", "o", "--set", "seed=3", "log_every=7",
                                  "--set", "checkpoint_every=11", *extra])
        cfg = cli.build_config(args)
        assert (cfg.seed, cfg.log_every, cfg.checkpoint_every) == (3, 7, 11)


def test_curves_are_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    """A Python without matplotlib (a bare Slicer) still trains: curves.png is skipped with one message."""
    import json
    import logging
    import sys

    from meddinov3.pretrain.loop import plot_curves as plot_pretrain_curves
    from meddinov3.train import curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "step", "step": 1, "loss": 1.0, "lr_decoder": 1e-3, "lr_backbone": 1e-4})
                       + "\n")
    assert curves.plot_curves(metrics, tmp_path / "with.png") == tmp_path / "with.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(curves.pyplot, "warned", False, raising=False)
    with caplog.at_level(logging.WARNING, logger="meddinov3"):
        assert curves.plot_curves(metrics, tmp_path / "without.png") is None
        plot_pretrain_curves(metrics, tmp_path / "pretrain.png")
    assert not (tmp_path / "without.png").exists() and not (tmp_path / "pretrain.png").exists()
    assert [r.getMessage() for r in caplog.records].count(
        "matplotlib is not installed: curves.png is not drawn (metrics.jsonl has the data)") == 1
