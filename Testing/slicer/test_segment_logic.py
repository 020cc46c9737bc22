"""MedDINOv3SegmentLogic on a real (headless) MRML scene, with a real child process and a tiny random model.

The child processes are the slow part (importing torch and timm): the three geometry cases run
concurrently (three `segmentAsync` tasks and one batch CLI run on the same exported files).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk


REPO = Path(__file__).resolve().parents[2]
CLASS_NAMES = ["liver", "tumour"]
LIVER_COLOR = (221 / 255, 130 / 255, 101 / 255)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def user_store(tmp_path, monkeypatch):
    """Imported / registered models go to a temporary store (the child inherits the variable)."""
    home = tmp_path / "meddinov3-home"
    monkeypatch.setenv("MEDDINOV3_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    import torch

    from meddinov3.checkpoints import ClassInfo, ModelSpec, write_package
    from meddinov3.config import model_config
    from meddinov3.model import build_model

    torch.manual_seed(3)
    config = model_config("tiny", num_classes=3, depth=2)
    spec = ModelSpec("tiny-segment-test", config,
                     classes=[ClassInfo(0, "background"), ClassInfo(1, "liver"), ClassInfo(2, "tumour")],
                     spacing=(2.0, 2.0), normalization={"scheme": "ct_hu"}, license="CC0-1.0",
                     description="random tiny test model")
    return write_package(tmp_path_factory.mktemp("model") / "tiny", spec, [build_model(config).state_dict()])


@pytest.fixture(scope="module")
def liver_voxels() -> np.ndarray:
    """24 axial slices (k, j, i) of the LiTS liver CT (HU) through the liver."""
    from meddinov3.phantom import load_liver_ct

    image, _ = load_liver_ct()
    return sitk.GetArrayFromImage(image)[52:76].copy()


@pytest.fixture
def logic(headless_slicer, slicer_scene):
    from MedDINOv3Segment import MedDINOv3SegmentLogic

    return MedDINOv3SegmentLogic()


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def matrix(linear: np.ndarray, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = origin
    return m


def geometry_cases() -> dict[str, np.ndarray]:
    """IJK->RAS: axial LPS-like, oblique (two rotations, anisotropic), and left-handed (k flipped)."""
    return {
        "plain": matrix(np.diag([-1.0, -1.0, 1.0]), [64.0, 64.0, -12.0]),
        "oblique": matrix(rotation(2, 25) @ rotation(0, 10) @ np.diag([0.9, -1.1, 2.0]), [10.5, -40.25, 7.0]),
        "flipped": matrix(np.diag([-1.2, -1.2, -1.5]), [70.0, 60.0, 30.0]),
    }


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def export_with_storage_node(volume_node, path: Path) -> Path:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(volume_node)
    return path


def labelmap_on_volume_grid(segmentation_node, volume_node) -> np.ndarray:
    """All segments exported to a labelmap on the volume's grid; value n+1 = n-th segment."""
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, volume_node)
    voxels = slicer.util.arrayFromVolume(labelmap).copy()
    slicer.mrmlScene.RemoveNode(labelmap)
    return voxels


def launched_interpreter(launcher_pid: int, timeout: float = 10.0) -> int:
    """The pid of the interpreter the stand-in PythonSlicer launcher started (Linux: /proc children)."""
    from MedDINOv3SegmentLib.worker import waitUntil

    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    assert waitUntil(lambda: children.read_text().split(), timeout), "the launcher started no interpreter"
    (child,) = children.read_text().split()
    return int(child)


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meddinov3.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Segmentation: voxels equal to the CLI's on the same file, for three geometries
# ---------------------------------------------------------------------------------------------


def test_segment_matches_cli_for_plain_oblique_and_flipped_volumes(logic, package, liver_voxels, tmp_path):
    from MedDINOv3SegmentLib.logic import SegmentTask

    scene = slicer.mrmlScene
    volumes = {name: slicer.util.addVolumeFromArray(liver_voxels, ijk, name=f"{name} CT")
               for name, ijk in geometry_cases().items()}
    assert np.linalg.det(geometry_cases()["flipped"][:3, :3]) < 0  # really left-handed

    # The plain case replaces the segments of an existing node; another node must stay untouched.
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    manual.GetSegmentation().SetSourceRepresentationName("Closed surface")  # e.g. imported from a model
    manual.GetSegmentation().AddEmptySegment("old", "old segment")
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    other.GetSegmentation().AddEmptySegment("keep", "keep me")

    # Reference: the CLI on files exported the same way (one batch run), concurrently with the Logic.
    exported = [export_with_storage_node(volumes[name], tmp_path / f"{name}.nrrd") for name in volumes]
    reference = subprocess.Popen([sys.executable, "-m", "meddinov3.cli.main", "segment", *map(str, exported),
                                  "-o", str(tmp_path / "cli"), "--model", str(package), "--device", "cpu"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: dict[str, list[dict]] = {name: [] for name in volumes}
    finished: dict[str, tuple] = {}
    tasks: dict[str, SegmentTask] = {}
    for name, volume in volumes.items():
        tasks[name] = logic.segmentAsync(
            volume, str(package), outputSegmentationNode=manual if name == "plain" else None, device="cpu",
            onProgress=events[name].append, onFinished=lambda node, error, name=name: finished.__setitem__(name, (node, error)))
    nodes_while_running = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    assert nodes_while_running == 2  # nothing created before success

    deadline = time.monotonic() + 300
    while any(task.poll() for task in tasks.values()):
        assert time.monotonic() < deadline, "segmentation took too long"
        time.sleep(0.1)
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    for name, task in tasks.items():
        assert task.state == "succeeded", (name, task.error)
        node, error = finished[name]
        assert error is None and node is task.result
        kinds = [e["event"] for e in events[name]]
        assert kinds[0] == "started" and "progress" in kinds and "finished" in kinds
        progress = [e for e in events[name] if e["event"] == "progress" and e["stage"] == "segmenting"]
        assert progress[-1]["done"] == progress[-1]["total"] == liver_voxels.shape[0]
        assert {"fraction", "eta_s"} <= set(progress[-1])
        assert not task.workDir.exists()  # temporary files removed

    assert tasks["plain"].result is manual
    assert segment_names(other) == ["keep me"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 4  # manual, other, oblique, flipped

    found_labels = set()
    for name, volume in volumes.items():
        node = tasks[name].result
        assert segment_names(node) == CLASS_NAMES
        segmentation = node.GetSegmentation()
        liver = segmentation.GetNthSegment(0)
        np.testing.assert_allclose(liver.GetColor(), LIVER_COLOR, atol=1e-3)
        assert "10200004" in liver.GetTerminology()  # SNOMED CT "Liver"
        assert not liver.GetNameAutoGenerated()
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        assert node.GetNodeReference(role) is volume
        assert node.GetDisplayNode() is not None

        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / f"{name}.nii.gz")))
        assert expected.shape == liver_voxels.shape
        got = labelmap_on_volume_grid(node, volume)  # 1 = liver, 2 = tumour (segment order = class values)
        np.testing.assert_array_equal(got, expected, err_msg=f"{name}: segmentation differs from the CLI output")
        for index, segment_id in enumerate(node.GetSegmentation().GetSegmentIDs(), start=1):
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
            np.testing.assert_array_equal(mask.astype(bool), expected == index)
        found_labels |= set(np.unique(expected).tolist())
    assert {1, 2} <= found_labels, "the test model should predict both classes somewhere"


# ---------------------------------------------------------------------------------------------
# Cancel and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.slicer_python
def test_cancel_kills_the_child_at_once_and_leaves_the_scene_unchanged(logic, package, liver_voxels):
    """Cancel ends the work even though the child is a launcher (PythonSlicer) that forwards no signal."""
    from MedDINOv3SegmentLib import MedDINOv3SegmentCancelled
    from MedDINOv3SegmentLib.worker import waitUntil

    scene = slicer.mrmlScene
    volume = slicer.util.addVolumeFromArray(liver_voxels, geometry_cases()["plain"], name="CT")
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    existing.GetSegmentation().AddEmptySegment("s1", "manual work")
    before = node_ids(scene)
    volume_mtime = volume.GetMTime()
    finished = []
    task = logic.segmentAsync(volume, str(package), outputSegmentationNode=existing, device="cpu",
                              onFinished=lambda node, error: finished.append((node, error)))
    time.sleep(1.0)  # the child is starting (importing torch)
    assert task.poll() and task.process.returncode() is None
    pid = task.process.pid
    interpreter = launched_interpreter(pid)  # the child is the stand-in PythonSlicer: the work is its child
    started = time.monotonic()
    task.cancel()
    assert time.monotonic() - started < 1.0
    assert task.process.process.poll() is not None, "child still running after cancel"
    if os.name != "nt":
        with pytest.raises(ProcessLookupError):  # gone and reaped
            os.kill(pid, 0)
        from meddinov3.processes import process_alive

        assert waitUntil(lambda: not process_alive(interpreter), 2.0), "the interpreter PythonSlicer ran survived"
    assert task.state == "cancelled" and task.result is None
    assert len(finished) == 1 and finished[0][0] is None and isinstance(finished[0][1], MedDINOv3SegmentCancelled)
    assert not task.poll()
    assert not task.workDir.exists()
    assert node_ids(scene) == before
    assert segment_names(existing) == ["manual work"]
    assert volume.GetMTime() == volume_mtime


@pytest.mark.slicer_python
def test_errors_in_the_child_become_clear_one_line_errors(logic, package, liver_voxels):
    """An unknown model (asynchronous call) and a wrong modality (blocking call), both found by the child."""
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    scene = slicer.mrmlScene
    rng = np.random.default_rng(0)
    not_ct = slicer.util.addVolumeFromArray(rng.uniform(0, 800, size=(4, 32, 32)).astype(np.float32), name="MR T1")
    ct = slicer.util.addVolumeFromArray(liver_voxels[:2], name="CT")
    before = node_ids(scene)
    finished = []
    task = logic.segmentAsync(ct, "no-such-model-anywhere", device="cpu",
                              onFinished=lambda node, error: finished.append((node, error)))

    with pytest.raises(MedDINOv3SegmentError) as raised:  # meanwhile, the blocking call
        logic.segment(not_ct, str(package), device="cpu")
    assert task.wait(timeout=300)

    messages = {"modality": str(raised.value), "model": str(finished[0][1])}
    assert "Hounsfield" in messages["modality"] and "MR T1" in messages["modality"], messages
    assert "unknown model" in messages["model"], messages
    for message in messages.values():
        assert "\n" not in message and "Traceback" not in message and "input.nrrd" not in message
    assert finished[0][0] is None and isinstance(finished[0][1], MedDINOv3SegmentError) and task.state == "failed"
    assert node_ids(scene) == before


def test_problems_found_before_starting_raise_at_once(logic, package, liver_voxels):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    volume = slicer.util.addVolumeFromArray(liver_voxels[:2], name="CT")
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.SetAndObserveImageData(volume.GetImageData())
    cases = [((None, str(package)), "No input volume"), ((volume, ""), "No model"),
             ((labelmap, str(package)), "label map")]
    for args, text in cases:
        with pytest.raises(MedDINOv3SegmentError, match=text):
            logic.segmentAsync(*args)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(5000.0, 0.0, 0.0)
    roi.SetSize(10.0, 10.0, 10.0)
    with pytest.raises(MedDINOv3SegmentError, match="ROI does not overlap"):
        logic.segmentAsync(volume, str(package), roiNode=roi)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_available_models_lists_manifest_imported_trained_and_nnunet(logic, package, tmp_path, user_store):
    from Testing.core.upstream_layouts import write_nnunet_folder

    from meddinov3.checkpoints import load_manifest

    imported = logic.importModel(package, name="imported-tiny")
    assert Path(imported).parent == user_store / "models"
    trained = tmp_path / "runs" / "my-model"
    import shutil

    shutil.copytree(package, trained)
    assert logic.registerModel(trained) == str(trained.resolve())
    nnunet, _ = write_nnunet_folder(tmp_path / "nnunet", folds=(0,))
    logic.registerModel(nnunet)

    rows = {row["name"]: row for row in logic.availableModels()}
    assert rows["imported-tiny"]["source"] == "imported"
    assert rows["imported-tiny"]["reference"] == imported
    assert rows["imported-tiny"]["classes"] == CLASS_NAMES
    assert rows["imported-tiny"]["license"] == "CC0-1.0"
    assert rows["my-model"]["source"] == "trained"
    assert rows["my-model"]["reference"] == str(trained.resolve())
    nn_row = rows[nnunet.name]
    assert nn_row["source"] == "nnU-Net folder" and nn_row["classes"] and nn_row["segmentable"]
    for row in rows.values():
        assert set(row) >= {"name", "reference", "source", "classes", "license", "description"}

    manifest = load_manifest()
    backbones = [e["name"] for e in manifest if e.get("kind") == "backbone"]
    segmenters = [e["name"] for e in manifest if e.get("kind", "segmentation") == "segmentation"]
    assert backbones, "the manifest lists the pretrained backbone"
    for name in backbones:
        assert name not in rows, "backbone-only models cannot segment"
    for name in segmenters:  # e.g. the shipped demo model `demo-liver-ct`
        assert rows[name]["source"] == "manifest" and rows[name]["reference"] == name
    everything = {row["name"]: row for row in logic.availableModels(segmentableOnly=False)}
    for name in backbones:
        assert everything[name]["source"] == "manifest" and not everything[name]["segmentable"]

    info = logic.modelInfo(imported)
    assert info["classes"] == CLASS_NAMES and info["source"] == "imported"
    assert info["description"] == "random tiny test model"


def test_register_model_refuses_what_is_not_a_model(logic, tmp_path):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.json").write_text(json.dumps({"format": "something-else"}))
    for path in (empty, junk, tmp_path / "missing"):
        with pytest.raises(MedDINOv3SegmentError, match="Cannot register"):
            logic.registerModel(path)
    assert all(row["source"] not in ("trained", "nnU-Net folder") for row in logic.availableModels(False))


def test_import_model_errors_are_clear(logic, package):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError

    logic.importModel(package, name="twice")
    with pytest.raises(MedDINOv3SegmentError, match="already imported"):
        logic.importModel(package, name="twice")
    with pytest.raises(MedDINOv3SegmentError, match="no such file"):
        logic.importModel("/no/such/model")


# ---------------------------------------------------------------------------------------------
# Pieces: ROI box, grid mapping, command line, module glue
# ---------------------------------------------------------------------------------------------


def test_roi_becomes_the_voxel_box_of_centres_inside_it(headless_slicer, slicer_scene):
    from MedDINOv3SegmentLib.nodes import roiToVoxelBox

    ijk_to_ras = geometry_cases()["oblique"]
    volume = slicer.util.addVolumeFromArray(np.zeros((10, 20, 30), np.int16), ijk_to_ras, name="CT")
    # An ROI aligned with the volume axes covering voxels i 3..7, j 2..4, k 1..5 (centres), with margins < 1 voxel.
    roi = slicer_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    lo, hi = np.array([3, 2, 1]) - 0.4, np.array([7, 4, 5]) + 0.4
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    orientation = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            orientation.SetElement(r, c, axes[r, c])
    center = (ijk_to_ras @ np.r_[(lo + hi) / 2, 1.0])[:3]
    orientation_and_center = slicer.util.arrayFromVTKMatrix(orientation)
    orientation_and_center[:3, 3] = center
    roi.GetObjectToNodeMatrix().DeepCopy(slicer.util.vtkMatrixFromArray(orientation_and_center))
    roi.SetSize(*((hi - lo) * np.linalg.norm(ijk_to_ras[:3, :3], axis=0)))
    assert roiToVoxelBox(roi, volume) == [3, 2, 1, 8, 5, 6]
    # Clipped to the volume.
    roi.SetSize(1000.0, 1000.0, 1000.0)
    assert roiToVoxelBox(roi, volume) == [0, 0, 0, 30, 20, 10]


def test_result_grid_is_mapped_exactly_or_refused(headless_slicer, slicer_scene):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError
    from MedDINOv3SegmentLib.nodes import arrayOnVolumeGrid

    ijk_to_ras = geometry_cases()["oblique"]
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), ijk_to_ras, name="CT")
    labels = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.testing.assert_array_equal(arrayOnVolumeGrid(labels, ijk_to_ras, volume), labels)
    # The same voxels stored with k reversed and i/j swapped (what another writer may do).
    to_file = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]], dtype=float)  # file ijk -> node ijk
    file_ijk_to_ras = ijk_to_ras @ to_file
    fk, fj, fi = np.indices((4, 6, 5))  # file array (k, j, i): file i runs along node j, file j along node i
    stored = labels[3 - fk, fi, fj]
    np.testing.assert_array_equal(arrayOnVolumeGrid(np.ascontiguousarray(stored), file_ijk_to_ras, volume), labels)
    shifted = ijk_to_ras.copy()
    shifted[:3, 3] += ijk_to_ras[:3, 0] * 0.5  # half a voxel off: refused, never resampled
    with pytest.raises(MedDINOv3SegmentError, match="voxel grid"):
        arrayOnVolumeGrid(labels, shifted, volume)


def test_command_line_of_the_child(headless_slicer):
    from MedDINOv3SegmentLib.logic import buildCommand
    from MedDINOv3SegmentLib.worker import python_executable

    launcher = str(Path(slicer.app.slicerHome) / "bin" / "PythonSlicer")  # the harness's stand-in launcher
    assert python_executable() == launcher
    command = buildCommand("in.nrrd", "out.seg.nrrd", "demo-liver-ct", device="cuda:1", fast=True, tta=True,
                           roiBox=[1, 2, 3, 4, 5, 6], keepLargest=True, fillHoles=True, batchSize=8)
    assert command[:8] == [launcher, "-m", "meddinov3.cli", "segment", "in.nrrd", "-o", "out.seg.nrrd",
                           "--model"]
    joined = " ".join(command)
    for flag in ("--device cuda:1", "--fast", "--tta", "--roi 1,2,3,4,5,6", "--keep-largest", "--fill-holes",
                 "--batch-size 8", "--json-progress"):
        assert flag in joined
    assert "--no-postprocessing" not in joined  # the package's own post-processing by default
    assert "--no-postprocessing" in buildCommand("a", "b", "m", modelPostprocessing=False)
    assert "--fast" not in buildCommand("a", "b", "m")
    assert "--batch-size auto" in " ".join(buildCommand("a", "b", "m"))


def test_child_error_messages():
    from MedDINOv3SegmentLib.worker import errorMessageFromChild

    assert errorMessageFromChild(2, None, ["meddinov3 segment: error: x.nrrd: bad"]) == "x.nrrd: bad"
    assert errorMessageFromChild(1, "boom", []) == "boom"
    assert "exited with code 137" in errorMessageFromChild(137, None, [])
    oom = errorMessageFromChild(1, None, ["Traceback ...", "torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"])
    assert oom.startswith("The GPU ran out of memory") and "CPU" in oom


def test_module_file_imports_headless_with_parameter_node(logic, slicer_scene):
    import MedDINOv3Segment as module

    assert issubclass(module.MedDINOv3SegmentTest, slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest)
    assert module.MedDINOv3SegmentLogic is type(logic)
    parameters = logic.getParameterNode()
    assert parameters.device == "Auto" and parameters.batchSize == 0 and parameters.model == ""
    volume = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2)), name="CT")
    parameters.inputVolume = volume
    parameters.fast = True
    again = logic.getParameterNode()
    assert again.inputVolume is volume and again.fast


def test_device_selector_lists_what_torch_sees(headless_slicer, monkeypatch):
    """Both Widgets fill their device combo box with `fillDeviceSelector`; the combo box is a stand-in (no Qt here)."""
    import torch

    from MedDINOv3SegmentLib import dependencies

    class ComboBox:
        def __init__(self):
            self.items = ["stale"]

        def clear(self):
            self.items = []

        def addItem(self, text):
            self.items.append(text)

    box = ComboBox()
    values = dependencies.fillDeviceSelector(box)
    assert box.items == list(values)
    assert values["Auto"] == "auto" and values["CPU"] == "cpu"
    gpus = [value for value in values.values() if value.startswith("cuda:")]
    assert gpus == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    monkeypatch.setattr(dependencies.importlib.util, "find_spec", lambda name: None)  # a Slicer without torch yet
    assert dependencies.fillDeviceSelector(box) == {"Auto": "auto", "CPU": "cpu"} and box.items == ["Auto", "CPU"]
