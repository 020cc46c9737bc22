"""Orientation: the engine's canonical voxel layout, orientation codes, and images stored another way.

Geometry convention: SimpleITK images, numpy arrays in SimpleITK order (z, y, x). The engine works on a
*canonical* array whose axes are patient (S, P, L) in LPS: axial slices along axis 0, rows anterior ->
posterior, columns right -> left (the usual radiological display). `Orientation` maps any file's axis order,
flips and (nearest-axis) oblique direction cosines to that layout and back exactly, by pure permutation and
flipping of voxels: no resampling, so the round trip is lossless.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Orientation:
    """How an image's voxel axes map to the canonical (S, P, L) array, and back.

    `perm[a]` is the SimpleITK index axis (0=i/x, 1=j/y, 2=k/z) that runs along patient axis a (0=L, 1=P, 2=S),
    `flip[a]` whether it runs the opposite way (towards R, A or I).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def of(cls, image_or_direction) -> "Orientation":
        d = image_or_direction.GetDirection() if hasattr(image_or_direction, "GetDirection") else image_or_direction
        m = np.asarray(d, float).reshape(3, 3)  # column i = direction of index axis i in LPS
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(m[a, p[a]]) for a in range(3)))
        return cls(tuple(int(p) for p in best), tuple(bool(m[a, best[a]] < 0) for a in range(3)))

    def _np_axes(self) -> list[int]:
        # canonical numpy axis n is patient axis 2-n, held by sitk axis perm[2-n] = numpy axis 2-perm[2-n]
        return [2 - self.perm[2 - n] for n in range(3)]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(…, z, y, x) array of the image -> (…, S, P, L) view (leading axes, e.g. classes, kept)."""
        lead = array.ndim - 3
        out = np.transpose(array, list(range(lead)) + [lead + a for a in self._np_axes()])
        flips = [lead + n for n in range(3) if self.flip[2 - n]]
        return np.flip(out, flips) if flips else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of `to_canonical`."""
        lead = array.ndim - 3
        flips = [lead + n for n in range(3) if self.flip[2 - n]]
        out = np.flip(array, flips) if flips else array
        inv = np.argsort(self._np_axes())
        return np.transpose(out, list(range(lead)) + [lead + int(a) for a in inv])

    def canonical_spacing(self, spacing) -> tuple[float, float, float]:
        """(slice, row, column) spacing of the canonical array: (S, P, L) = sitk spacing of perm[2], perm[1], perm[0]."""
        return tuple(float(spacing[self.perm[a]]) for a in (2, 1, 0))


# where an index axis points, in LPS: L/P/S along +x/+y/+z, R/A/I the opposite way (DICOMOrient's letters)
_AXIS_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def check_orientation_code(code: str) -> str:
    """An orientation code such as 'RAS' or 'LPS' (upper-cased): letter i says where index axis i (x, y, z) points,
    as in ITK's DICOMOrient; one letter per patient axis. ValueError otherwise."""
    text = str(code).strip().upper()
    if len(text) != 3 or any(c not in _AXIS_LETTERS for c in text) or len({_AXIS_LETTERS[c][0] for c in text}) != 3:
        raise ValueError(f"orientation code {code!r} must be three letters, one of L/R, one of P/A and one of S/I, "
                         "each saying where an index axis (x, y, z) points: e.g. RAS (NIfTI files) or LPS (DICOM)")
    return text


def direction_of_code(code: str) -> tuple[float, ...]:
    """SimpleITK direction (9 numbers, LPS) of an image stored in orientation `code`."""
    m = np.zeros((3, 3))
    for axis, letter in enumerate(check_orientation_code(code)):
        patient, sign = _AXIS_LETTERS[letter]
        m[patient, axis] = sign
    return tuple(float(v) for v in m.ravel())


def reoriented(image: sitk.Image, perm: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> sitk.Image:
    """Same voxels in the same physical place, stored with another axis order/flips (for tests and tools).

    New index axis i is old axis perm[i], reversed where flip[i].
    """
    out = sitk.PermuteAxes(image, [int(p) for p in perm])
    if any(flip):
        out = sitk.Flip(out, [bool(f) for f in flip])
    return out
