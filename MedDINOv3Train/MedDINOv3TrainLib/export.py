"""Scene -> training dataset: volume / segmentation node pairs written as an nnU-Net v2 raw dataset folder.

Classes are matched across cases by segment name (case-insensitive, surrounding spaces ignored), or by the
terminology type code (e.g. SNOMED CT 10200004 "Liver") when the names differ and the code is specific to one
segment of that segmentation. Label values follow the order in which classes are first seen (case by case,
segment by segment): background 0, then 1, 2, ... (a segment named "background" is refused: voxels in no segment
are background). Where segments of a case overlap, the segment listed later in the segmentation wins
(a segment left with no voxel is refused). Each case's label map is written on its volume's voxel grid
(same IJK order and IJKToRAS as the image), so image and label always have identical geometry.

The folder is written next to its destination and moved into place at the end (atomic: a reader never sees a
half-written dataset). An existing folder is replaced only if it holds nothing but an earlier export of this module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: dataset.json "description" of an export (only such a folder is replaced by a later export).
EXPORT_DESCRIPTION = "Exported from 3D Slicer by the MedDINOv3 Train module"


class DatasetExportError(ValueError):
    """A problem with the training pairs the user can fix; the message names the case."""


@dataclass
class ClassInfo:
    name: str  # first spelling seen
    value: int
    codes: set = field(default_factory=set)
    cases: list = field(default_factory=list)


def _nameKey(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def terminologyTypeCode(segment) -> str | None:
    """`SCHEME^CODE` of a segment's terminology type (from its TerminologyEntry tag), or None."""
    tag = ""
    try:
        import vtk

        reference = getattr(vtk, "reference", None) or getattr(vtk, "mutable", None)
        value = reference("") if reference is not None else None
        if value is not None and segment.GetTag("TerminologyEntry", value):
            tag = str(value.get() if hasattr(value, "get") else value)
    except Exception:  # noqa: BLE001 - tag API differs between Slicer versions
        tag = ""
    if not tag:
        try:
            tag = segment.GetTerminology() or ""
        except AttributeError:
            tag = ""
    parts = tag.split("~")
    if len(parts) < 3:
        return None
    fields = parts[2].split("^")
    if len(fields) < 2 or not fields[0] or not fields[1]:
        return None
    return f"{fields[0]}^{fields[1]}"


def caseNames(pairs) -> list[str]:
    """Unique file-safe case names from the volume node names (`liver_ct`, `liver_ct_2`, ...)."""
    names, seen = [], set()
    for index, (volumeNode, _) in enumerate(pairs):
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", (volumeNode.GetName() if volumeNode else "") or "").strip("_")
        base = base or f"case{index}"
        name, n = base, 2
        while name.lower() in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name.lower())
        names.append(name)
    return names


def _checkPairs(pairs) -> None:
    if not pairs:
        raise DatasetExportError("No training cases: add at least one volume / segmentation pair.")
    for index, pair in enumerate(pairs):
        if len(pair) != 2:
            raise DatasetExportError(f"Case {index + 1}: expected a (volume, segmentation) pair.")
        volumeNode, segmentationNode = pair
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise DatasetExportError(f"Case {index + 1}: no scalar volume selected.")
        if volumeNode.GetScene() is None:
            raise DatasetExportError(f"Case {index + 1} ({volumeNode.GetName()}): the volume was removed from the scene.")
        if volumeNode.GetImageData() is None:
            raise DatasetExportError(f"Case {index + 1} ({volumeNode.GetName()}): the volume has no image data.")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise DatasetExportError(f"Case {index + 1} ({volumeNode.GetName()}): the volume must be grayscale.")
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise DatasetExportError(f"Case {index + 1} ({volumeNode.GetName()}): no segmentation selected.")
        if segmentationNode.GetScene() is None:
            raise DatasetExportError(f"Case {index + 1} ({volumeNode.GetName()}): the segmentation "
                                     f"'{segmentationNode.GetName()}' was removed from the scene.")


def matchClasses(pairs) -> tuple[list[ClassInfo], list[dict]]:
    """Classes across all pairs, and per case the mapping segment ID -> class value.

    Returns (classes in label order, [{segmentId: value}, ...] one per pair).
    """
    _checkPairs(pairs)
    names = caseNames(pairs)
    classes: list[ClassInfo] = []
    byName: dict[str, ClassInfo] = {}
    byCode: dict[str, ClassInfo] = {}
    mappings = []
    for caseName, (_, segmentationNode) in zip(names, pairs):
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        segments = [(sid, segmentation.GetSegment(sid)) for sid in ids]
        codes = {sid: terminologyTypeCode(seg) for sid, seg in segments}
        codeCounts: dict[str, int] = {}
        for code in codes.values():
            if code:
                codeCounts[code] = codeCounts.get(code, 0) + 1
        mapping = {}
        for sid, segment in segments:
            key = _nameKey(segment.GetName())
            if key == "background":
                raise DatasetExportError(f"Case '{caseName}': segment '{segment.GetName()}' has the name of label 0: "
                                         "rename it, or remove it (voxels in no segment are background).")
            code = codes[sid]
            info = byName.get(key)
            if info is None and code and codeCounts[code] == 1:
                info = byCode.get(code)
            if info is None:
                info = ClassInfo(name=segment.GetName().strip() or f"class{len(classes) + 1}", value=len(classes) + 1)
                classes.append(info)
                byName[key] = info
            if code and codeCounts[code] == 1:
                info.codes.add(code)
                byCode.setdefault(code, info)
            if caseName not in info.cases:
                info.cases.append(caseName)
            mapping[sid] = info.value
        mappings.append(mapping)
    if not classes:
        raise DatasetExportError("The segmentations hold no segments: nothing to train on.")
    return classes, mappings


def segmentIsEmpty(segmentation, segmentId) -> bool | None:
    """True if the segment's binary labelmap holds no voxel; None if it has no binary labelmap (no conversion here)."""
    segment = segmentation.GetSegment(segmentId)
    image = segment.GetRepresentation("Binary labelmap") if segment is not None else None
    if image is None:
        return None
    extent = image.GetExtent()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return True
    from vtk.util.numpy_support import vtk_to_numpy

    return not np.any(vtk_to_numpy(scalars) == segment.GetLabelValue())


def classPreview(pairs) -> dict:
    """What the GUI shows before export: {"classes": {name: [case, ...]}, "labels": {...}, "warnings": [...]}.

    Warns about a class missing from a case, or present there only as empty segments (background there too)."""
    classes, mappings = matchClasses(pairs)
    names = caseNames(pairs)
    warnings = []
    for info in classes:
        missing = [n for n in names if n not in info.cases]
        for caseName in missing:
            warnings.append(f"Case '{caseName}' has no '{info.name}' segment: it will be trained as background there.")
    byValue = {info.value: info for info in classes}
    for caseName, (_, segmentationNode), mapping in zip(names, pairs, mappings):
        segmentation = segmentationNode.GetSegmentation()
        empty = {sid for sid in mapping if segmentIsEmpty(segmentation, sid)}
        filled = {mapping[sid] for sid in mapping if sid not in empty}
        for value in sorted({mapping[sid] for sid in empty} - filled):
            warnings.append(f"Case '{caseName}': the '{byValue[value].name}' segment is empty: it will be trained "
                            "as background there.")
    return {
        "classes": {info.name: list(info.cases) for info in classes},
        "labels": {"background": 0, **{info.name: info.value for info in classes}},
        "cases": names,
        "warnings": warnings,
    }


def _volumeGeometry(volumeNode) -> tuple[list, list, list]:
    """SimpleITK (LPS) spacing, origin, direction of a volume node's IJK grid (exact, any handedness)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = _LPS_TO_RAS @ m[:3, :3] @ np.diag(1.0 / spacing)
    origin = _LPS_TO_RAS @ m[:3, 3]
    return spacing.tolist(), origin.tolist(), direction.ravel().tolist()


def _toImage(voxels: np.ndarray, volumeNode):
    import SimpleITK as sitk

    spacing, origin, direction = _volumeGeometry(volumeNode)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _surfaceCopyOnVolumeGrid(segmentationNode, volumeNode):
    """The node to export from: itself when its segments are binary labelmaps; else (closed surfaces) a temporary
    copy that converts them on the volume's grid, so the user's node gets no extra representation (Slicer's default
    conversion grid is finer than the volume's, and costly for large surfaces)."""
    segmentation = segmentationNode.GetSegmentation()
    getSource = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if getSource() == "Binary labelmap":
        return segmentationNode
    copy = volumeNode.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "__meddinov3_export_segments")
    copy.GetSegmentation().DeepCopy(segmentation)
    copy.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
    copy.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return copy


def labelArray(segmentationNode, volumeNode, mapping: dict) -> np.ndarray:
    """Label map (k, j, i) of `segmentationNode` on `volumeNode`'s grid, segment IDs mapped to class values.

    Where segments overlap, the segment listed later in the segmentation wins.
    """
    import slicer
    import vtk

    scene = volumeNode.GetScene()
    segmentIds = list(mapping)
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__meddinov3_export_labels")
    source = _surfaceCopyOnVolumeGrid(segmentationNode, volumeNode)
    try:
        ids = vtk.vtkStringArray()
        for sid in segmentIds:
            ids.InsertNextValue(sid)
        logic = slicer.modules.segmentations.logic()
        ok = logic.ExportSegmentsToLabelmapNode(source, ids, labelNode, volumeNode)
        if not ok:
            raise DatasetExportError(f"Could not export segmentation '{segmentationNode.GetName()}' on the grid of "
                                     f"volume '{volumeNode.GetName()}'.")
        exported = slicer.util.arrayFromVolume(labelNode).copy()
    finally:  # the temporary nodes and what the exporter made for them (display nodes, colour table)
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in existing and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                scene.RemoveNode(node)
    shape = slicer.util.arrayFromVolume(volumeNode).shape
    if exported.shape != shape:
        raise DatasetExportError(f"Segmentation '{segmentationNode.GetName()}' exported with shape {exported.shape}, "
                                 f"volume '{volumeNode.GetName()}' has {shape}.")
    # The exporter writes segment n of `ids` as value n (1-based) when no colour table is given.
    present = set(np.unique(exported).tolist())
    segmentation = segmentationNode.GetSegmentation()
    hidden = [segmentation.GetSegment(sid).GetName() for index, sid in enumerate(segmentIds)
              if index + 1 not in present and segmentIsEmpty(segmentation, sid) is False]
    if hidden:  # its class would be trained as absent from this case without anyone noticing
        raise DatasetExportError(
            f"Segmentation '{segmentationNode.GetName()}': segment(s) {', '.join(repr(n) for n in hidden)} keep no "
            f"voxel on the grid of volume '{volumeNode.GetName()}': segments listed after them cover them (where "
            "segments overlap, the later one wins: move them down in the Segment Editor), or they are smaller than "
            "a voxel.")
    lookup = np.zeros(len(segmentIds) + 1, dtype=np.uint8)
    for index, sid in enumerate(segmentIds):
        lookup[index + 1] = mapping[sid]
    exported = np.clip(exported, 0, len(segmentIds)).astype(np.int64)
    return lookup[exported]


def exportDataset(pairs, outputFolder, modality: str = "CT") -> str:
    """Write the pairs as an nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json); returns the folder."""
    classes, mappings = matchClasses(pairs)
    names = caseNames(pairs)
    if len(classes) > 255:
        raise DatasetExportError(f"{len(classes)} classes: at most 255 are supported.")
    outputFolder = Path(outputFolder).expanduser().resolve()
    if outputFolder.exists() and not _replaceable(outputFolder):
        raise DatasetExportError(f"{outputFolder} exists and is not an exported dataset: choose another folder.")
    for parent in outputFolder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DatasetExportError(f"Cannot write the dataset to {outputFolder}: {parent} is a file.")
            break
    try:
        return _writeDataset(pairs, outputFolder, modality, classes, mappings, names)
    except OSError as e:
        raise DatasetExportError(f"Cannot write the dataset to {outputFolder}: {e.strerror or e}") from e


def _replaceable(folder: Path) -> bool:
    """True for an empty folder, or one holding only an earlier export of this module (nothing of the user's)."""
    if not folder.is_dir():
        return False
    entries = {p.name for p in folder.iterdir()}
    if not entries:
        return True
    if not entries <= {"dataset.json", "imagesTr", "labelsTr"}:
        return False
    try:
        description = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(description, dict) and description.get("description") == EXPORT_DESCRIPTION


def _writeDataset(pairs, outputFolder: Path, modality: str, classes, mappings, names) -> str:
    import SimpleITK as sitk
    import slicer
    from meddinov3.files import atomic_dir  # here, not at load: from a checkout the core is on sys.path only
    # once the Segment module's helpers are imported (MedDINOv3SegmentLib/__init__.py)

    with atomic_dir(outputFolder, overwrite=True) as staging:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for caseName, (volumeNode, segmentationNode), mapping in zip(names, pairs, mappings):
            voxels = slicer.util.arrayFromVolume(volumeNode)
            sitk.WriteImage(_toImage(voxels, volumeNode), str(staging / "imagesTr" / f"{caseName}_0000.nii.gz"))
            labels = labelArray(segmentationNode, volumeNode, mapping).astype(np.uint8)
            sitk.WriteImage(_toImage(labels, volumeNode), str(staging / "labelsTr" / f"{caseName}.nii.gz"))
        description = {
            "name": outputFolder.name,
            "description": EXPORT_DESCRIPTION,
            "channel_names": {"0": modality},
            "labels": {"background": 0, **{info.name: info.value for info in classes}},
            "numTraining": len(names),
            "file_ending": ".nii.gz",
            "cases": names,
            "terminology": {info.name: sorted(info.codes) for info in classes if info.codes},
        }
        (staging / "dataset.json").write_text(json.dumps(description, indent=2))
    return str(outputFolder)
