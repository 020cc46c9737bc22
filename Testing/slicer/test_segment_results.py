"""MedDINOv3Segment after a run: statistics table, uncertainty overlay volume, unsure slices and the jump there.

Real MRML (slicer-core), a real child process with the shipped demo model on real CT slices, an oblique volume
under a parent transform (so IJK, RAS and world all differ).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import slicer
import vtk

from meddinov3.resources import resources_dir
from Testing.slicer.test_segment_logic import geometry_cases, labelmap_on_volume_grid, liver_voxels  # noqa: F401

DEMO = str(resources_dir() / "demo-liver-ct")


@pytest.fixture
def logic(headless_slicer, slicer_scene):
    from MedDINOv3Segment import MedDINOv3SegmentLogic

    return MedDINOv3SegmentLogic()


def world_to_ijk(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijk_to_world = slicer.util.arrayFromVTKMatrix(matrix)
    transform = volume.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_world = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_world
    return np.linalg.inv(ijk_to_world)


def test_statistics_table_uncertainty_overlay_and_unsure_slices(logic, liver_voxels):
    scene = slicer.mrmlScene
    voxels = liver_voxels[8:16]
    volume = slicer.util.addVolumeFromArray(voxels, geometry_cases()["oblique"], name="CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)
    shift.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    task = logic.segmentAsync(volume, DEMO, device="cpu", uncertainty=True)
    deadline = time.monotonic() + 300
    while task.poll():
        assert time.monotonic() < deadline, "segmentation took too long"
        time.sleep(0.1)
    assert task.state == "succeeded", task.error
    assert not task.workDir.exists()

    # statistics table: one row per segment, volumes equal to the segments' voxels on the volume's grid
    labels = labelmap_on_volume_grid(task.result, volume)
    table = task.statisticsTableNode
    assert table is not None and table.GetScene() is scene
    names = [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())]
    assert names == ["liver", "tumour"]
    assert table.GetColumnName(1) == "Volume [ml]" and table.GetColumnName(2) == "Mean"
    spacing = np.linalg.norm(geometry_cases()["oblique"][:3, :3], axis=0)
    for row, value in ((0, 1), (1, 2)):
        count = int((labels == value).sum())
        assert count > 0
        assert float(table.GetCellText(row, 1)) == pytest.approx(count * np.prod(spacing) / 1000.0, rel=1e-3)
        assert float(table.GetCellText(row, 2)) == pytest.approx(float(voxels[labels == value].mean()), rel=1e-4)

    # uncertainty overlay: on the input's grid and under its transform, percent values, threshold display
    overlay = task.uncertaintyVolumeNode
    assert overlay is not None and overlay.GetTransformNodeID() == transform.GetID()
    ijk, ijk_overlay = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    overlay.GetIJKToRASMatrix(ijk_overlay)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijk_overlay), slicer.util.arrayFromVTKMatrix(ijk))
    uncertainty = slicer.util.arrayFromVolume(overlay)
    assert uncertainty.shape == voxels.shape and uncertainty.dtype == np.uint8 and uncertainty.max() <= 100
    assert uncertainty.max() > 0 and overlay.GetDisplayNode().GetApplyThreshold()

    # unsure slices: least confident first, each point on its slice; jumping moves a slice view there
    unsure = task.unsureSlices
    assert unsure and [c for _, c, _ in unsure] == sorted(c for _, c, _ in unsure)
    axis = task.statistics["slice_confidence"]["axis"]
    for index, _, ras in unsure:
        point = world_to_ijk(volume) @ np.array([*ras, 1.0])
        assert point[axis] == pytest.approx(index, abs=1e-6)
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Red")
    slice_node.SetOrientationToAxial()
    logic.jumpToSlice(unsure[0][2])
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal, origin = slice_to_ras[:3, 2], slice_to_ras[:3, 3]
    assert float(np.dot(normal, np.array(unsure[0][2]) - origin)) == pytest.approx(0.0, abs=1e-6)
