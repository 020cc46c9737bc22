"""What works in a headless Slicer (PyPI slicer-core + Testing/slicer_headless.py), shown with real nodes.

Module authors can rely on everything exercised here; the last tests document what does not work.
Geometry conventions: volume nodes are RAS, SimpleITK / NRRD / NIfTI readers are LPS
(x and y negated); `slicer.util` arrays are indexed (k, j, i), like SimpleITK's `GetArrayFromImage`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import vtk

from Testing.slicer_headless import (
    ApplicationStandIn,
    register_module,
    setup_headless_slicer,
    sitk_from_volume_node,
    volume_node_from_sitk,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def oblique_ijk_to_ras() -> np.ndarray:
    """IJK->RAS with a 20 degree oblique rotation, a flipped axis and anisotropic spacing."""
    angle = math.radians(20)
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    flip = np.diag([1.0, -1.0, 1.0])  # j axis runs anterior -> posterior
    spacing = np.diag([0.7, 0.8, 2.5])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ flip @ spacing
    matrix[:3, 3] = [12.5, -40.0, 7.25]
    return matrix


def ijk_to_ras_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def assert_same_physical_volume(node, voxels: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """`node` holds `voxels` (k, j, i) placed by `ijk_to_ras`, possibly with its axes reordered or flipped."""
    loaded = slicer.util.arrayFromVolume(node)
    to_original = np.linalg.inv(ijk_to_ras) @ ijk_to_ras_of(node)  # node IJK -> original IJK
    np.testing.assert_allclose(to_original, np.round(to_original), atol=1e-4)  # a signed permutation + shift
    k, j, i = np.indices(loaded.shape)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    oi, oj, ok = np.round(to_original @ ijk)[:3].astype(int)
    np.testing.assert_array_equal(loaded.ravel(), voxels[ok, oj, oi])


def labels_array(shape=(6, 7, 8)) -> np.ndarray:
    """(k, j, i) labelmap with labels 1, 2 and 5 (a gap in the label values)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:4, 2:5, 1:4] = 1
    labels[4:6, 0:2, 5:8] = 2
    labels[0, 6, 7] = 5
    return labels


def oblique_sitk_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 2000, size=(5, 6, 7)).astype(np.int16))
    image.SetSpacing((0.65, 0.9, 3.0))
    image.SetOrigin((-120.5, 33.0, -410.0))
    angle = math.radians(15)
    direction = np.array(
        [[math.cos(angle), 0.0, math.sin(angle)], [0.0, -1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
    )  # oblique about y, with the y axis flipped
    image.SetDirection(direction.ravel().tolist())
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert a.GetSize() == b.GetSize()


# ---------------------------------------------------------------------------------------------
# The fixture itself
# ---------------------------------------------------------------------------------------------


def test_slicer_is_the_real_package_with_stand_ins(slicer_scene):
    assert "site-packages" in slicer.__file__
    assert not any("Testing" in path for path in slicer.__path__)
    assert slicer.mrmlScene is slicer_scene
    assert isinstance(slicer_scene, slicer.vtkMRMLScene)
    assert isinstance(slicer.app, ApplicationStandIn)
    assert setup_headless_slicer() is slicer  # idempotent
    assert slicer.mrmlScene is slicer_scene


def test_module_logics_are_registered(slicer_scene):
    expected = {
        "colors": slicer.vtkSlicerColorLogic,
        "subjecthierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic,
        "terminologies": slicer.vtkSlicerTerminologiesModuleLogic,
        "volumes": slicer.vtkSlicerVolumesLogic,
        "segmentations": slicer.vtkSlicerSegmentationsModuleLogic,
        "markups": slicer.vtkSlicerMarkupsLogic,
    }
    app_logic = slicer.app.applicationLogic()
    assert isinstance(app_logic, slicer.vtkSlicerApplicationLogic)
    assert app_logic.GetMRMLScene() is slicer_scene
    for key, cls in expected.items():
        logic = getattr(slicer.modules, key).logic()
        assert isinstance(logic, cls)
        assert logic.GetMRMLScene() is slicer_scene
        assert app_logic.GetModuleLogic(getattr(slicer.modules, key).name) is logic
    assert app_logic.GetColorLogic() is slicer.modules.colors.logic()
    # Default colour tables exist (created by the colour logic) and survive scene clearing.
    assert slicer_scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None
    assert slicer_scene.GetNodeByID("vtkMRMLColorTableNodeLabels") is not None
    assert slicer_scene.GetSubjectHierarchyNode() is not None


def test_scene_is_cleared_between_tests(slicer_scene):
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    slicer.util.addVolumeFromArray(np.zeros((2, 2, 2)), name="left behind")
    # the next test using `slicer_scene` starts without it (fixture clears before and after)


def test_scene_starts_empty_again(slicer_scene):
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


def test_add_volume_from_array_keeps_voxels_and_oblique_geometry(slicer_scene):
    voxels = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8) - 100.5
    matrix = oblique_ijk_to_ras()
    node = slicer.util.addVolumeFromArray(voxels, matrix, name="CT")
    assert node.IsA("vtkMRMLScalarVolumeNode")
    assert slicer.util.getNode("CT") is node
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), voxels)
    np.testing.assert_allclose(ijk_to_ras_of(node), matrix, atol=1e-12)
    np.testing.assert_allclose(node.GetSpacing(), [0.7, 0.8, 2.5])
    assert node.GetImageData().GetDimensions() == (8, 7, 6)  # (i, j, k)
    # A display node with the default grey colour table was created (needs the colour logic).
    assert node.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    # Voxel (i, j, k) = (3, 2, 1) sits at IJKToRAS @ (3, 2, 1, 1).
    ras = (matrix @ [3, 2, 1, 1])[:3]
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    np.testing.assert_allclose(ras_to_ijk.MultiplyPoint([*ras, 1.0])[:3], [3, 2, 1], atol=1e-9)


def test_update_volume_from_array_and_labelmap_volumes(slicer_scene):
    node = slicer.util.addVolumeFromArray(labels_array(), oblique_ijk_to_ras(), nodeClassName="vtkMRMLLabelMapVolumeNode")
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetDisplayNode().IsA("vtkMRMLLabelMapVolumeDisplayNode")
    replaced = np.full((6, 7, 8), 3, dtype=np.uint8)
    slicer.util.updateVolumeFromArray(node, replaced)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), replaced)
    # arrayFromVolume is a view: in-place edits need arrayFromVolumeModified
    slicer.util.arrayFromVolume(node)[0, 0, 0] = 9
    slicer.util.arrayFromVolumeModified(node)
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == 9


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_volume_storage_node_round_trip_with_simpleitk(slicer_scene, tmp_path, extension):
    voxels = np.random.default_rng(1).integers(-1024, 3000, size=(6, 7, 8)).astype(np.int16)
    matrix = oblique_ijk_to_ras()
    node = slicer.util.addVolumeFromArray(voxels, matrix, name="CT")
    path = str(tmp_path / f"ct{extension}")

    storage = slicer_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    storage.SetUseCompression(False)
    assert storage.WriteData(node) == 1

    image = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)
    assert image.GetPixelID() == sitk.sitkInt16
    # SimpleITK is LPS: origin and direction rows x, y negated with respect to RAS.
    np.testing.assert_allclose(image.GetOrigin(), LPS_TO_RAS @ matrix[:3, 3], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 0.8, 2.5], atol=1e-5)
    direction = LPS_TO_RAS @ matrix[:3, :3] @ np.diag(1 / np.array([0.7, 0.8, 2.5]))
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), direction, atol=1e-5)
    assert_same_geometry(image, sitk_from_volume_node(node))

    # Read back in Slicer: with a storage node, and with the volumes logic (what Logic code should use).
    # This IJK->RAS is left-handed (one flipped axis): Slicer's reader flips the k axis to make it
    # right-handed, so the array is k-reversed but every voxel keeps its physical position.
    loaded = slicer_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    reader = slicer_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(loaded) == 1
    assert np.linalg.det(matrix[:3, :3]) < 0 < np.linalg.det(ijk_to_ras_of(loaded)[:3, :3])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), voxels[::-1])
    assert_same_physical_volume(loaded, voxels, matrix)

    archetype = slicer.modules.volumes.logic().AddArchetypeVolume(path, "archetype")
    assert archetype is not None and archetype.GetStorageNode() is not None
    assert_same_physical_volume(archetype, voxels, matrix)


def test_right_handed_volume_reads_back_unchanged(slicer_scene, tmp_path):
    voxels = np.random.default_rng(2).integers(0, 100, size=(4, 5, 6)).astype(np.uint8)
    matrix = oblique_ijk_to_ras() @ np.diag([1.0, -1.0, 1.0, 1.0])  # undo the flip: det > 0
    node = slicer.util.addVolumeFromArray(voxels, matrix)
    path = str(tmp_path / "rh.nrrd")
    writer = slicer_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    writer.SetFileName(path)
    assert writer.WriteData(node) == 1
    loaded = slicer.modules.volumes.logic().AddArchetypeVolume(path, "loaded")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), voxels)
    np.testing.assert_allclose(ijk_to_ras_of(loaded), matrix, atol=1e-4)


def test_sitk_volume_node_helpers_keep_exact_geometry(slicer_scene):
    image = oblique_sitk_image()
    node = volume_node_from_sitk(image, "from sitk")
    assert node.GetName() == "from sitk"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))

    # Independent check: voxel index (i, j, k) maps to the same physical point (RAS = LPS with x, y negated).
    for index in [(0, 0, 0), (6, 0, 0), (2, 5, 4), (6, 5, 4)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = (ijk_to_ras_of(node) @ [*index, 1])[:3]
        np.testing.assert_allclose(ras, LPS_TO_RAS @ lps, atol=1e-9)

    back = sitk_from_volume_node(node)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


# ---------------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------------


def make_segmentation(scene):
    """Reference volume + labelmap (labels 1, 2, 5) imported into a new segmentation node."""
    matrix = oblique_ijk_to_ras()
    labels = labels_array()
    volume = slicer.util.addVolumeFromArray(labels.astype(np.float32) * 100, matrix, name="CT")
    labelmap = slicer.util.addVolumeFromArray(labels, matrix, name="labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
    return volume, labelmap, segmentation, labels


def test_import_labelmap_to_segmentation(slicer_scene):
    volume, _, segmentation_node, labels = make_segmentation(slicer_scene)
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3  # one per label present, background excluded
    segments = [segmentation.GetNthSegment(i) for i in range(3)]
    assert [s.GetLabelValue() for s in segments] == [1, 2, 5]  # label values kept
    # Default names/colours come from the labelmap's colour table; both can be set.
    for segment, (name, color) in zip(
        segments, [("liver", (0.87, 0.51, 0.40)), ("spleen", (0.62, 0.42, 0.64)), ("liver tumour", (0.9, 0.2, 0.2))]
    ):
        segment.SetName(name)
        segment.SetColor(*color)
    assert segmentation.GetSegmentIdBySegmentName("spleen") == segmentation.GetNthSegmentID(1)
    np.testing.assert_allclose(segments[0].GetColor(), (0.87, 0.51, 0.40))
    # Reference geometry is the volume.
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation_node.GetNodeReference(role) is volume
    # The binary labelmap is the source representation.
    assert segmentation.GetSourceRepresentationName() == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

    # Per segment, in the reference volume's geometry:
    for segment_index, label in enumerate([1, 2, 5]):
        segment_id = segmentation.GetNthSegmentID(segment_index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume)
        np.testing.assert_array_equal(mask, (labels == label).astype(mask.dtype))


def test_export_segments_to_labelmap(slicer_scene):
    volume, _, segmentation_node, labels = make_segmentation(slicer_scene)
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    logic = slicer.modules.segmentations.logic()

    # Without a colour table, exported values are 1..N in segment order (NOT the original labels).
    exported = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, exported, volume)
    by_order = np.zeros_like(labels)
    for order, label in enumerate([1, 2, 5], start=1):
        by_order[labels == label] = order
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(exported), by_order)
    np.testing.assert_allclose(ijk_to_ras_of(exported), ijk_to_ras_of(volume), atol=1e-9)

    # With a colour table whose entry names are the segment names, values are the table indices.
    table = slicer_scene.AddNewNodeByClass("vtkMRMLColorTableNode", "labels table")
    table.SetTypeToUser()
    table.SetNumberOfColors(6)
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        table.SetColor(segment.GetLabelValue(), segment.GetName(), *segment.GetColor(), 1.0)
    exact = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, exact, volume, 0, table)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(exact), labels)


def test_update_segment_from_array(slicer_scene):
    volume, _, segmentation_node, labels = make_segmentation(slicer_scene)
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", "new organ", [0.1, 0.9, 0.1])
    mask = np.zeros_like(labels)
    mask[2:4, 3:6, 4:7] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation_node, segment_id, volume)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume), mask)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 4


def test_segmentation_storage_round_trip_with_slicerio(slicer_scene, tmp_path):
    volume, _, segmentation_node, labels = make_segmentation(slicer_scene)
    segmentation = segmentation_node.GetSegmentation()
    names = ["liver", "spleen", "liver tumour"]
    colors = [(0.866667, 0.509804, 0.396078), (0.615686, 0.423529, 0.635294), (0.9, 0.2, 0.2)]
    for i, (name, color) in enumerate(zip(names, colors)):
        segmentation.GetNthSegment(i).SetName(name)
        segmentation.GetNthSegment(i).SetColor(*color)
    path = str(tmp_path / "ct.seg.nrrd")
    storage = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.WriteData(segmentation_node) == 1

    result = slicerio.read_segmentation(path)
    assert [s["name"] for s in result["segments"]] == names
    for segment, color in zip(result["segments"], colors):
        np.testing.assert_allclose(segment["color"], color, atol=1e-5)
    # Voxels: (i, j, k) order, extent = the effective extent of the segments, labels as stored.
    voxels = result["voxels"]
    offset = result["referenceImageExtentOffset"]
    full = np.zeros(labels.shape[::-1], dtype=voxels.dtype)
    full[offset[0] : offset[0] + voxels.shape[0], offset[1] : offset[1] + voxels.shape[1], offset[2] : offset[2] + voxels.shape[2]] = voxels
    stored_labels = [s["labelValue"] for s in result["segments"]]
    expected = np.zeros_like(labels)
    for stored, label in zip(stored_labels, [1, 2, 5]):
        expected[labels == label] = stored
    np.testing.assert_array_equal(full.transpose(2, 1, 0), expected)
    # Geometry: ijkToLPS is the volume's IJKToRAS with x, y negated.
    ijk_to_lps = np.array(result["ijkToLPS"])
    ijk_to_ras = ijk_to_ras_of(volume)
    np.testing.assert_allclose(ijk_to_lps[:3, :3], LPS_TO_RAS @ ijk_to_ras[:3, :3], atol=1e-5)

    # And it loads back into Slicer with names and colours.
    loaded = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(loaded) == 1
    loaded_segmentation = loaded.GetSegmentation()
    assert [loaded_segmentation.GetNthSegment(i).GetName() for i in range(3)] == names


def test_segment_terminology_round_trip(slicer_scene, tmp_path):
    """Segments carry SNOMED CT terminology as a string tag; no .term.json files are needed to set it.

    An entry needs a terminology context name to be valid; it is kept in .seg.nrrd files.
    """
    _, _, segmentation_node, _ = make_segmentation(slicer_scene)
    segment = segmentation_node.GetSegmentation().GetNthSegment(0)
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName("MedDINOv3")
    codes = [
        (entry.GetCategoryObject(), ("SCT", "123037004", "Anatomical Structure")),
        (entry.GetTypeObject(), ("SCT", "64033007", "Kidney")),
        (entry.GetTypeModifierObject(), ("SCT", "24028007", "Right")),
    ]
    for coded, (scheme, value, meaning) in codes:
        coded.SetCodingSchemeDesignator(scheme)
        coded.SetCodeValue(value)
        coded.SetCodeMeaning(meaning)
    terminologies = slicer.modules.terminologies.logic()
    serialized = terminologies.SerializeTerminologyEntry(entry)
    assert serialized.startswith("MedDINOv3~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^24028007^Right~")
    segment.SetTerminology(serialized)
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert terminologies.DeserializeTerminologyEntry(segment.GetTerminology(), parsed)
    assert parsed.GetTypeModifierObject().GetCodeMeaning() == "Right"

    path = str(tmp_path / "terminology.seg.nrrd")
    storage = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.WriteData(segmentation_node) == 1
    terminology = slicerio.read_segmentation(path, skip_voxels=True)["segments"][0]["terminology"]
    assert terminology["contextName"] == "MedDINOv3"
    assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert terminology["type"] == ["SCT", "64033007", "Kidney"]
    assert terminology["typeModifier"] == ["SCT", "24028007", "Right"]


# ---------------------------------------------------------------------------------------------
# Markups, parameter nodes, scripted-module stand-ins
# ---------------------------------------------------------------------------------------------


def test_markups_roi(slicer_scene):
    roi = slicer_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(10.0, -5.0, 2.0)
    roi.SetSize(20.0, 30.0, 40.0)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    np.testing.assert_allclose(bounds, [0, 20, -20, 10, -18, 22])


def test_parameter_node_wrapper_stand_in_stores_values_in_the_node(slicer_scene):
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

    @parameterNodeWrapper
    class ExampleParameterNode:
        inputVolume: slicer.vtkMRMLScalarVolumeNode
        roi: Optional[slicer.vtkMRMLMarkupsROINode]
        batchSize: Annotated[int, WithinRange(0, 64)] = 0
        device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
        threshold: float = 0.5
        fast: bool

    class ExampleLogic(ScriptedLoadableModuleLogic):
        def getParameterNode(self):
            return ExampleParameterNode(super().getParameterNode())

    logic = ExampleLogic()
    assert logic.moduleName == "Example"
    params = logic.getParameterNode()
    assert (params.inputVolume, params.roi, params.batchSize, params.device, params.threshold, params.fast) == (
        None, None, 0, "auto", 0.5, False,
    )
    volume = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2)))
    params.inputVolume = volume
    params.batchSize = 8
    params.threshold = 1  # ints are accepted for floats
    with pytest.raises(ValueError):
        params.batchSize = 65
    with pytest.raises(ValueError):
        params.device = "tpu"
    with pytest.raises(TypeError):
        params.roi = volume

    # Singleton parameter node in the scene; values are in the MRML node itself.
    again = logic.getParameterNode()
    assert again.parameterNode is params.parameterNode
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    assert again.inputVolume is volume and again.batchSize == 8 and again.threshold == 1.0
    node = params.parameterNode
    assert node.GetNodeReferenceID("inputVolume") == volume.GetID()
    assert json.loads(node.GetParameter("batchSize")) == 8
    assert node.GetAttribute("ModuleName") == "Example"


def test_scripted_module_stand_ins_and_i18n(slicer_scene):
    import ctk
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    class Example(ScriptedLoadableModule):
        def __init__(self, parent=None):
            super().__init__(parent)
            self.parent.title = _("Example")

    module = Example()
    assert module.parent.title == "Example" and module.moduleName == "Example"
    assert module.resourcePath("Icons/Example.png").endswith("Resources/Icons/Example.png")
    assert translate("Example", "text") == "text"

    class ExampleWidget(ScriptedLoadableModuleWidget, slicer.util.VTKObservationMixin):
        def __init__(self, parent=None):
            ScriptedLoadableModuleWidget.__init__(self, parent)
            slicer.util.VTKObservationMixin.__init__(self)

    widget = ExampleWidget()
    widget.setup()
    assert widget.moduleName == "Example"
    assert issubclass(ScriptedLoadableModuleTest, __import__("unittest").TestCase)

    # qt / ctk are placeholders: classes can be named, subclassed and instantiated, nothing more.
    class Worker(qt.QObject):
        pass

    Worker()
    qt.QTimer().start(100)
    assert ctk.ctkCollapsibleButton.__name__ == "ctkCollapsibleButton"

    register_module("Example", logic=object())
    assert slicer.modules.example.logic() is not None


def test_observers_fire_headless(slicer_scene):
    events = []
    volume = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2)))
    tag = volume.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: events.append(event))
    volume.SetName("renamed")
    volume.RemoveObserver(tag)
    assert events == ["ModifiedEvent"]


# ---------------------------------------------------------------------------------------------
# What does NOT work headless (needs the Qt application)
# ---------------------------------------------------------------------------------------------


def test_io_manager_helpers_need_the_application(slicer_scene, tmp_path):
    """slicer.util.loadVolume / saveNode / getModule go through slicer.app managers that do not exist."""
    node = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), dtype=np.int16))
    with pytest.raises(AttributeError):
        slicer.util.saveNode(node, str(tmp_path / "x.nrrd"))
    with pytest.raises(AttributeError):
        slicer.util.loadVolume(str(tmp_path / "x.nrrd"))
    with pytest.raises(AttributeError):
        slicer.util.getModule("Volumes")
