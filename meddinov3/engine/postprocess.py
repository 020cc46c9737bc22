"""Label clean-up (3D, scipy.ndimage): keep the largest connected region, fill holes, and the steps a model
package declares in its `model.json` (`postprocessing`, see `check_postprocessing` for the format), which the
engine applies unless told not to."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected


def largest_region(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), opening_mm: float = 0.0) -> np.ndarray:
    """The part of `mask` to keep: its largest 26-connected component.

    `opening_mm` > 0 first cuts bridges thinner than about twice that radius: the cores of `mask` (voxels farther
    than the radius from its outside, per-axis `spacing` in mm) are its parts' seeds, every voxel belongs to the
    nearest seed, and only the largest seed's voxels within two radii of it stay. False positives that touch an
    organ through a thin contact go; the organ's own corners and edges (within radius x sqrt(3)) stay.
    """
    keep = np.zeros_like(mask, dtype=bool)
    if not mask.any():
        return keep
    pad = [int(np.ceil(2 * opening_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(int(i.min()) - p, 0), int(i.max()) + p + 1) for i, p in zip(np.nonzero(mask), pad))
    m = mask[box]
    seeds = ndimage.distance_transform_edt(m, sampling=spacing) > opening_mm if opening_mm > 0 else m
    if not seeds.any():  # everything thinner than the opening: plain connectivity
        seeds = m
    cc, _ = ndimage.label(seeds, structure=_CONNECTIVITY)
    sizes = np.bincount(cc.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    if seeds is m:
        keep[box] = cc == largest
        return keep
    distance, nearest = ndimage.distance_transform_edt(cc == 0, sampling=spacing, return_indices=True)
    region = m & (cc[tuple(nearest)] == largest) & (distance <= 2 * opening_mm)
    cc, _ = ndimage.label(region, structure=_CONNECTIVITY)
    keep[box] = cc == int(np.bincount(cc[seeds & (cc > 0)]).argmax())  # the piece that holds the largest seed
    return keep


def keep_largest_component(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """Per label: voxels outside its largest 26-connected component become background (in place)."""
    for value in np.unique(labels):
        if value != background:
            mask = labels == value
            labels[mask & ~largest_region(mask)] = background
    return labels


def fill_holes(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """Per label: enclosed background cavities take the label (other labels inside are left alone; in place)."""
    for value in np.unique(labels):
        if value == background:
            continue
        filled = ndimage.binary_fill_holes(labels == value)
        labels[filled & (labels == background)] = value
    return labels


def apply_postprocessing(labels: np.ndarray, steps: list[dict], label_of_index: Sequence[int],
                         spacing: Sequence[float], background: int = 0) -> np.ndarray:
    """Run a package's steps (checked by `checkpoints.package.check_postprocessing`) on a class-index volume (`label_of_index[i]` = label value of index i) in place."""
    for step in steps:
        indices = [i for i, v in enumerate(label_of_index) if v in step["labels"]]
        mask = np.isin(labels, indices)
        labels[mask & ~largest_region(mask, spacing, step["opening_mm"])] = background
    return labels
