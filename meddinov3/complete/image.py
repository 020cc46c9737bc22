"""The head's per-voxel image features, computed on the run's device.

Gaussian filters as `scipy.ndimage` defines them with mode "nearest" (kernel radius 4 sigma, edges padded by
repeating the border voxel). On a GPU they run as separable 1D convolutions in torch (the features of a
512 x 512 x 300 CT in well under a second, where scipy takes ~25 s on two cores); on a CPU scipy's own loops are
faster than torch's 1D convolutions, so scipy computes them there. Both give the same values (tested).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage


def _kernel(sigma: float, derivative: bool, device: torch.device) -> torch.Tensor:
    """1D Gaussian (or its first derivative) sampled on whole voxels, exactly as scipy.ndimage samples it (a sigma of
    0 leaves the axis as it is, as scipy skips it)."""
    if sigma <= 1e-15:
        return torch.ones(1, device=device)
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return -x / sigma ** 2 * g if derivative else g


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    moved = x.movedim(axis, -1)
    shape = moved.shape
    r = len(kernel) // 2
    rows = F.pad(moved.reshape(-1, 1, shape[-1]), (r, r), mode="replicate")
    return F.conv1d(rows, kernel.flip(0).view(1, 1, -1)).reshape(shape).movedim(-1, axis)


def gaussian(x: torch.Tensor, sigmas, derivative_axis: int | None = None) -> torch.Tensor:
    """`x` (S, P, L) float32 smoothed with per-axis `sigmas` (voxels); along `derivative_axis` the derivative of
    the Gaussian instead (per voxel)."""
    for axis, sigma in enumerate(sigmas):
        x = _filter_axis(x, _kernel(float(sigma), axis == derivative_axis, x.device), axis)
    return x


def gradient_magnitude(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Gradient magnitude (per voxel) of `x` smoothed with `sigmas`, as `scipy.ndimage.gaussian_gradient_magnitude`."""
    return torch.sqrt(sum(gaussian(x, sigmas, derivative_axis=axis) ** 2 for axis in range(x.dim())))


def _robust_scale(volume: np.ndarray) -> tuple[float, float]:
    sample = volume[:: max(1, volume.shape[0] // 32)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(max(hi - lo, 1e-6))


def _foreground_window(volume: np.ndarray, labels: np.ndarray, slices) -> tuple[float, float]:
    """Median and spread of the painted structures' intensities: the head gets a channel windowed on them."""
    values = volume[slices][labels[slices] != 0]
    return float(np.median(values)), float(max(np.percentile(values, 95) - np.percentile(values, 5), 1e-6))


@torch.no_grad()
def image_features(volume: np.ndarray, labels: np.ndarray, slices, spacing, device: torch.device) -> torch.Tensor:
    """(8, S, P, L) float16 features of a canonical (sub-)volume, on `device`: intensity robust-scaled, windowed
    on the painted structures (`labels` on the painted `slices`), smoothed at 1, 2, 4 and 8 mm (the last one the
    surroundings: inside an organ or not), gradient magnitude at 1 and 3 mm (3D: neighbouring slices count)."""
    lo, span = _robust_scale(volume)
    center, width = _foreground_window(volume, labels, slices)
    on_cpu = device.type == "cpu"
    raw = torch.from_numpy(np.array(volume, dtype=np.float32)).to(device)  # a copy: `volume` may be read-only
    scaled = (raw - lo) / span
    windowed = ((raw - center) / width).clamp(-3, 3)
    del raw
    if on_cpu:  # scipy: faster than torch's 1D convolutions on a CPU, same values
        def smooth(x, sigmas):
            return torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigmas, mode="nearest"))

        def gradient(x, sigmas):
            return torch.from_numpy(ndimage.gaussian_gradient_magnitude(x.numpy(), sigmas, mode="nearest"))
    else:
        smooth, gradient = gaussian, gradient_magnitude

    def sig(mm: float) -> list[float]:  # sigma in voxels along (S, P, L)
        return [mm / s for s in spacing]

    feats = torch.empty((8, *volume.shape), dtype=torch.float16, device=device)
    feats[0], feats[1] = scaled, windowed
    for i, mm in enumerate((1.0, 2.0, 4.0, 8.0), start=2):
        feats[i] = smooth(windowed, sig(mm))
    for i, mm in enumerate((1.0, 3.0), start=6):
        feats[i] = gradient(scaled, sig(mm))
    return feats
