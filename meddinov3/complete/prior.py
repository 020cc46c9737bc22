"""The shape prior: each label's in-plane signed distances, interpolated between painted slices structure by structure.

What Fill between slices does with morphology, done with distances. Between two painted slices, the sections of a
label are grouped into structures (connected pieces of the two sections laid over each other):
- a structure seen on both slices is interpolated as a moving shape: both signed distances (mm, positive inside,
  clipped) slide towards each other along the line joining the sections' centroids, then blend linearly, so a lesion
  that moves between slices is followed instead of fading out in the middle;
- a structure seen on one slice only ends in the gap: its section shrinks as a cone that closes at the other slice.
Beyond the first/last painted slice the nearest section shrinks by the distance travelled (`--extrapolate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


@dataclass
class Structure:
    """One structure between two painted slices, on its own crop of the plane (`rows`, `cols` slices).

    `below` / `above`: signed distances of its section on the lower / upper slice (None where it is absent);
    `shift`: (rows, columns) px from the lower section's centroid to the upper one's (zero when one is absent)."""
    rows: slice
    cols: slice
    below: np.ndarray | None
    above: np.ndarray | None
    shift: np.ndarray

    def at(self, t: float) -> np.ndarray:
        """Signed distances on the crop at fraction `t` (0 = lower slice, 1 = upper slice) of the gap."""
        if self.below is None or self.above is None:
            sdf, travelled = (self.below, t) if self.above is None else (self.above, 1 - t)
            return np.maximum(sdf - float(sdf.max()) * travelled, -CLIP_MM)  # a cone closing at the other slice
        below = ndimage.shift(self.below, t * self.shift, order=1, mode="nearest")
        above = ndimage.shift(self.above, -(1 - t) * self.shift, order=1, mode="nearest")
        return (1 - t) * below + t * above


def structures(below: np.ndarray, above: np.ndarray, plane: tuple[float, float]) -> list[Structure]:
    """The structures of two 2D masks (sections of one label on consecutive painted slices); `plane`: mm/px."""
    groups, _ = ndimage.label(below | above)
    found = []
    for i, box in enumerate(ndimage.find_objects(groups), start=1):
        part = groups[box] == i
        lower, upper = below[box] & part, above[box] & part
        shift = (np.subtract(ndimage.center_of_mass(upper), ndimage.center_of_mass(lower))
                 if lower.any() and upper.any() else np.zeros(2))
        # grown so that the clipped distances and the slide fit on the crop
        rows, cols = (slice(max(0, b.start - m), min(n, b.stop + m)) for b, n, m in zip(
            box, below.shape, (int(np.ceil(CLIP_MM / s + abs(d))) + 1 for s, d in zip(plane, shift))))
        crop = groups[rows, cols] == i
        sections = [signed_distance(m[rows, cols] & crop, plane) if (m[box] & part).any() else None
                    for m in (below, above)]
        found.append(Structure(rows, cols, sections[0], sections[1], shift))
    return found


class ShapePrior:
    """Signed distances of `values` on the painted slices of a canonical label array, interpolated to any slice.

    `labels`: (S, P, L) integers; `slices`: the painted slice indices; `spacing`: (slice, row, column) mm.
    """

    def __init__(self, labels: np.ndarray, slices, values: list[int], spacing: tuple[float, float, float]):
        self.values = list(values)
        self.slice_mm = float(spacing[0])
        self.plane = (float(spacing[1]), float(spacing[2]))
        self.slices = np.asarray(sorted(int(s) for s in slices))
        self.sections = {int(s): np.asarray(labels[s]) for s in self.slices}
        self._structures = lru_cache(maxsize=None)(self._between)
        self._sdf = lru_cache(maxsize=8)(self._section_sdf)

    def _between(self, lower: int, upper: int, value: int) -> list[Structure]:
        return structures(self.sections[lower] == value, self.sections[upper] == value, self.plane)

    def _section_sdf(self, z: int, value: int) -> np.ndarray:
        return signed_distance(self.sections[z] == value, self.plane)

    def _interpolate(self, lower: int, upper: int, z: int, value: int) -> np.ndarray:
        if lower == upper:
            return self._sdf(lower, value)
        out = np.full(self.sections[lower].shape, -CLIP_MM, np.float32)
        t = (z - lower) / (upper - lower)
        for s in self._structures(lower, upper, value):
            np.maximum(out[s.rows, s.cols], s.at(t), out=out[s.rows, s.cols])
        return out

    def at(self, z: int, exclude: int | None = None) -> np.ndarray:
        """(labels, rows, columns) interpolated signed distances at slice `z`, from the painted slices other than
        `exclude` (leave-one-out: what the prior would say there had that slice not been painted)."""
        zs = self.slices[self.slices != exclude] if exclude is not None else self.slices
        if len(zs) == 0:  # a single painted slice, left out: as if seen from its neighbour
            return self._shrunk(int(self.slices[0]), self.slice_mm)
        below, above = zs[zs <= z], zs[zs >= z]
        if len(below) and len(above):
            return np.stack([self._interpolate(int(below[-1]), int(above[0]), z, v) for v in self.values])
        nearest = int(below[-1] if len(below) else above[0])
        return self._shrunk(nearest, abs(z - nearest) * self.slice_mm)

    def _shrunk(self, painted: int, mm: float) -> np.ndarray:
        """(labels, rows, columns): the sections of painted slice `painted` shrunk by `mm` (a cone beyond it)."""
        return np.stack([np.maximum(self._sdf(painted, v) - mm, -CLIP_MM) for v in self.values])

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
