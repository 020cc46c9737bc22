"""What a segmentation run leaves besides the segments: a statistics table, an uncertainty volume, unsure slices.

The child process writes them (`meddinov3 segment --statistics FILE.json --save-uncertainty FILE.nrrd`); here
they become MRML nodes. The child read the exported volume with its own IJK axes, so a slice index it reports
along an index axis is the volume node's IJK index along the same axis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import MedDINOv3SegmentError
from .nodes import arrayOnVolumeGrid, ijkToRas, readImageFile

#: (column title, statistics key) of the table a run produces
TABLE_COLUMNS = (("Segment", "name"), ("Volume [ml]", "volume_ml"), ("Mean", "mean"), ("Std", "std"),
                 ("Min", "min"), ("Max", "max"), ("Voxels", "voxels"))
UNCERTAINTY_SHOWN_FROM = 10  # percent: less uncertain voxels are transparent in the overlay


def readStatistics(path: str | os.PathLike) -> dict:
    """The child's statistics JSON: {"segments": [...], "slice_confidence": {...} (with an uncertainty map)}."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MedDINOv3SegmentError(f"Cannot read the segment statistics {path}: {e}") from None


def statisticsTableNode(statistics: dict, scene, name: str, tableNode=None):
    """A vtkMRMLTableNode (new in `scene`, or `tableNode` refilled) with one row per segment: name, volume (ml),
    intensity mean, std, min, max (HU for CT) and voxel count. Empty segments show empty cells."""
    import vtk

    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = tableNode.GetTable()
    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        for title, key in TABLE_COLUMNS:
            column = vtk.vtkStringArray() if key == "name" else vtk.vtkDoubleArray()
            column.SetName(title)
            for record in statistics.get("segments", []):
                value = record.get(key)
                if key == "name":
                    column.InsertNextValue(str(value))
                else:
                    column.InsertNextValue(float("nan") if value is None else float(value))
            table.AddColumn(column)
    finally:
        tableNode.EndModify(wasModifying)
    return tableNode


def loadUncertaintyVolume(path: str | os.PathLike, inputVolumeNode, name: str | None = None):
    """The child's uncertainty map (percent, on the exported volume's grid) as a scalar volume node on the input
    volume's grid and under its transform, shown in a warm colour map from `UNCERTAINTY_SHOWN_FROM` percent (less
    uncertain voxels transparent, so it overlays the image)."""
    import slicer
    import vtk

    voxels, fileIjkToRas, _ = readImageFile(path)
    voxels = arrayOnVolumeGrid(voxels, fileIjkToRas, inputVolumeNode)
    scene = inputVolumeNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                   scene.GenerateUniqueName(name or f"{inputVolumeNode.GetName()} uncertainty"))
    matrix = vtk.vtkMatrix4x4()
    inputVolumeNode.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 100)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(UNCERTAINTY_SHOWN_FROM)
    display.SetUpperThreshold(100)
    return node


def unsureSlices(sliceConfidence: dict, volumeNode) -> list[tuple[int, float, tuple[float, float, float]]]:
    """(index, confidence, world RAS point at the slice's centre) of the slices below full confidence, least
    confident first. `sliceConfidence`: the statistics' "slice_confidence" (index axis, one value per index)."""
    axis = int(sliceConfidence["axis"])
    values = sliceConfidence["confidence"]
    dims = volumeNode.GetImageData().GetDimensions()
    if len(values) != dims[axis]:
        raise MedDINOv3SegmentError("The slice confidences do not match the volume's slices.")
    toWorld = ijkToRas(volumeNode)
    parent = volumeNode.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        import slicer
        import vtk

        matrix = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(matrix)
        toWorld = slicer.util.arrayFromVTKMatrix(matrix) @ toWorld
    out = []
    for index in sorted(range(len(values)), key=lambda i: values[i]):
        if values[index] >= 1.0:
            break
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[axis] = index
        ras = toWorld @ np.array(ijk + [1.0])
        out.append((index, float(values[index]), tuple(float(v) for v in ras[:3])))
    return out


def jumpSlicesTo(scene, ras) -> None:
    """Move every slice view to the plane through `ras` (offsetting: the views keep their in-plane position)."""
    import slicer

    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *ras, slicer.vtkMRMLSliceNode.OffsetJumpSlice)
