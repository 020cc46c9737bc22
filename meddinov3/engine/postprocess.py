"""Label clean-up (3D, scipy.ndimage): keep the largest connected region, fill holes, and the steps a model
package declares in its `model.json` (`postprocessing`, see `check_postprocessing` for the format), which the
engine applies unless told not to."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected
MAX_OPENING_VOXELS = 16  # opening radius per axis, in voxels: finer axes are treated as this coarse


def ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Structuring element: the voxel offsets within `radius_mm` of the centre (per-axis `spacing` in mm)."""
    half = [int(np.floor(radius_mm / s)) for s in spacing]
    grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip(grid, spacing)) <= 1


def largest_region(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), opening_mm: float = 0.0) -> np.ndarray:
    """The part of `mask` to keep: its largest 26-connected component.

    `opening_mm` = r > 0 first cuts bridges thinner than about 2 r: the cores of `mask` are the voxels whose ball of
    radius r (mm, per-axis `spacing`) lies inside it; the cores then grow one voxel a step inside `mask`, up to 2 r
    along each axis, each voxel going to the core that reaches it first (ties: the largest), and the largest core's
    voxels stay. False positives that touch an organ through a thin contact go; the organ's own corners and edges
    stay. About 4 s for a liver-sized mask in a 512 x 512 x 300 CT. Along axes finer than r / MAX_OPENING_VOXELS
    the opening is that many voxels.
    """
    keep = np.zeros_like(mask, dtype=bool)
    if not mask.any():
        return keep
    if opening_mm > 0:  # bounded work: a 2 mm ball at 0.001 mm spacing would be a 476 GiB structuring element
        spacing = [max(float(s), opening_mm / MAX_OPENING_VOXELS) for s in spacing]
    pad = [int(np.ceil(2 * opening_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(int(i.min()) - p, 0), int(i.max()) + p + 1) for i, p in zip(np.nonzero(mask), pad))
    m = mask[box]
    cores = ndimage.binary_erosion(m, ball(opening_mm, spacing)) if opening_mm > 0 else m
    if not cores.any():  # everything thinner than the opening: plain connectivity
        cores = m
    cc, _ = ndimage.label(cores, structure=_CONNECTIVITY)
    sizes = np.bincount(cc.ravel())
    sizes[0] = 0
    largest = cc == int(sizes.argmax())
    if cores is m:
        keep[box] = largest
        return keep
    owner = np.where(largest, 2, np.where(cc > 0, 1, 0)).astype(np.uint8)  # 2 = the largest core, 1 = any other
    reach = [int(np.floor(2 * opening_mm / s)) for s in spacing]
    for step in range(max(reach)):
        grown = ndimage.maximum_filter(owner, size=tuple(3 if step < r else 1 for r in reach))
        new = (owner == 0) & m & (grown > 0)
        owner[new] = grown[new]
    cc, _ = ndimage.label(owner == 2, structure=_CONNECTIVITY)
    keep[box] = cc == int(np.bincount(cc[largest]).argmax())  # the piece that holds the largest core
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
    """Run a package's steps (checked by `checkpoints.package.check_postprocessing`) in place on a class-index
    volume (`label_of_index[i]` = label value of index i)."""
    for step in steps:
        indices = [i for i, v in enumerate(label_of_index) if v in step["labels"]]
        mask = np.isin(labels, indices)
        labels[mask & ~largest_region(mask, spacing, step["opening_mm"])] = background
    return labels
