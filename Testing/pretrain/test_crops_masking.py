"""Tests for the multi-crop augmentation, HU normalisation and block masking (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddinov3.pretrain.crops import (
    MultiCropAugmentation, collate_crops, gaussian_blur, normalize_hu, random_resized_crop,
)
from meddinov3.pretrain.masking import MaskingGenerator, sample_masks


def _slice(h: int = 160, w: int = 192) -> torch.Tensor:
    """A synthetic normalised CT-like slice with structure (so crops differ visibly)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    hu = torch.where(xx ** 2 + yy ** 2 < 0.6, 40.0 + 300 * (xx > 0.2).float(), -1000.0)
    return normalize_hu(hu)[None]


# ---------------------------------------------------------------- normalisation
def test_normalize_hu_constants_and_clamp():
    x = torch.tensor([-3000.0, -1000.0, 65.1084, 1000.0, 3000.0])
    y = normalize_hu(x)
    torch.testing.assert_close(y[2], torch.tensor(0.0))
    torch.testing.assert_close(y[0], y[1])  # clamped at -1000
    torch.testing.assert_close(y[3], y[4])  # clamped at 1000
    torch.testing.assert_close(y[3], torch.tensor((1000 - 65.1084) / 178.0166))
    arr = normalize_hu(np.array([-2000, 0, 2000], dtype=np.int16))
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, normalize_hu(torch.tensor([-2000.0, 0.0, 2000.0])).numpy(), rtol=1e-6)


# ---------------------------------------------------------------- crops
def test_multicrop_shapes_and_finite():
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local=3)
    out = aug(_slice(), torch.Generator().manual_seed(0))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert all(c.shape == (1, 64, 64) and c.dtype == torch.float32 for c in out["global_crops"])
    assert all(c.shape == (1, 32, 32) for c in out["local_crops"])
    assert all(torch.isfinite(c).all() for c in out["global_crops"] + out["local_crops"])
    # default sizes from the recipe: 2 x 224 + 8 x 96
    full = MultiCropAugmentation()(_slice(), torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in full["global_crops"]] == [(1, 224, 224)] * 2
    assert [tuple(c.shape) for c in full["local_crops"]] == [(1, 96, 96)] * 8


def test_multicrop_deterministic_given_generator_and_differs_across_seeds():
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local=2)
    img = _slice()
    a = aug(img, torch.Generator().manual_seed(7))
    b = aug(img, torch.Generator().manual_seed(7))
    c = aug(img, torch.Generator().manual_seed(8))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"],
                                                     c["global_crops"] + c["local_crops"]))
    # the two global views of one image differ (independent draws)
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])


def test_multicrop_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError):
        MultiCropAugmentation(global_size=100)
    with pytest.raises(ValueError):
        MultiCropAugmentation(local_size=90)


def test_intensity_jitter_is_small_and_no_jitter_means_pure_geometry():
    img = _slice()
    plain = MultiCropAugmentation(global_size=64, local_size=32, n_local=1, jitter_p=0.0,
                                  blur_p=(0.0, 0.0, 0.0), flip_p=0.0, global_scale=(1.0, 1.0),
                                  ratio=(192 / 160, 192 / 160))
    out = plain(img, torch.Generator().manual_seed(0))
    # full-image crop without photometric change: same intensity range as the input
    g0 = out["global_crops"][0]
    assert g0.min() >= img.min() - 1e-4 and g0.max() <= img.max() + 1e-4
    jit = MultiCropAugmentation(global_size=64, local_size=32, n_local=1, jitter_p=1.0,
                                blur_p=(0.0, 0.0, 0.0), flip_p=0.0, global_scale=(1.0, 1.0),
                                ratio=(192 / 160, 192 / 160), brightness=0.1, contrast=0.2)
    j0 = jit(img, torch.Generator().manual_seed(0))["global_crops"][0]
    assert not torch.equal(j0, g0)
    # contrast within +-20 %, shift within 0.1: the value range moves by a bounded amount
    span_ratio = (j0.max() - j0.min()) / (g0.max() - g0.min())
    assert 0.8 - 1e-4 <= span_ratio <= 1.2 + 1e-4
    assert abs(j0.mean() - g0.mean()) <= 0.1 + 1e-4


def test_random_resized_crop_and_blur_helpers():
    img = torch.arange(40 * 50, dtype=torch.float32).reshape(1, 40, 50)
    g = torch.Generator().manual_seed(0)
    crop = random_resized_crop(img, 16, scale=(0.1, 0.2), generator=g)
    assert crop.shape == (1, 16, 16)
    # a small crop covers a sub-range of the (monotone) ramp
    assert crop.max() - crop.min() < img.max() - img.min()
    const = torch.full((1, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 1.5), const)  # blur preserves constants
    noisy = torch.randn(1, 32, 32, generator=g)
    assert gaussian_blur(noisy, 1.0).std() < noisy.std() * 0.7


def test_collate_orders_views_then_images():
    samples = []
    for i in range(3):
        samples.append({
            "global_crops": [torch.full((1, 32, 32), 10.0 * i + v) for v in range(2)],
            "local_crops": [torch.full((1, 16, 16), 100.0 + 10.0 * i + v) for v in range(4)],
        })
    batch = collate_crops(samples)
    assert batch["global"].shape == (6, 1, 32, 32)
    assert batch["local"].shape == (12, 1, 16, 16)
    assert batch["global"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert batch["local"][:3, 0, 0, 0].tolist() == [100, 110, 120]
    assert batch["local"][3:6, 0, 0, 0].tolist() == [101, 111, 121]
    no_local = collate_crops([{"global_crops": s["global_crops"], "local_crops": []} for s in samples])
    assert no_local["local"].shape[0] == 0


# ---------------------------------------------------------------- masking
def test_masking_generator_exact_count_blocks_and_determinism():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    for n in (0, 5, 20, 60, 98):
        m = gen(n, np.random.default_rng(n))
        assert m.shape == (14, 14) and m.dtype == bool
        assert m.sum() == n
    a = gen(50, np.random.default_rng(123))
    b = gen(50, np.random.default_rng(123))
    c = gen(50, np.random.default_rng(124))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # block-wise: masked patches mostly have a masked 4-neighbour (random scatter would not)
    def neighbour_fraction(m):
        p = np.pad(m, 1)
        nb = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        return (m & nb).sum() / m.sum()
    assert neighbour_fraction(a) > 0.9
    without_fill = MaskingGenerator((14, 14), max_num_patches=98, fill_remaining=False)
    assert without_fill(60, np.random.default_rng(0)).sum() <= 60


def test_sample_masks_ratios_probability_and_determinism():
    b, grid = 16, (14, 14)
    n = grid[0] * grid[1]
    masks = sample_masks(b, grid, (0.1, 0.5), mask_probability=0.5, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (b, n) and masks.dtype == torch.bool
    counts = masks.sum(1)
    masked = counts[counts > 0]
    assert len(masked) == 8  # exactly int(B * p) images masked, the rest none
    assert (counts[:8] > 0).sum() < 8  # rows are shuffled, masked images are not all first
    ratios = masked.float() / n
    assert ratios.min() >= 0.1 - 1 / n and ratios.max() <= 0.5
    # stratified: the ratios spread over the whole range
    assert ratios.min() < 0.2 and ratios.max() > 0.4
    again = sample_masks(b, grid, (0.1, 0.5), mask_probability=0.5, generator=torch.Generator().manual_seed(0))
    other = sample_masks(b, grid, (0.1, 0.5), mask_probability=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks, again) and not torch.equal(masks, other)
    assert sample_masks(4, grid, mask_probability=0.0, generator=0).sum() == 0
    assert (sample_masks(4, grid, mask_probability=1.0, generator=0).sum(1) > 0).all()


def test_gram_teacher_crops_are_the_global_regions_clean_at_twice_the_size():
    """DINOv3's Gram-teacher crop: the same region and flip as each global crop, at gram_size, without intensity
    jitter or blur (the global crop alone is jittered)."""
    img = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 96, 96)).astype(np.float32))
    img = gaussian_blur(img, 2.0)  # smooth: resampling paths then agree closely
    aug = MultiCropAugmentation(32, 16, n_local=1, patch_size=8, gram_size=64, jitter_p=0.0, blur_p=(0.0, 0.0, 0.0))
    out = aug(img, torch.Generator().manual_seed(3))
    assert [tuple(c.shape) for c in out["gram_crops"]] == [(1, 64, 64)] * 2
    for glob, gram in zip(out["global_crops"], out["gram_crops"]):
        down = F.interpolate(gram[None], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
        assert torch.allclose(down, glob, atol=1e-4)
    jittered = MultiCropAugmentation(32, 16, n_local=1, patch_size=8, gram_size=64, jitter_p=1.0, contrast=0.5)
    out2 = jittered(img, torch.Generator().manual_seed(3))
    assert torch.equal(out2["gram_crops"][0], out["gram_crops"][0])  # same draws, clean whatever the jitter
    batch = collate_crops([out, out2])
    assert batch["gram"].shape == (4, 1, 64, 64) and torch.equal(batch["gram"][1], out2["gram_crops"][0])
