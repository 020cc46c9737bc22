"""Writing results: label maps (.nii.gz/.nrrd/...), Slicer segmentations (.seg.nrrd), DICOM SEG (.dcm, in
`dicom_seg`), probabilities (.npz).

Every writer goes through `atomic_path`, so a failed or interrupted run never leaves a partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..files import atomic_path, check_new_output
from ..terminology import describe_classes

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def output_kind(path: str | os.PathLike) -> str:
    """'seg' for .seg.nrrd, 'dicom-seg' for .dcm, 'labelmap' for the other supported suffixes; ValueError
    otherwise."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return "seg"
    if name.endswith(".dcm"):
        return "dicom-seg"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise ValueError(f"{path}: unsupported output type (use .nii.gz, .nii, .nrrd, .mha, .seg.nrrd or .dcm)")


def check_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    output_kind(path)
    check_new_output(path, overwrite)


def check_probabilities_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """What `check_output` is for label maps, for the .npz of `--save-probabilities`."""
    if not Path(path).name.lower().endswith(".npz"):
        raise ValueError(f"{path}: probabilities are written as .npz")
    check_new_output(path, overwrite)


def input_files(inputs) -> list[tuple[Path, list[Path]]]:
    """(input, the image files it reads: a DICOM folder's series files) for each input, listed once for all the
    outputs `check_not_input` compares with them."""
    from ..volumes import dicom_series

    return [(Path(p), [Path(f) for f in dicom_series(p)] if Path(p).is_dir() else [Path(p)]) for p in inputs]


def check_not_input(output: str | os.PathLike, sources: list[tuple[Path, list[Path]]]) -> None:
    """Never write a result over an image it comes from (with --overwrite that would replace the user's scan).
    `sources`: from `input_files`."""
    out = Path(output)
    if not out.exists():
        return
    for source, files in sources:
        if any(f.exists() and os.path.samefile(out, f) for f in files):
            raise ValueError(f"{output}: is the input {source} itself; write the segmentation to another file")


def write_labels(labels: sitk.Image, path: str | os.PathLike, classes, overwrite: bool = False,
                 before_replace=None, dicom_seg=None) -> Path:
    """Write a label map; `.seg.nrrd` gets one named, coloured segment per non-background class, `.dcm` a DICOM
    SEG (`dicom_seg`: the `dicom_seg.DicomSegOutput` saying what it references; its `omitted` lists the empty
    classes left out).

    `before_replace`: called once the label map is written but before it replaces `path` (e.g. writing the
    probabilities beside it): if it fails, an existing `path` is left as it was.
    """
    check_output(path, overwrite)
    path = Path(path)
    kind = output_kind(path)
    if kind == "dicom-seg" and dicom_seg is None:
        raise ValueError(f"{path}: a DICOM SEG needs its source DICOM series")
    # lower-case temporary suffix: ITK picks the format from it and knows `.nii.gz`, not `.NII.GZ`
    with atomic_path(path, suffix="".join(path.suffixes).lower()) as tmp:
        if kind == "dicom-seg":
            dicom_seg.write(labels, tmp, classes)
        elif kind == "seg":
            write_seg_nrrd(labels, tmp, classes)
        else:
            sitk.WriteImage(labels, str(tmp), useCompression=True)
        if before_replace is not None:
            before_replace()
    return path


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    m = np.eye(4)
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    m[:3, :3] = d * np.asarray(image.GetSpacing(), float)[None, :]
    m[:3, 3] = image.GetOrigin()
    return m


def write_seg_nrrd(labels: sitk.Image, path: str | os.PathLike, classes) -> None:
    """Slicer segmentation: one layer, segment label value = class value, names/colours/terminology from the table."""
    import slicerio

    voxels = sitk.GetArrayFromImage(labels)  # (z, y, x) -> written with index_order 'C'
    segments = []
    for entry, cls in zip(describe_classes(classes), classes):
        if cls.value == 0:
            continue
        mask = voxels == cls.value
        if mask.any():
            idx = np.nonzero(mask)  # z, y, x
            extent = [int(v) for axis in (idx[2], idx[1], idx[0]) for v in (axis.min(), axis.max())]
        else:
            extent = [0, -1, 0, -1, 0, -1]
        seg = {"id": f"Segment_{cls.value}", "name": cls.name, "labelValue": int(cls.value), "layer": 0,
               "color": [round(c / 255.0, 6) for c in entry.color], "extent": extent}
        if entry.terminology:
            seg["terminology"] = entry.terminology
        segments.append(seg)
    segmentation = {"voxels": voxels, "ijkToLPS": ijk_to_lps(labels), "segments": segments,
                    "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap"}
    slicerio.write_segmentation(str(path), segmentation, compression_level=1, index_order="C")


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray, classes, overwrite: bool = False,
                        postprocessing: list | None = None) -> Path:
    """npz: `probabilities` float16 (classes, z, y, x) on the input grid, `labels` names, `values` label values,
    `postprocessing` a JSON array of the steps the label map had after the model (the probabilities are the
    model's, before them: where a step changed a voxel, its argmax is not its label)."""
    path = Path(path)
    check_probabilities_output(path, overwrite)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probabilities.astype(np.float16, copy=False),
                                labels=np.array([c.name for c in classes]),
                                values=np.array([c.value for c in classes], dtype=np.int32),
                                postprocessing=np.array(json.dumps(postprocessing or [])))
    return path
