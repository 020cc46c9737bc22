"""Slice preparation: intensity normalisation (the model's scheme) and in-plane resampling to its spacing."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Pretraining constants of the reference demo ("ct_hu").
CT_HU_CLIP = (-1000.0, 1000.0)
CT_HU_MEAN, CT_HU_STD = 65.1084, 178.0166


def make_normalizer(norm: dict, volume: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place-safe function float tensor -> normalised tensor. Per-volume statistics come from `volume`."""
    scheme = (norm or {}).get("scheme", "ct_hu")
    if scheme == "ct":
        lo, hi, mean, std = (float(norm[k]) for k in ("lower", "upper", "mean", "std"))
        return lambda x: (x.clamp_(lo, hi) - mean) / max(std, 1e-8)
    if scheme == "ct_hu":
        return lambda x: (x.clamp_(*CT_HU_CLIP) - CT_HU_MEAN) / CT_HU_STD
    if scheme == "zscore":
        sample = volume[:: max(1, volume.shape[0] // 64)].astype(np.float64)
        if norm.get("use_mask"):
            sample = sample[sample != 0] if np.any(sample != 0) else sample
        mean, std = float(sample.mean()), float(sample.std())
        return lambda x: (x - mean) / max(std, 1e-8)
    if scheme == "rescale01":
        lo, hi = float(volume.min()), float(volume.max())
        return lambda x: (x - lo) / max(hi - lo, 1e-8)
    if scheme == "none":
        return lambda x: x
    raise ValueError(f"unknown normalisation scheme {scheme!r}")


def target_spacing(spec, in_plane: tuple[float, float], fast: bool = False) -> tuple[float, float]:
    """(row, column) spacing the network runs at: the model's, or the image's when the model has none.

    `fast`: the model's `fast` spacing, or twice the normal spacing when it has none.
    """
    normal = tuple(float(s) for s in (spec.spacing or in_plane))
    if not fast:
        return normal
    if spec.fast and spec.fast.get("spacing"):
        return tuple(float(s) for s in spec.fast["spacing"])
    return (2 * normal[0], 2 * normal[1])


def fast_slice_step(spec, slice_spacing: float, in_plane_target: tuple[float, float]) -> int:
    """Fast mode predicts every n-th slice and interpolates between them: n keeps the predicted slices about as far
    apart as the fast in-plane spacing (or the model's `fast.slice_spacing` mm), so 5 mm slices are all predicted."""
    wanted = float((spec.fast or {}).get("slice_spacing") or min(in_plane_target))
    return max(1, int(round(wanted / max(slice_spacing, 1e-6))))


def resampled_shape(shape: tuple[int, int], spacing: tuple[float, float], target: tuple[float, float]) -> tuple[int, int]:
    """Slice size covering the same extent at `target` spacing (nnU-Net rounds the same way)."""
    return tuple(max(1, int(round(s / t * n))) for n, s, t in zip(shape, spacing, target))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) (pixel centres aligned to the same physical extent); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def spline_resize(array: np.ndarray, shape, order: int) -> np.ndarray:
    """scikit-image's resize(mode='edge', anti_aliasing=False), which nnU-Net calls on images and logits: a
    grid-mode spline zoom of order `order`, clipped to the input's range; float64."""
    from scipy import ndimage

    array = np.asarray(array, dtype=np.float64)
    out = ndimage.zoom(array, np.divide(shape, array.shape), order=order, mode="nearest", grid_mode=True)
    return np.clip(out, array.min(), array.max(), out=out)
