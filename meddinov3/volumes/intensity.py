"""Checks on an image in memory: shape, spacing and direction, finite values, and CT in Hounsfield units."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .headers import check_header


def validate_image(image: sitk.Image, path: str | os.PathLike = "<image>", modality: str | None = "CT",
                   num_classes: int = 2, probabilities: bool = False) -> np.ndarray:
    """Check an in-memory image (shape, spacing, values); returns its voxels as a numpy view (z, y, x)."""
    check_header(path, image.GetSize(), image.GetSpacing(), image.GetDimension(),
                 image.GetNumberOfComponentsPerPixel(), num_classes, probabilities, available=1 << 62)
    direction = np.array(image.GetDirection(), float)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction.reshape(3, 3))) < 1e-3:
        raise InputError(path, "has a degenerate direction matrix")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            n = int(finite.size - finite.sum())
            raise InputError(path, f"contains {n} NaN or infinite voxel value(s)")
    if modality and modality.upper() == "CT":
        check_hounsfield(array, path)
    return array


def check_hounsfield(array: np.ndarray, path) -> None:
    """Reject volumes that are clearly not in Hounsfield units (normalised, MR, unsigned raw CT)."""
    sample = array[:: max(1, array.shape[0] // 64)]
    lo, hi = float(sample.min()), float(sample.max())
    lo, hi = min(lo, float(array.min())), max(hi, float(array.max()))
    if hi < 0:
        why = "all values are negative"
    elif hi - lo < 100:
        why = "the range is far too narrow (normalised or non-CT image?)"
    elif lo >= 0:
        why = "there are no negative values (no air or fat: not HU; MR image or raw unsigned CT without rescaling?)"
    else:
        return
    raise InputError(path, f"intensities [{lo:g}, {hi:g}] are not CT Hounsfield units: {why}")
