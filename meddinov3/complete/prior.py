"""The shape prior: signed distances of each label, interpolated between painted slices.

What Fill between slices does with morphology, done with distances: on every painted slice each label's in-plane
signed distance (mm, positive inside, clipped) is computed once; an unpainted slice gets the linear interpolation
of its two nearest painted neighbours, and beyond the first/last painted slice the nearest one shrinks by the
distance travelled (a cone), which `--extrapolate` uses.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLIP_MM = 30.0  # signed distances are clipped: far from any contour only the sign matters


def signed_distance(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """In-plane signed distance (mm) of a 2D mask: > 0 inside, < 0 outside, clipped to +-CLIP_MM; float32."""
    if not mask.any():
        return np.full(mask.shape, -CLIP_MM, np.float32)
    if mask.all():
        return np.full(mask.shape, CLIP_MM, np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.clip(inside - outside + np.where(mask, -0.5, 0.5) * min(spacing), -CLIP_MM, CLIP_MM).astype(np.float32)


class ShapePrior:
    """Signed distances of `values` on the painted slices of a canonical label array, interpolated to any slice.

    `labels`: (S, P, L) integers; `slices`: the painted slice indices; `spacing`: (slice, row, column) mm.
    """

    def __init__(self, labels: np.ndarray, slices, values: list[int], spacing: tuple[float, float, float]):
        self.values = list(values)
        self.slice_mm = float(spacing[0])
        self.slices = np.asarray(sorted(int(s) for s in slices))
        plane = (float(spacing[1]), float(spacing[2]))
        # (painted slice, label, row, column)
        self.sdf = np.stack([np.stack([signed_distance(labels[s] == v, plane) for v in self.values])
                             for s in self.slices])

    def at(self, z: int, exclude: int | None = None) -> np.ndarray:
        """(labels, rows, columns) interpolated signed distances at slice `z`, from the painted slices other than
        `exclude` (leave-one-out: what the prior would say there had that slice not been painted)."""
        keep = self.slices != exclude if exclude is not None else np.ones(len(self.slices), bool)
        idx = np.flatnonzero(keep)
        if len(idx) == 0:  # a single painted slice, left out: as if seen from its neighbour
            return np.maximum(self.sdf[0] - self.slice_mm, -CLIP_MM)
        zs = self.slices[idx]
        below, above = idx[zs <= z], idx[zs >= z]
        if len(below) and len(above):
            a, b = below[-1], above[0]
            za, zb = self.slices[a], self.slices[b]
            t = 0.0 if zb == za else (z - za) / (zb - za)
            return (1 - t) * self.sdf[a] + t * self.sdf[b]
        nearest = below[-1] if len(below) else above[0]
        shrink = abs(z - self.slices[nearest]) * self.slice_mm
        return np.maximum(self.sdf[nearest] - shrink, -CLIP_MM)

    def distance(self, z: int, exclude: int | None = None) -> float:
        """mm from slice `z` to the nearest painted slice other than `exclude` (one slice when there is none)."""
        others = self.slices[self.slices != exclude] if exclude is not None else self.slices
        return float(np.abs(others - z).min()) * self.slice_mm if len(others) else self.slice_mm

    def labels_at(self, z: int) -> np.ndarray:
        """(rows, columns) label values the interpolation alone gives at slice `z` (0 where every distance < 0)."""
        sdf = self.at(z)
        best = sdf.argmax(axis=0)
        out = np.asarray(self.values, dtype=np.int64)[best]
        return np.where(sdf.max(axis=0) > 0, out, 0)
