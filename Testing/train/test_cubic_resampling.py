"""The reference recipe's image resampling is nnU-Net's: scikit-image's resize(order=3, mode="edge",
anti_aliasing=False), checked against scikit-image itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# scikit-image is a test extra of the main suite; the Slicer-Python leg (which deselects this module) has none
resize = pytest.importorskip("skimage.transform").resize

from meddinov3.data.cache import resize_cubic


@pytest.mark.parametrize("size", [(48, 40), (17, 23), (32, 30)])
def test_resize_cubic_is_scikit_images_resize(size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 32, 30)).astype(np.float32) * 100
    ours = resize_cubic(torch.from_numpy(x), size).numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, 1, *size)
    for b in range(2):
        expected = resize(x[b, 0].astype(np.float64), size, order=3, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(ours[b, 0], expected, rtol=1e-5, atol=1e-3)
