"""The head's image features: the torch filters (GPU path) give scipy's values (CPU path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from meddinov3.complete.image import gaussian, gradient_magnitude, image_features


@pytest.mark.parametrize("sigmas", [(1.0, 1.3, 1.3), (0.2, 5.3, 5.3), (4.0, 10.7, 10.7), (0.0, 2.0, 1.0), (0.1, 0.3, 1.0)])
def test_torch_filters_match_scipy(sigmas):
    """Anisotropic voxels (thick slices: a sigma below one voxel along S; scipy's degenerate sigmas too: 0 skips
    the axis, below 1/8 voxel the kernel is one tap) and long kernels on a volume shorter than the kernel along S."""
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=(12, 60, 70)).astype(np.float32), 1) * 10
    x = torch.from_numpy(volume)
    np.testing.assert_allclose(gaussian(x, sigmas).numpy(), ndimage.gaussian_filter(volume, sigmas, mode="nearest"),
                               atol=1e-5)
    np.testing.assert_allclose(gradient_magnitude(x, sigmas).numpy(),
                               ndimage.gaussian_gradient_magnitude(volume, sigmas, mode="nearest"), atol=1e-5)


def test_image_features_channels():
    """Eight float16 channels on the device; the windowed channel is centred on the painted structure."""
    volume = np.full((6, 20, 20), -100.0, np.float32)
    volume[:, 5:15, 5:15] = 60.0
    labels = np.zeros(volume.shape, np.uint8)
    labels[[0, 5], 5:15, 5:15] = 1
    feats = image_features(volume, labels, [0, 5], (2.0, 1.0, 1.0), torch.device("cpu"))
    assert feats.shape == (8, 6, 20, 20) and feats.dtype == torch.float16
    assert float(feats[1, 3, 10, 10]) == 0.0 and float(feats[1, 3, 0, 0]) == -3.0  # windowed on the structure
    assert float(feats[6, 3, 10, 4]) > float(feats[6, 3, 10, 10])  # the gradient is at the edge
