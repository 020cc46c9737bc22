"""Per-structure statistics of a label map over its image: what a report or a research pipeline tabulates.

Shape and intensity figures come from SimpleITK's LabelIntensityStatisticsImageFilter (one pass over the volume;
it derives from the label shape filter); the 5/50/95th percentiles, which it does not give exactly, from numpy
after one sort of the labelled voxels by label.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..files import atomic_path
from ..files import check_new_output

PERCENTILES = (5, 50, 95)
STATISTICS_SUFFIXES = (".json", ".csv")
CSV_COLUMNS = ("label", "name", "voxels", "volume_ml", "mean", "std", "min", "max", "p5", "p50", "p95",
               "centroid_lps_mm", "bbox_start_ijk", "bbox_size_ijk")


def structure_statistics(image: sitk.Image, labels: sitk.Image, classes) -> list[dict]:
    """One record per non-background class of `classes` (ClassInfo, in order), empty classes included.

    `image`: the intensities (HU for CT); `labels`: label values on the same grid. A record holds the voxel count,
    volume (ml), intensity mean, standard deviation (n - 1), min, max and 5/50/95th percentiles, the centroid of the
    voxels in patient coordinates (LPS, mm) and the voxel bounding box (start and size, x y z index order). Figures
    that do not exist for an empty class are None.
    """
    filt = sitk.LabelIntensityStatisticsImageFilter()
    filt.SetComputePerimeter(False)  # not reported; about a fifth of the filter's time
    filt.Execute(labels, image)
    present = set(filt.GetLabels())
    percentiles = _percentiles(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    records = []
    for cls in classes:
        if cls.value == 0:
            continue
        record = {"label": int(cls.value), "name": cls.name, "voxels": 0, "volume_ml": 0.0}
        if cls.value in present:
            v = int(cls.value)
            start_size = filt.GetBoundingBox(v)
            record.update(
                voxels=int(filt.GetNumberOfPixels(v)), volume_ml=round(filt.GetNumberOfPixels(v) * voxel_ml, 4),
                mean=filt.GetMean(v), std=filt.GetStandardDeviation(v), min=filt.GetMinimum(v),
                max=filt.GetMaximum(v), **dict(zip(("p5", "p50", "p95"), percentiles[v])),
                centroid_lps_mm=[round(c, 3) for c in filt.GetCentroid(v)],
                bbox_start_ijk=list(start_size[:3]), bbox_size_ijk=list(start_size[3:]))
        else:
            record.update({k: None for k in CSV_COLUMNS[4:]})
        records.append(record)
    return records


def _percentiles(values: np.ndarray, labels: np.ndarray) -> dict[int, list[float]]:
    """Label value -> its voxels' 5/50/95th percentiles (linear interpolation), from one sort by label."""
    foreground = labels != 0
    keys = labels[foreground]
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], values[foreground][order]
    present, starts = np.unique(keys, return_index=True)
    groups = np.split(vals, starts[1:])
    return {int(v): [float(p) for p in np.percentile(g, PERCENTILES)] for v, g in zip(present, groups)}


def check_statistics_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """`--statistics` must name a .json or .csv file in a folder that exists (it is not created: a typo in the
    folder should not scatter results); an existing file is replaced only with `overwrite`."""
    path = Path(path)
    if not path.name.lower().endswith(STATISTICS_SUFFIXES):
        raise ValueError(f"{path}: statistics are written as .json or .csv")
    if not path.absolute().parent.is_dir():
        raise ValueError(f"{path}: the folder {path.absolute().parent} does not exist")
    check_new_output(path, overwrite)


def write_statistics(path: str | os.PathLike, records: list[dict], extra: dict | None = None,
                     overwrite: bool = False) -> Path:
    """JSON (`{"segments": records, **extra}`) or CSV (one row per segment, lists joined by spaces; `extra`,
    e.g. the per-slice confidence, is JSON only)."""
    path = Path(path)
    check_statistics_output(path, overwrite)
    with atomic_path(path, suffix=path.suffix.lower()) as tmp:
        if path.name.lower().endswith(".json"):
            tmp.write_text(json.dumps({"segments": records, **(extra or {})}, indent=1) + "\n")
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for record in records:
                writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()})
            tmp.write_text(buffer.getvalue())
    return path
