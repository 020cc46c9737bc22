"""DICOM series: the one series of a folder to read, and slices that no regular grid holds."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from .errors import InputError, itk_warnings_off


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """File names of the largest DICOM series directly in `folder` (empty when there is none).

    A scout or a dose report beside the CT is smaller than it; two series of the same size (two kernels or phases)
    are refused, since picking one would be a guess.
    """
    reader = sitk.ImageSeriesReader
    with itk_warnings_off():  # GDCM warns "No Series were found" for other folders
        ids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    series = sorted(((reader.GetGDCMSeriesFileNames(str(folder), sid), sid) for sid in ids), key=lambda s: -len(s[0]))
    if len(series) > 1 and len(series[0][0]) == len(series[1][0]):
        tied = [sid for files, sid in series if len(files) == len(series[0][0])]
        raise InputError(folder, f"holds {len(series)} DICOM series, {len(tied)} of them with {len(series[0][0])} "
                                 f"files each (series UIDs {', '.join(tied)}): put the series to segment in a "
                                 "folder of its own")
    return list(series[0][0]) if series else []


def check_slice_positions(path, positions: list[str | None], direction, tolerance: float = 0.1,
                          spacing=None) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced (missing or duplicate slices): ITK would average
    the spacing and put every slice after a gap in the wrong place. Refuse a sheared series too (gantry tilt:
    slices stepping sideways, not along their normal): ITK stacks them along the normal, so the image and its
    label map would be off by up to the shear.

    `positions`: ImagePositionPatient ("x\\y\\z") of each file in series order; `direction`: the image's
    direction cosines (third column: the slice normal). Steps may differ by `tolerance` x the median step; the
    slices may drift sideways by half a pixel (`spacing`: x, y pixel spacing; else 0.5 mm) in all.
    """
    try:
        points = np.array([[float(v) for v in p.split("\\")] for p in positions], dtype=float)
    except (AttributeError, ValueError):
        return  # no (or unparsable) positions: nothing to check against
    if len(points) < 2 or points.ndim != 2 or points.shape[1] != 3:
        return
    normal = np.asarray(direction, float).reshape(3, 3)[:, 2]
    rel = points - points[0]
    drift = float(np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1).max())
    if drift > 0.5 * (min(spacing[:2]) if spacing is not None else 1.0):
        raise InputError(path, f"DICOM series is sheared (gantry tilt?): its slices drift {drift:.3g} mm sideways "
                               f"from the slice normal over {len(points)} slices, so no grid holds them as they "
                               "are; resample it to a regular grid first (e.g. Slicer's DICOM import with "
                               "acquisition geometry regularization)")
    if len(points) < 3:
        return
    steps = np.diff(points @ normal)
    median = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - median) > tolerance * abs(median))
    if abs(median) < 1e-6 or len(off):
        i = int(off[0]) if len(off) else 0
        raise InputError(path, f"DICOM slices are unevenly spaced: {abs(steps[i]):.3g} mm between slices {i + 1} and "
                               f"{i + 2} of {len(points)}, {abs(median):.3g} mm elsewhere (missing or duplicate "
                               "slices?)")
