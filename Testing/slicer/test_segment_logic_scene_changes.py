"""MedDINOv3SegmentLogic as a demanding Slicer user drives it: transforms, nodes removed while running, bad ROIs.

Real MRML nodes (headless slicer-core) and a real `meddinov3 segment` child process with the shipped tiny demo
model; nothing is mocked.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

import numpy as np
import pytest
import slicer
import vtk

from Testing.slicer import test_segment_logic as base
from Testing.slicer.test_segment_logic import geometry_cases, labelmap_on_volume_grid, matrix, rotation, segment_names

MODEL = "demo-liver-ct"
logic, liver_voxels = base.logic, base.liver_voxels  # the same fixtures


@pytest.fixture(scope="module")
def ct_voxels(liver_voxels) -> np.ndarray:
    """6 axial slices (k, j, i) of the LiTS liver CT (HU) through the liver."""
    return liver_voxels[8:14].copy()


def linear_transform(name: str, linear: np.ndarray, origin) -> "slicer.vtkMRMLLinearTransformNode":
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix(linear, origin)))
    return node


def local_grid(volume) -> str:
    """The volume's own grid (local IJK->RAS and extent) as a serialised reference image geometry."""
    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(ijkToRas, volume.GetImageData().GetExtent())


def grid_numbers(serialised: str) -> np.ndarray:
    return np.array([float(v) for v in serialised.split(";") if v])


def test_volume_under_a_linear_transform_new_node_again_and_into_a_transformed_node(logic, ct_voxels):
    """The segmentation must lie where the volume is displayed: same parent transform, voxels on the volume's grid,
    reference geometry = the volume's own grid; also when the output node already had a (different) transform,
    e.g. segmenting a second time into the node the first run made (what the Widget does on the next click)."""
    scene = slicer.mrmlScene
    ijk = geometry_cases()["oblique"]
    plain = slicer.util.addVolumeFromArray(ct_voxels, ijk, name="CT plain")
    moved = slicer.util.addVolumeFromArray(ct_voxels, ijk, name="CT moved")
    transform = linear_transform("registration", rotation(1, 30), [20.0, -5.0, 13.0])
    other = linear_transform("other", rotation(0, -20), [-7.0, 9.0, 3.0])
    moved.SetAndObserveTransformNodeID(transform.GetID())
    again = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "first result")  # as a first run leaves it
    again.SetAndObserveTransformNodeID(transform.GetID())
    again.GetSegmentation().AddEmptySegment("old", "old result")
    elsewhere = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "under another transform")
    elsewhere.SetAndObserveTransformNodeID(other.GetID())
    elsewhere.GetSegmentation().AddEmptySegment("old", "old result")

    runs = {"plain": (plain, None), "new": (moved, None), "again": (moved, again), "elsewhere": (moved, elsewhere)}
    tasks = {name: logic.segmentAsync(volume, MODEL, outputSegmentationNode=output, device="cpu")
             for name, (volume, output) in runs.items()}
    for name, task in tasks.items():
        assert task.wait(timeout=400), name
        assert task.state == "succeeded", (name, task.error)

    reference = labelmap_on_volume_grid(tasks["plain"].result, plain)
    assert set(np.unique(reference)) == {0, 1, 2}, "the demo model finds liver and tumour here"
    assert tasks["again"].result is again and tasks["elsewhere"].result is elsewhere
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    for name in ("new", "again", "elsewhere"):
        node = tasks[name].result
        assert node.GetParentTransformNode() is transform, name
        assert segment_names(node) == ["liver", "tumour"], name
        # Same input voxels as `plain`: the same labels, now on the moved volume's (transformed) grid.
        np.testing.assert_array_equal(labelmap_on_volume_grid(node, moved), reference, err_msg=name)
        geometry = node.GetSegmentation().GetConversionParameter("Reference image geometry")
        np.testing.assert_allclose(grid_numbers(geometry), grid_numbers(local_grid(moved)), atol=1e-6, err_msg=name)
        assert node.GetNodeReference(role) is moved, name


def test_removing_the_input_or_output_node_while_running_stops_the_child(logic, ct_voxels):
    """Output node deleted, then File > Close Scene (Clear), while the child runs: the next poll stops the child,
    reports a clear error, and leaves no result node outside the scene and no temporary folder."""
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    scene = slicer.mrmlScene
    volume = slicer.util.addVolumeFromArray(ct_voxels, geometry_cases()["plain"], name="CT")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "deleted by the user")
    finished = {}
    tasks = {name: logic.segmentAsync(volume, MODEL, outputSegmentationNode=node, device="cpu",
                                      onFinished=lambda n, e, name=name: finished.__setitem__(name, (n, e)))
             for name, node in (("output removed", output), ("scene closed", None))}
    time.sleep(1.0)  # the children are starting (importing torch)
    assert all(task.poll() for task in tasks.values())

    scene.RemoveNode(output)
    assert not tasks["output removed"].poll()
    assert tasks["scene closed"].poll()
    scene.Clear(0)
    assert not tasks["scene closed"].poll()

    messages = {"output removed": "output segmentation was removed", "scene closed": "input volume was removed"}
    for name, task in tasks.items():
        node, error = finished[name]
        assert task.state == "failed" and node is None and task.result is None, name
        assert isinstance(error, MedDINOv3SegmentError) and messages[name] in str(error), (name, error)
        assert task.process.process.poll() is not None, f"{name}: child still running"
        if os.name != "nt":
            with pytest.raises(ProcessLookupError):
                os.kill(task.process.pid, 0)
        assert not task.workDir.exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_empty_volume_with_an_roi_and_an_unplaced_roi_are_clear_errors(logic):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    scene = slicer.mrmlScene
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "meddinov3-segment-*")))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(10.0, 10.0, 10.0)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image yet")
    with pytest.raises(MedDINOv3SegmentError, match="no image data"):
        logic.segmentAsync(empty, MODEL, roiNode=roi)

    # "Create new ROI" in the ROI selector, never placed: size 0 at (0, 0, 0), which is inside this volume.
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.int16), matrix(np.eye(3), [-3.0, -3.0, -1.0]),
                                            name="CT")
    unplaced = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "new ROI")
    with pytest.raises(MedDINOv3SegmentError, match="'new ROI' has no size"):
        logic.segmentAsync(volume, MODEL, roiNode=unplaced)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "meddinov3-segment-*"))) == before


def test_input_that_is_not_a_grayscale_volume_is_named(logic):
    from MedDINOv3SegmentLib.errors import MedDINOv3SegmentError

    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    with pytest.raises(MedDINOv3SegmentError, match="scalar \\(grayscale\\) volume, not a label map"):
        logic.segmentAsync(labels, MODEL)
    with pytest.raises(MedDINOv3SegmentError, match="scalar \\(grayscale\\) volume, not a vtkMRMLSegmentationNode"):
        logic.segmentAsync(segmentation, MODEL)


def test_new_segmentation_goes_into_the_volumes_study(logic, ct_voxels):
    """A new result sits beside its volume in the subject hierarchy (the patient / study of a DICOM load)."""
    volume = slicer.util.addVolumeFromArray(ct_voxels, geometry_cases()["plain"], name="CT")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    study = shNode.CreateStudyItem(patient, "CT study")
    volumeItem = shNode.GetItemByDataNode(volume)  # in Slicer its Qt plugins add the item; headless, we do
    if volumeItem:
        shNode.SetItemParent(volumeItem, study)
    else:
        shNode.CreateItem(study, volume)
    result = logic.segment(volume, MODEL, device="cpu")
    assert shNode.GetItemParent(shNode.GetItemByDataNode(result)) == study
