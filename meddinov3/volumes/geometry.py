"""Voxel grids: comparing two, putting an array on one, cropping one to a voxel box."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Voxels (z, y, x) on `reference`'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def crop_box(image: sitk.Image, roi) -> tuple[sitk.Image, tuple[int, int, int], tuple[int, int, int]]:
    """Crop to a voxel box (x0, y0, z0, x1, y1, z1): inclusive start, exclusive end, clipped to the image.

    Returns the cropped image (same physical placement) and the clipped start / end indices (x, y, z).
    """
    if len(roi) != 6:
        raise ValueError(f"ROI needs 6 numbers x0,y0,z0,x1,y1,z1, got {len(roi)}")
    x0, y0, z0, x1, y1, z1 = (int(v) for v in roi)
    size = image.GetSize()
    lo = tuple(max(0, v) for v in (x0, y0, z0))
    hi = tuple(min(s, v) for s, v in zip(size, (x1, y1, z1)))
    if any(b <= a for a, b in ((x0, x1), (y0, y1), (z0, z1))):
        raise ValueError(f"ROI {tuple(roi)} is empty: each end (x1, y1, z1) must be larger than its start "
                         "(x0, y0, z0; the end is exclusive)")
    if any(h <= l for l, h in zip(lo, hi)):
        raise ValueError(f"ROI {tuple(roi)} does not overlap the image (size {size})")
    return sitk.RegionOfInterest(image, [h - l for l, h in zip(lo, hi)], list(lo)), lo, hi
