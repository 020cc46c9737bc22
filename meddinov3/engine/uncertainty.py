"""Where the model is unsure: per-voxel normalised entropy of its class probabilities, and per-slice confidence.

Normalised entropy H = -sum_c p_c log p_c / log C lies in [0, 1]: 0 where one class has all the probability, 1
where all C classes are equally likely (0.63 for a tie of two classes out of three). It is computed from the
probabilities `--save-probabilities` stores (the model's, before post-processing), slice by slice, so the only
extra memory is one uint8 volume.

The file holds H in percent (uint8 0-100) on the input grid. The per-slice confidence is the mean of 1 - H over
the slice's voxels where the model saw any structure (background probability below 0.9): slices of plain air or
of certain background count as fully confident (1.0), so the least confident slices are where a reviewer looks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..files import atomic_path
from ..volumes import Orientation
from ..files import check_new_output
from .outputs import LABELMAP_SUFFIXES

UNCERTAINTY_SCALE = 100  # stored value = round(100 x normalised entropy)
STRUCTURE_MAX_BACKGROUND = 0.9  # a voxel "may hold a structure" below this background probability


def normalised_entropy(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """Entropy of `probabilities` along `axis` (the classes) divided by log(number of classes): float32 in [0, 1]."""
    p = np.clip(probabilities.astype(np.float32), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)
    n = probabilities.shape[axis]
    return np.clip(entropy / np.log(n), 0.0, 1.0).astype(np.float32) if n > 1 else np.zeros_like(entropy)


def uncertainty_map(probabilities: np.ndarray, background_index: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 percent uncertainty (z, y, x), structure mask (z, y, x) bool) from (classes, z, y, x) probabilities,
    one array slice at a time (the probabilities may be float16 and large)."""
    _, Z, H, W = probabilities.shape
    out = np.empty((Z, H, W), dtype=np.uint8)
    structure = np.zeros((Z, H, W), dtype=bool)
    for z in range(Z):
        out[z] = np.rint(normalised_entropy(probabilities[:, z]) * UNCERTAINTY_SCALE)
        if background_index is not None:
            structure[z] = probabilities[background_index, z] < STRUCTURE_MAX_BACKGROUND
    return out, structure


def slice_confidence(uncertainty: np.ndarray, structure: np.ndarray, image: sitk.Image) -> dict:
    """Mean confidence (1 - H) per axial slice where the model saw a structure, 1.0 where it saw none.

    Returns {"axis": image index axis (0 = i, 1 = j, 2 = k) closest to the patient's S axis, "confidence": one value
    per index along that axis, in index order, "least_confident": the indices of slices below 1.0, least confident first}.
    """
    axis = Orientation.of(image).perm[2]  # SimpleITK axis along S
    np_axis = 2 - axis
    confidence = 1.0 - uncertainty.astype(np.float32) / UNCERTAINTY_SCALE
    other = tuple(a for a in range(3) if a != np_axis)
    counts = structure.sum(axis=other)
    sums = np.where(structure, confidence, 0.0).sum(axis=other)
    per_slice = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
    order = np.argsort(per_slice, kind="stable")
    return {"axis": int(axis), "confidence": [round(float(c), 4) for c in per_slice],
            "least_confident": [int(i) for i in order if per_slice[i] < 1.0]}


def check_uncertainty_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """`--save-uncertainty` is a NIfTI, NRRD or MetaImage file (the label map suffixes)."""
    if not Path(path).name.lower().endswith(LABELMAP_SUFFIXES):
        raise ValueError(f"{path}: the uncertainty map is an image: use .nii.gz, .nii, .nrrd or .mha")
    check_new_output(path, overwrite)


def write_uncertainty(path: str | os.PathLike, uncertainty: np.ndarray, reference: sitk.Image,
                      overwrite: bool = False) -> Path:
    """Write the uint8 percent uncertainty (z, y, x) on `reference`'s grid."""
    path = Path(path)
    check_uncertainty_output(path, overwrite)
    image = sitk.GetImageFromArray(uncertainty)
    image.CopyInformation(reference)
    with atomic_path(path, suffix="".join(path.suffixes).lower()) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
