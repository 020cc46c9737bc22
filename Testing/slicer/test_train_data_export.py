"""MedDINOv3TrainLogic edge cases a user meets while preparing training data (headless Slicer, real MRML nodes).

- A segment named "background" is refused (it took label 0's name: dataset.json had no label 0).
- A pair whose volume or segmentation was removed from the scene after selection: a clear message, no traceback.
- An existing folder is replaced only if it holds nothing but an earlier export (a user's nnU-Net dataset stays).
- A destination under a file, or a job that cannot start, is a clear error and leaves nothing behind; the
  output folder of a failed start can be used again.

Nothing is mocked: the failing start uses a Python executable path that does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from Testing.slicer.test_train_logic import _box, _segmentation, _volume

SHAPE = (6, 20, 24)


@pytest.fixture(autouse=True)
def meddinov3_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MEDDINOV3_HOME", str(home))
    return home


@pytest.fixture
def logic(headless_slicer):
    from MedDINOv3TrainLib.logic import MedDINOv3TrainLogic

    return MedDINOv3TrainLogic()


def _pair(scene, name: str, segments=None, seed=0):
    volumeNode = _volume(scene, name, SHAPE, seed=seed)
    segments = segments or {"Liver": _box(SHAPE, (1, 4), (2, 10), (3, 12))}
    return volumeNode, _segmentation(scene, volumeNode, segments, f"{name} segmentation")


def test_segment_named_background_is_refused(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.export import DatasetExportError

    pair = _pair(slicer_scene, "ct", {"Background": _box(SHAPE, (0, 2), (0, 4), (0, 4)),
                                      "Liver": _box(SHAPE, (3, 5), (5, 9), (5, 9))})
    with pytest.raises(DatasetExportError, match="'Background' has the name of label 0"):
        logic.classPreview([pair])
    with pytest.raises(DatasetExportError, match="label 0"):
        logic.exportDataset([pair], tmp_path / "dataset")
    assert [p.name for p in tmp_path.iterdir()] == ["home"]


def test_nodes_removed_from_the_scene_after_selection(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.export import DatasetExportError

    kept = _pair(slicer_scene, "kept", seed=1)
    gone = _pair(slicer_scene, "gone", seed=2)
    slicer_scene.RemoveNode(gone[0])
    with pytest.raises(DatasetExportError, match=r"Case 2 \(gone\): the volume was removed from the scene"):
        logic.exportDataset([kept, gone], tmp_path / "dataset")
    other = _pair(slicer_scene, "other", seed=3)
    slicer_scene.RemoveNode(other[1])
    with pytest.raises(DatasetExportError, match="segmentation 'other segmentation' was removed from the scene"):
        logic.exportDataset([kept, other], tmp_path / "dataset")
    assert [p.name for p in tmp_path.iterdir()] == ["home"], "no staging folder left behind"


def test_users_dataset_folder_is_never_replaced(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.export import DatasetExportError

    pair = _pair(slicer_scene, "ct")
    users = tmp_path / "Dataset001_Liver"  # the user's own nnU-Net dataset: it has a dataset.json too
    (users / "imagesTs").mkdir(parents=True)
    (users / "imagesTs" / "mine_0000.nii.gz").write_text("precious")
    (users / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    with pytest.raises(DatasetExportError, match="not an exported dataset"):
        logic.exportDataset([pair], users)
    assert (users / "imagesTs" / "mine_0000.nii.gz").read_text() == "precious"

    exported = Path(logic.exportDataset([pair], tmp_path / "export"))
    logic.exportDataset([pair], exported)  # an earlier export of this module is replaced
    (exported / "notes.txt").write_text("mine")  # ... unless the user put files of theirs in it
    with pytest.raises(DatasetExportError, match="not an exported dataset"):
        logic.exportDataset([pair], exported)
    assert (exported / "notes.txt").read_text() == "mine"


def test_destination_under_a_file_is_a_clear_error(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.export import DatasetExportError
    from MedDINOv3TrainLib.jobs import TrainJobError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetExportError, match="is a file"):
        logic.exportDataset([_pair(slicer_scene, "ct")], tmp_path / "afile" / "dataset")
    with pytest.raises(TrainJobError, match="Cannot create the output folder"):
        logic.startJob("finetune", tmp_path, tmp_path / "afile" / "run", size="tiny", options={"steps": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "home"]


def test_failed_start_leaves_no_half_made_job(logic, slicer_scene, tmp_path, meddinov3_home):
    from MedDINOv3TrainLib.export import DatasetExportError
    from MedDINOv3TrainLib.jobs import TrainJobError

    volumeNode = _volume(slicer_scene, "ct", SHAPE)
    empty = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    with pytest.raises(DatasetExportError, match="no segments"):
        logic.startJob("finetune", [(volumeNode, empty)], tmp_path / "run", size="tiny", options={"steps": 2})
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainJobError, match="not found"):
        logic.startJob("finetune", tmp_path / "missing", None, size="tiny", options={"steps": 2})
    assert list((meddinov3_home / "jobs").iterdir()) == []

    mine = tmp_path / "chosen"
    mine.mkdir()  # an empty folder the user picked: it stays, empty
    logic.pythonExecutable = str(tmp_path / "no-such-python")
    for _ in range(2):  # the second try is not refused with "already holds a training job"
        with pytest.raises(TrainJobError, match="Could not start the training process.*no-such-python"):
            logic.startJob("finetune", tmp_path, mine, size="tiny", options={"steps": 2, "batch_size": 2})
        assert mine.is_dir() and list(mine.iterdir()) == []
    assert logic.jobs() == []


def test_preview_warns_about_empty_segments(logic, slicer_scene):
    import numpy as np

    first = _pair(slicer_scene, "first", {"Liver": _box(SHAPE, (1, 4), (2, 10), (3, 12)),
                                          "Tumor": np.zeros(SHAPE, bool)}, seed=1)
    second = _pair(slicer_scene, "second", {"Liver": _box(SHAPE, (0, 2), (0, 4), (0, 4)),
                                            "Tumor": _box(SHAPE, (3, 5), (5, 9), (5, 9))}, seed=2)
    second[1].GetSegmentation().AddEmptySegment("liver", "liver")  # an empty duplicate beside a filled one: fine
    preview = logic.classPreview([first, second])
    assert preview["classes"] == {"Liver": ["first", "second"], "Tumor": ["first", "second"]}
    assert preview["warnings"] == ["Case 'first': the 'Tumor' segment is empty: it will be trained as background there."]


def test_stop_during_start_up_is_stopped_not_failed(logic, tmp_path):
    """Stop right after Start: SIGTERM reaches the child before its trainer handles signals. The user asked
    for it: "stopped", not "failed" with the launch command as the error."""
    import sys

    from Testing.train._datasets import phantom_dataset

    data = phantom_dataset(tmp_path / "dataset", n=1, shape=(8, 40, 40))
    logic.childEnvironment = {"OMP_NUM_THREADS": "1"}
    job = logic.startJob("finetune", data, tmp_path / "run", size="tiny",
                         options={"steps": 2, "device": "cpu", "cache_dir": str(tmp_path / "cache")})
    assert job.stop(timeout=60) == "stopped", job.logTail(20)
    status = job.status()
    assert status["state"] == "stopped" and not status["error"] and not job.isProcessRunning()

    # a process that died on its own is still "failed"; the launch header (our own line) is never the error
    from MedDINOv3TrainLib.jobs import TrainJob

    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "job.json").write_text(json.dumps({"mode": "finetune", "pid": 0, "started": 1.0}))
    (dead / "log.txt").write_text(f"\n# 2026-01-01 00:00:00 {sys.executable} -m meddinov3.cli train\n")
    status = TrainJob(dead).status()
    assert status["state"] == "failed" and status["error"] == "the training process ended without a status"


def test_segment_covered_by_a_later_one_is_refused(logic, slicer_scene, tmp_path):
    """Where segments overlap the later-listed one wins: a tumour listed before the liver that contains it would
    vanish from the labels while dataset.json still lists it. Listed after the liver, it keeps its voxels."""
    from MedDINOv3TrainLib.export import DatasetExportError

    tumour, liver = _box(SHAPE, (2, 4), (4, 7), (5, 8)), _box(SHAPE, (1, 5), (2, 10), (3, 12))
    hidden = _pair(slicer_scene, "hidden", {"Tumor": tumour, "Liver": liver})
    with pytest.raises(DatasetExportError, match=r"segment\(s\) 'Tumor' keep no voxel .*move them down"):
        logic.exportDataset([hidden], tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()
    ordered = _pair(slicer_scene, "ordered", {"Liver": liver, "Tumor": tumour}, seed=1)
    folder = Path(logic.exportDataset([ordered], tmp_path / "dataset"))
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "ordered.nii.gz")))
    assert (labels == 2).sum() == tumour.sum() and (labels == 1).sum() == liver.sum() - tumour.sum()


def test_closed_surface_segmentation_is_exported_without_changing_the_users_node(logic, slicer_scene, tmp_path):
    """A segmentation held as closed surfaces is converted on the volume's grid in a temporary copy: the labels hold
    the sphere, and the user's node gets no binary labelmap (Slicer's default grid for it is much finer)."""
    import numpy as np
    import SimpleITK as sitk
    import vtk

    from Testing.slicer.test_train_logic import _volume

    volumeNode = _volume(slicer_scene, "surface", SHAPE, seed=3)
    bounds = [0.0] * 6
    volumeNode.GetRASBounds(bounds)
    centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    radius = min(bounds[2 * a + 1] - bounds[2 * a] for a in range(3)) / 3
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(centre)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(40)
    sphere.SetPhiResolution(40)
    sphere.Update()
    segmentationNode = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    segmentation = segmentationNode.GetSegmentation()
    setSource = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
    setSource("Closed surface")
    segmentationNode.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Liver", [1.0, 0.0, 0.0])
    nodes_before = slicer_scene.GetNumberOfNodes()

    folder = Path(logic.exportDataset([(volumeNode, segmentationNode)], tmp_path / "dataset"))
    labels = sitk.ReadImage(str(folder / "labelsTr" / "surface.nii.gz"))
    voxel_mm3 = float(np.prod(labels.GetSpacing()))
    expected = 4 / 3 * np.pi * radius ** 3 / voxel_mm3
    assert abs(int((sitk.GetArrayViewFromImage(labels) == 1).sum()) - expected) < 0.25 * expected
    assert not segmentation.ContainsRepresentation("Binary labelmap")
    extra = [slicer_scene.GetNthNode(i) for i in range(nodes_before, slicer_scene.GetNumberOfNodes())]
    extra = [n for n in extra if not n.IsA("vtkMRMLSubjectHierarchyNode")]  # the scene's, made on first use
    assert not extra, [(n.GetClassName(), n.GetName()) for n in extra]  # temporary nodes are removed
