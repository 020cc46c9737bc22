"""DICOM Segmentation output (highdicom): the label map as a SEG object that references its source CT series.

A PACS or viewer shows a DICOM SEG next to the series it was made from, so the object must say which study,
series, frame of reference and, per frame, which source slice (SOP instance) it lies on. The engine reads a DICOM
folder with SimpleITK (`volumes.read_image`); here the same series' headers are read with pydicom and every file
is matched to its slice of the image grid by position (not by file or instance order), which holds for any slice
order and for oblique (untilted) series.

highdicom is imported only when a DICOM SEG is written: the other outputs work without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..terminology import describe_classes
from ..volumes import InputError, dicom_series

ALGORITHM_NAME = "MedDINOv3"
GENERIC_TISSUE = ("SCT", "85756007", "Tissue")  # what Slicer gives a segment without terminology


@dataclass
class DicomSource:
    """The source series of a DICOM SEG: `datasets[k]` is the header (no pixels) of slice k of the image grid."""

    folder: Path
    datasets: list


def read_source(folder: str | os.PathLike) -> DicomSource:
    """Headers of the DICOM series `volumes.read_image(folder)` reads, checked (single-frame slices of one study,
    series and frame of reference) and left in file order: `match_slices` orders them once the image is known.

    Read before the inference, so that an input a DICOM SEG cannot reference fails at once: InputError when
    `folder` is not a DICOM series folder or the series lacks what a DICOM SEG must reference.
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "DICOM SEG output needs a DICOM series folder as input (the SEG references its "
                                 "source slices); write a .nii.gz, .nrrd or .seg.nrrd for other inputs")
    files = dicom_series(folder)
    if not files:
        raise InputError(folder, "folder holds no DICOM series (DICOM SEG output needs one)")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for keyword, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "frame of reference")):
        values = {str(getattr(ds, keyword, "") or "") for ds in datasets}
        if "" in values or len(values) != 1:
            raise InputError(folder, f"DICOM series has {'no' if '' in values else 'more than one'} {what} UID "
                                     f"({keyword}): a DICOM SEG cannot reference it")
    if any("ImagePositionPatient" not in ds for ds in datasets):
        raise InputError(folder, "DICOM series has no per-file slice positions (ImagePositionPatient; a multi-frame "
                                 "file?): DICOM SEG output needs a series of single-slice files")
    return DicomSource(folder, datasets)


def match_slices(source: DicomSource, image: sitk.Image) -> DicomSource:
    """`source` with its headers ordered as `image`'s slices (index k), matched by ImagePositionPatient: each
    file's first pixel must lie within half a voxel of a slice's first voxel (the reader's own tolerance for
    sideways drift), one file per slice."""
    index = {}
    for ds in source.datasets:
        ijk = image.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])
        k = int(round(ijk[2]))
        if max(abs(ijk[0]), abs(ijk[1]), abs(ijk[2] - k)) >= 0.5 or k in index:
            raise InputError(source.folder, f"DICOM file {ds.SOPInstanceUID} does not lie on a slice of the image "
                                            "grid: cannot reference it from the DICOM SEG")
        if not ds.get("SliceThickness"):  # type 2 (may be empty), but highdicom reads it: the slice spacing
            ds.SliceThickness = round(float(image.GetSpacing()[2]), 6)
        index[k] = ds
    if sorted(index) != list(range(image.GetDepth())):
        raise InputError(source.folder, f"DICOM series has {len(index)} slices, the image {image.GetDepth()}")
    return DicomSource(source.folder, [index[k] for k in range(image.GetDepth())])


@dataclass
class DicomSegOutput:
    """What `outputs.write_labels` needs for a `.dcm` output: the source series and the model's identity.
    `omitted`: set by `write` to the classes left out as empty."""

    source: DicomSource
    model_name: str
    model_version: str
    omitted: list = field(default_factory=list)

    def write(self, labels: sitk.Image, path: str | os.PathLike, classes) -> None:
        self.omitted = write_dicom_seg(labels, path, classes, self.source, self.model_name, self.model_version)


def model_version(spec) -> str:
    """The model's version for the algorithm identification: `provenance.version`, else its creation date."""
    provenance = spec.provenance or {}
    version = provenance.get("version") or str(provenance.get("created", ""))[:10]
    return str(version or "unversioned")


def _code(value):
    from highdicom.sr import CodedConcept

    scheme, code, meaning = (str(v) for v in value)
    return CodedConcept(code, scheme, meaning)


def segment_descriptions(classes, present_values, model_name: str, version: str) -> tuple[list, list[str]]:
    """([(label value, highdicom SegmentDescription numbered 1..n)] for the classes in `present_values`, the names
    of the classes left out as empty).

    Category and type (and modifier, anatomic region) come from the model's terminology (`terminology.py`); a
    class without one is written as the generic 'Tissue', as Slicer does.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=f"{model_name} {version}"[:64],
        parameters={"model": model_name, "software": f"meddinov3 {__version__}"})
    descriptions, empty = [], []
    for entry, cls in zip(describe_classes(classes), classes):
        if cls.value == 0:
            continue
        if cls.value not in present_values:
            empty.append(cls.name)
            continue
        term = entry.terminology or {}
        description = hd.seg.SegmentDescription(
            segment_number=len(descriptions) + 1, segment_label=cls.name[:64],
            segmented_property_category=_code(term.get("category", GENERIC_TISSUE)),
            segmented_property_type=_code(term.get("type", GENERIC_TISSUE)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=cls.name[:64],
            anatomic_regions=[_code(term["anatomicRegion"])] if term.get("anatomicRegion") else None,
            display_color=hd.color.CIELabColor.from_rgb(*entry.color))
        if term.get("typeModifier"):
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code(term["typeModifier"])]
        descriptions.append((cls.value, description))
    return descriptions, empty


def write_dicom_seg(labels: sitk.Image, path: str | os.PathLike, classes, source: DicomSource, model_name: str,
                    version: str) -> list[str]:
    """Write `labels` (label values of `classes`, on the source series' grid) as a binary DICOM SEG at `path`.

    One segment per class present (background excluded), numbered in class order; returns the names of the
    classes left out because no voxel has them. InputError when no class is present (a SEG needs a segment).
    """
    import highdicom as hd

    from .. import __version__

    source = match_slices(source, labels)
    voxels = sitk.GetArrayViewFromImage(labels)  # (k, rows, columns): frame k lies on source slice k
    present = set(np.unique(voxels).tolist())
    descriptions, empty = segment_descriptions(classes, present, model_name, version)
    if not descriptions:
        raise InputError(source.folder, "no structure was found: a DICOM SEG needs at least one segment, none "
                                        "written")
    numbers = np.zeros(max(present | {int(c.value) for c in classes}) + 1, dtype=np.uint16)  # value -> segment number
    for number, (value, _) in enumerate(descriptions, start=1):
        numbers[value] = number
    first = source.datasets[0]
    seg = hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=numbers[voxels],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[d for _, d in descriptions],
        series_instance_uid=hd.UID(), series_number=_series_number(first), sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=ALGORITHM_NAME, manufacturer_model_name=model_name[:64],
        software_versions=f"meddinov3 {__version__}", device_serial_number="none",
        content_label="MEDDINOV3", content_description=f"{model_name} segmentation"[:64],
        series_description=f"MedDINOv3 {model_name}"[:64])
    seg.save_as(str(path))
    return empty


def _series_number(source_dataset) -> int:
    """A series number after the source's (viewers sort series by it)."""
    try:
        return int(source_dataset.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000
