"""Label clean-up per class: keep the largest connected component, fill holes (3D, scipy.ndimage)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """Per label: voxels outside its largest 26-connected component become background (in place)."""
    structure = np.ones((3, 3, 3), bool)
    for value in np.unique(labels):
        if value == background:
            continue
        mask = labels == value
        cc, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            labels[mask & (cc != int(sizes.argmax()))] = background
    return labels


def fill_holes(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """Per label: enclosed background cavities take the label (other labels inside are left alone; in place)."""
    for value in np.unique(labels):
        if value == background:
            continue
        filled = ndimage.binary_fill_holes(labels == value)
        labels[filled & (labels == background)] = value
    return labels
