"""Sparse labels for `complete`: reading them (any label file `segment` reads, `.seg.nrrd` with its segment names
and colours), checking them against the image, and finding the painted slices.

Slices are the engine's: axis 0 of the canonical (S, P, L) array (`volumes.Orientation`). A slice is painted when
it holds any non-zero label; in a painted slice every voxel is truth (0 = background).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..checkpoints.package import ClassInfo
from ..volumes import InputError, read_image, same_geometry

MAX_LABEL_VALUE = 65535  # label maps are written as uint8 or uint16


@dataclass
class PaintedSlices:
    """What the annotator painted, on the canonical slices.

    `slices`: sorted indices of painted slices; `values`: the non-zero label values painted, sorted;
    `ranges[value]`: (first, last) painted slice holding that value (both inclusive).
    """

    slices: np.ndarray
    values: list[int]
    ranges: dict[int, tuple[int, int]]


def read_sparse(path: str | os.PathLike) -> tuple[sitk.Image, list[ClassInfo] | None]:
    """The label map of `path` and, for a `.seg.nrrd`, its segments as classes (names and colours kept)."""
    image = read_image(path)
    if not Path(path).name.lower().endswith(".seg.nrrd"):
        return image, None
    import slicerio

    try:
        info = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as e:  # noqa: BLE001 - slicerio raises plain exceptions for bad headers
        raise InputError(path, f"unreadable segmentation header ({e})") from None
    classes = [ClassInfo(0, "background")]
    for seg in info.get("segments", []):
        color = seg.get("color")
        classes.append(ClassInfo(int(seg["labelValue"]), str(seg.get("name") or f"label_{seg['labelValue']}"),
                                 tuple(int(round(255 * c)) for c in color) if color else None))
    return image, classes


def label_array(sparse: sitk.Image, image: sitk.Image, source: str | os.PathLike = "<labels>") -> np.ndarray:
    """The sparse labels as a non-negative integer array (z, y, x) on `image`'s grid, or an InputError saying why not."""
    if not same_geometry(sparse, image, tol=1e-4):
        raise InputError(source, f"labels are on another grid than the image (size {sparse.GetSize()} vs "
                                  f"{image.GetSize()}, spacing {_round(sparse.GetSpacing())} vs "
                                  f"{_round(image.GetSpacing())}, origin {_round(sparse.GetOrigin())} vs "
                                  f"{_round(image.GetOrigin())}); resample them onto the image first")
    if sparse.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(source, "labels must be one label map (a single-layer segmentation)")
    values = sitk.GetArrayViewFromImage(sparse)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError(source, "label values must be whole numbers (found fractional or NaN values)")
    if values.size and (values.min() < 0 or values.max() > MAX_LABEL_VALUE):
        raise InputError(source, f"label values must be 0..{MAX_LABEL_VALUE} (found {values.min():g}.."
                                  f"{values.max():g}); the output label map cannot hold them")
    dtype = np.uint8 if values.size == 0 or values.max() <= 255 else np.uint16
    return np.asarray(values, dtype=dtype)


def painted_slices(canonical: np.ndarray, extrapolate: bool, source: str | os.PathLike = "<labels>") -> PaintedSlices:
    """Painted slices and each label's slice range of a canonical (S, P, L) label array; InputError when there is
    nothing to complete from (no painted slice; one painted slice without `extrapolate`)."""
    per_slice = canonical.reshape(canonical.shape[0], -1)
    slices = np.flatnonzero(per_slice.any(axis=1))
    if len(slices) == 0:
        raise InputError(source, "no painted slice (every voxel is 0): paint the structure on a few slices first")
    if len(slices) == 1 and not extrapolate:
        raise InputError(source, f"only one painted slice ({int(slices[0])}): paint at least two slices of the "
                                  "structure, or pass --extrapolate to grow it from one")
    values = sorted(int(v) for v in np.unique(canonical[slices]) if v != 0)
    ranges = {}
    for v in values:
        holding = [int(z) for z in slices if np.any(canonical[z] == v)]
        ranges[v] = (holding[0], holding[-1])
    return PaintedSlices(slices, values, ranges)


def _round(values) -> tuple:
    return tuple(round(float(v), 3) for v in values)
