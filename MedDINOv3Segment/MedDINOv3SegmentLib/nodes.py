"""MRML nodes <-> files for the segmentation child process: volume export, ROI box, `.seg.nrrd` import.

Geometry rule: a volume node is written with its own IJK order and IJKToRAS (a storage node, no reorientation);
the child writes its labels on the grid of that file; they are mapped back onto the node's IJK grid by exact
index arithmetic (a signed axis permutation and a shift, checked), never resampled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import MedDINOv3SegmentError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijkToRas(volumeNode) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def exportVolume(volumeNode, path: str | os.PathLike) -> Path:
    """Write `volumeNode` (voxels, IJK order and IJKToRAS exactly) to `path` (.nrrd) without touching the scene."""
    import slicer

    if volumeNode is None or volumeNode.GetImageData() is None:
        raise MedDINOv3SegmentError("The input volume has no image data.")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise MedDINOv3SegmentError("The input volume must be a single-component (grayscale) volume.")
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volumeNode) or not path.is_file():
        raise MedDINOv3SegmentError(f"Could not write the input volume to {path}.")
    return path


def _worldToLocal(volumeNode) -> np.ndarray:
    """World RAS -> the volume's local RAS (inverse of its parent transforms; linear ones only)."""
    import slicer
    import vtk

    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise MedDINOv3SegmentError("An ROI cannot be used with a volume under a non-linear transform; "
                                    "harden the transform first.")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def roiToVoxelBox(roiNode, volumeNode) -> list[int]:
    """The ROI as a voxel box [i0, j0, k0, i1, j1, k1] (end exclusive) of the volume: voxel centres inside it.

    An oblique ROI gives the box enclosing it; the box is clipped to the volume.
    """
    import slicer

    size = np.array(roiNode.GetSize(), dtype=float)
    if not size.any():  # e.g. "Create new ROI" in a selector, never placed: its centre (0, 0, 0) means nothing
        raise MedDINOv3SegmentError(f"The ROI '{roiNode.GetName()}' has no size: place it in the views first.")
    objectToWorld = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = np.c_[signs * size / 2.0, np.ones(8)].T  # 4 x 8, object coordinates
    rasToIjk = np.linalg.inv(ijkToRas(volumeNode)) @ _worldToLocal(volumeNode)
    ijk = (rasToIjk @ objectToWorld @ corners)[:3]
    dims = volumeNode.GetImageData().GetDimensions()
    eps = 1e-4
    lo = [max(0, math.ceil(v - eps)) for v in ijk.min(axis=1)]
    hi = [min(d, math.floor(v + eps) + 1) for v, d in zip(ijk.max(axis=1), dims)]
    if any(h <= l for l, h in zip(lo, hi)):
        raise MedDINOv3SegmentError("The ROI does not overlap the input volume.")
    return lo + hi


# ---------------------------------------------------------------------------------------------
# Reading the child's .seg.nrrd
# ---------------------------------------------------------------------------------------------


def readImageFile(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """(voxels (k, j, i), IJK->RAS 4x4, header fields) of a 3D one-component image file the child wrote."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise MedDINOv3SegmentError(f"Cannot read the result file {path}: {str(e).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MedDINOv3SegmentError(f"Unexpected result file {path}: expected one 3D image layer.")
    matrix = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    return sitk.GetArrayFromImage(image), _LPS_TO_RAS @ matrix, meta


def readSegmentationFile(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(labels (k, j, i), IJK->RAS 4x4, segments) of a one-layer .seg.nrrd or a label map file.

    Segments: dicts with `labelValue`, `name`, `color` (0-1 RGB or None), `terminology` (Slicer's serialised
    terminology entry or None) and `id`, in file order, read by slicerio (the child writes the file with it, so it
    is in the Python that ran the child). A plain label map gives one per non-zero value.
    """
    labels, matrix, _ = readImageFile(path)
    segments = []
    if str(path).lower().endswith(".nrrd"):
        import slicerio
        from slicerio.segmentation import terminology_entry_to_string

        for index, segment in enumerate(slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]):
            color, terminology = segment.get("color"), segment.get("terminology")
            segments.append({
                "labelValue": int(segment.get("labelValue", index + 1)),
                "name": segment.get("name", f"Segment_{index + 1}"),
                "color": tuple(color[:3]) if color and len(color) >= 3 else None,
                "terminology": terminology_entry_to_string(terminology) if terminology else None,
                "id": segment.get("id", ""),
            })
    if not segments:
        segments = [{"labelValue": int(v), "name": f"Label_{int(v)}", "color": None, "terminology": None, "id": ""}
                    for v in np.unique(labels) if v != 0]
    return labels, matrix, segments


def arrayOnVolumeGrid(voxels: np.ndarray, fileIjkToRas: np.ndarray, volumeNode) -> np.ndarray:
    """`voxels` (k, j, i) placed by `fileIjkToRas`, as an array (k, j, i) on the volume node's grid.

    The two grids must coincide up to an axis permutation / flip and a whole-voxel shift (what a file
    writer or reader may do); anything else is an error (no resampling happens here).
    """
    fileToNode = np.linalg.inv(ijkToRas(volumeNode)) @ fileIjkToRas
    rotation, shift = fileToNode[:3, :3], fileToNode[:3, 3]
    rounded, shiftRounded = np.round(rotation), np.round(shift)
    isPermutation = (np.abs(rounded).sum(axis=0) == 1).all() and (np.abs(rounded).sum(axis=1) == 1).all()
    if not isPermutation or np.abs(rotation - rounded).max() > 1e-3 or np.abs(shift - shiftRounded).max() > 1e-3:
        raise MedDINOv3SegmentError("The segmentation result does not lie on the input volume's voxel grid.")
    byIjk = voxels.transpose(2, 1, 0)  # [i, j, k] of the file
    nodeAxes = [int(np.nonzero(rounded[a])[0][0]) for a in range(3)]  # node axis a <- file axis nodeAxes[a]
    signs = [int(rounded[a, nodeAxes[a]]) for a in range(3)]
    moved = byIjk.transpose(nodeAxes)
    offsets = []
    for a in range(3):
        if signs[a] < 0:
            moved = np.flip(moved, axis=a)
            offsets.append(int(shiftRounded[a]) - (moved.shape[a] - 1))
        else:
            offsets.append(int(shiftRounded[a]))
    dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k)
    out = np.zeros(dims, dtype=voxels.dtype)
    source, target = [], []
    for a in range(3):
        start, stop = max(0, offsets[a]), min(dims[a], offsets[a] + moved.shape[a])
        if stop <= start:
            raise MedDINOv3SegmentError("The segmentation result does not overlap the input volume.")
        target.append(slice(start, stop))
        source.append(slice(start - offsets[a], stop - offsets[a]))
    out[tuple(target)] = moved[tuple(source)]
    return np.ascontiguousarray(out.transpose(2, 1, 0))


# ---------------------------------------------------------------------------------------------
# Filling a segmentation node
# ---------------------------------------------------------------------------------------------


def _setTerminology(segment, terminology: str | None) -> None:
    """Store a serialized terminology entry on `segment`. `vtkSegment::SetTerminology` appeared in Slicer 5.10;
    Slicer 5.8, the oldest supported version, has none and keeps the entry in the segment's "TerminologyEntry" tag,
    which is where 5.10+ read it from too (a test forces this path on the 5.13 slicer-core)."""
    if not terminology:
        return
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.10
        segment.SetTerminology(terminology)
    else:  # Slicer 5.8
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)


def _labelmapNodeFromArray(labels: np.ndarray, volumeNode):
    """A vtkMRMLLabelMapVolumeNode outside the scene with `labels` (k, j, i) on the volume's grid."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    image = vtk.vtkImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(labels).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    labelmap.SetAndObserveImageData(image)
    return labelmap


def fillSegmentationNode(segmentationNode, volumeNode, labels: np.ndarray, segments: list[dict]) -> list[str]:
    """Replace all segments of `segmentationNode` by `segments` with voxels `labels` (on the volume's grid).

    Every listed segment is created, empty ones included, in the listed order. Returns the segment IDs.
    The segmentation node gets the volume's parent transform and reference geometry (the volume's own grid),
    so it is displayed where the volume is, whatever transform it had before.
    """
    import slicer
    import vtk

    segmentation = segmentationNode.GetSegmentation()
    wasModifying = segmentationNode.StartModify()
    try:
        segmentation.RemoveAllSegments()
        binaryLabelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if hasattr(segmentation, "SetSourceRepresentationName"):  # Slicer >= 5.4
            segmentation.SetSourceRepresentationName(binaryLabelmap)
        else:
            segmentation.SetMasterRepresentationName(binaryLabelmap)
        # `labels` are in the volume's local RAS and the labelmap node below has no parent transform: import them
        # into a segmentation without one (else the import applies the inverse of the segmentation's transform).
        segmentationNode.SetAndObserveTransformNodeID(None)
        ids = vtk.vtkStringArray()
        consecutive = np.zeros(labels.shape, dtype=np.uint16 if len(segments) > 255 else np.uint8)
        segmentIds = []
        for number, info in enumerate(segments, start=1):
            segmentId = segmentation.GenerateUniqueSegmentID(info.get("id") or f"Segment_{info['labelValue']}")
            color = info.get("color")
            if color is not None:
                segmentation.AddEmptySegment(segmentId, info["name"], list(color))
            else:
                segmentation.AddEmptySegment(segmentId, info["name"])
            segment = segmentation.GetSegment(segmentId)
            segment.SetNameAutoGenerated(False)
            if color is not None:
                segment.SetColorAutoGenerated(False)
            _setTerminology(segment, info.get("terminology"))
            ids.InsertNextValue(segmentId)
            segmentIds.append(segmentId)
            consecutive[labels == info["labelValue"]] = number  # label value -> position in `ids`
        if consecutive.any():
            labelmap = _labelmapNodeFromArray(consecutive, volumeNode)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
                raise MedDINOv3SegmentError("Importing the segmentation result into the segmentation node failed.")
        # Then the volume's parent transform: the reference geometry is computed in the segmentation's coordinates,
        # so with the same parent it is the volume's own grid (the Segment Editor then edits on that grid).
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    finally:
        segmentationNode.EndModify(wasModifying)
    return segmentIds


def placeBesideInHierarchy(node, volumeNode) -> None:
    """Put `node` in the subject hierarchy folder (patient / study) that holds `volumeNode`, as a loaded DICOM
    study keeps its segmentations beside its series in the Data module."""
    import slicer

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
    if shNode is None:
        return
    volumeItem = shNode.GetItemByDataNode(volumeNode)
    if not volumeItem:
        return
    parent = shNode.GetItemParent(volumeItem)
    item = shNode.GetItemByDataNode(node)
    if item:
        shNode.SetItemParent(item, parent)
    else:  # Slicer's subject hierarchy plugins (Qt) add an item for every new node; without them, add it here
        shNode.CreateItem(parent, node)
