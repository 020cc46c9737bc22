"""MedDINOv3TrainLogic on a headless Slicer (slicer-core, real MRML nodes) and real training child processes.

- Scene export: segments with different names / label values across cases become one consistent dataset.
- A tiny fine-tune job runs detached to completion; its model is registered and segments a volume.
- Stop leaves a resumable checkpoint; Resume continues the step count to completion.
- Jobs start the harness's stand-in `PythonSlicer` (a launcher that forwards no signal, like Slicer's): Stop ends the
  trainer it runs; a trainer that outlives its launcher still counts as running (Resume and Delete refused).
- A new Logic (a Slicer restart) finds running and finished jobs again.
- Chart nodes for loss and per-class validation Dice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.processes import process_alive
from Testing.slicer_headless import sitk_from_volume_node, volume_node_from_sitk


@pytest.fixture(autouse=True)
def meddinov3_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MEDDINOV3_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return home


@pytest.fixture
def logic(headless_slicer):
    from MedDINOv3TrainLib.logic import MedDINOv3TrainLogic

    return MedDINOv3TrainLogic()


# -------------------------------------------------------------------------------------------- scene helpers


def _volume(scene, name: str, shape=(6, 20, 24), spacing=(1.5, 1.2, 3.0), direction=None, seed=0):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(-200, 300, size=shape).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((10.0 + seed, -5.0, 3.0))
    if direction is not None:
        image.SetDirection(direction)
    return volume_node_from_sitk(image, name)


def _segmentation(scene, volumeNode, segments: dict[str, np.ndarray], name: str):
    """Segmentation node whose segments (in the given order) hold the given (k, j, i) masks on the volume grid."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    for segmentName, mask in segments.items():
        segmentId = node.GetSegmentation().AddEmptySegment(segmentName, segmentName)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segmentId, volumeNode)
    return node


def _box(shape, k, j, i):
    mask = np.zeros(shape, dtype=bool)
    mask[k[0]:k[1], j[0]:j[1], i[0]:i[1]] = True
    return mask


def _three_cases(scene):
    shape = (6, 20, 24)
    a = _volume(scene, "case A", shape, seed=1)
    # left-handed, oblique-free grid: k axis flipped
    b = _volume(scene, "case B", shape, spacing=(0.8, 0.9, 2.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1), seed=2)
    c = _volume(scene, "case C", shape, seed=3)
    masks = {
        "A": {"Liver": _box(shape, (1, 4), (2, 10), (3, 12)), "Tumor": _box(shape, (2, 3), (12, 16), (14, 20))},
        "B": {"tumor": _box(shape, (0, 2), (1, 5), (1, 6)), "liver": _box(shape, (3, 6), (8, 18), (10, 22))},
        "C": {"liver": _box(shape, (0, 6), (0, 5), (0, 5))},
    }
    pairs = [(a, _segmentation(scene, a, masks["A"], "seg A")), (b, _segmentation(scene, b, masks["B"], "seg B")),
             (c, _segmentation(scene, c, masks["C"], "seg C"))]
    return pairs, masks


# -------------------------------------------------------------------------------------------- export


def test_export_matches_classes_across_cases_voxel_by_voxel(logic, slicer_scene, tmp_path):
    pairs, masks = _three_cases(slicer_scene)
    preview = logic.classPreview(pairs)
    assert preview["labels"] == {"background": 0, "Liver": 1, "Tumor": 2}
    assert preview["classes"] == {"Liver": ["case_A", "case_B", "case_C"], "Tumor": ["case_A", "case_B"]}
    assert len(preview["warnings"]) == 1 and "case_C" in preview["warnings"][0] and "Tumor" in preview["warnings"][0]

    folder = Path(logic.exportDataset(pairs, tmp_path / "dataset"))
    description = json.loads((folder / "dataset.json").read_text())
    assert description["labels"] == {"background": 0, "Liver": 1, "Tumor": 2}
    assert description["channel_names"] == {"0": "CT"} and description["numTraining"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"

    expected_values = {"Liver": 1, "Tumor": 2, "liver": 1, "tumor": 2}
    for (volumeNode, _), case, key in zip(pairs, ["case_A", "case_B", "case_C"], "ABC"):
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        reference = sitk_from_volume_node(volumeNode)
        for img in (image, label):
            assert img.GetSize() == reference.GetSize()
            np.testing.assert_allclose(img.GetSpacing(), reference.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(img.GetOrigin(), reference.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), reference.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
        expected = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
        for name, mask in masks[key].items():
            expected[mask] = expected_values[name]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected, err_msg=case)

    # the core reads it as a training dataset
    from meddinov3.data import load_dataset

    ds = load_dataset(str(folder))
    assert sorted(c.name for c in ds.cases) == ["case_A", "case_B", "case_C"]

    # exporting again replaces the earlier export atomically
    again = logic.exportDataset(pairs[:2], folder)
    assert json.loads((Path(again) / "dataset.json").read_text())["numTraining"] == 2
    assert len(list((Path(again) / "imagesTr").iterdir())) == 2


def test_terminology_code_matches_differently_named_segments(logic, slicer_scene):
    shape = (6, 20, 24)
    a, b = _volume(slicer_scene, "a", shape, seed=1), _volume(slicer_scene, "b", shape, seed=2)
    segA = _segmentation(slicer_scene, a, {"Liver": _box(shape, (0, 2), (0, 4), (0, 4)),
                                           "Kidney": _box(shape, (3, 5), (5, 9), (5, 9))}, "sa")
    segB = _segmentation(slicer_scene, b, {"Hepar": _box(shape, (0, 2), (0, 4), (0, 4))}, "sb")
    entry = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~{}~^^~" \
            "Anatomic codes - DICOM master list~^^~^^"
    for node, name in ((segA, "Liver"), (segB, "Hepar")):
        segment = node.GetSegmentation().GetSegment(name)
        segment.SetTag("TerminologyEntry", entry.format("SCT^10200004^Liver"))
    from MedDINOv3TrainLib.export import terminologyTypeCode

    assert terminologyTypeCode(segA.GetSegmentation().GetSegment("Liver")) == "SCT^10200004"
    preview = logic.classPreview([(a, segA), (b, segB)])
    assert preview["labels"] == {"background": 0, "Liver": 1, "Kidney": 2}
    assert preview["classes"]["Liver"] == ["a", "b"]


def test_export_refuses_bad_pairs(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.export import DatasetExportError

    volumeNode = _volume(slicer_scene, "v")
    with pytest.raises(DatasetExportError, match="no segmentation"):
        logic.exportDataset([(volumeNode, None)], tmp_path / "x")
    with pytest.raises(DatasetExportError, match="No training cases"):
        logic.classPreview([])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    seg = _segmentation(slicer_scene, volumeNode, {"liver": _box((6, 20, 24), (0, 2), (0, 2), (0, 2))}, "s")
    with pytest.raises(DatasetExportError, match="not an exported dataset"):
        logic.exportDataset([(volumeNode, seg)], tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


# -------------------------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    from Testing.train._datasets import phantom_dataset

    return phantom_dataset(tmp_path_factory.mktemp("phantom") / "dataset", n=3, shape=(8, 40, 40))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One slice cache for every job of this file (the phantom is cached once)."""
    return tmp_path_factory.mktemp("cache")


def _tiny(cache: Path, **extra) -> dict:
    return {"model": {"depth": 1}, "batch_size": 2, "val_fraction": 0.0, "patch_size": [32, 32],
            "checkpoint_every": 2, "log_every": 1, "cache_dir": str(cache), "device": "cpu",
            "augment": {"enabled": False}, **extra}


@pytest.mark.slicer_python
def test_finetune_job_runs_detached_registers_and_segments(logic, slicer_scene, phantom_data, cache, meddinov3_home,
                                                           headless_slicer):
    job = logic.startJob("finetune", phantom_data, None, size="tiny", options={"steps": 4, **_tiny(cache)})
    assert job.runDir.parent == meddinov3_home / "jobs"  # default: MEDDINOV3_HOME/jobs
    info = json.loads((job.runDir / "job.json").read_text())
    assert info["mode"] == "finetune" and info["pid"] and info["command"][-1] == "--json-progress"
    assert info["command"][1:5] == ["-m", "meddinov3.cli", "train", "--data"]
    assert info["command"][0] == str(Path(headless_slicer.app.slicerHome) / "bin" / "PythonSlicer")
    assert os.getsid(info["pid"]) == info["pid"], "the job leads its own session"
    assert job.status()["state"] in ("starting", "running", "finished")
    assert job.wait(timeout=240) == "finished", job.logTail(30)
    status = job.status()
    assert status["step"] == status["total"] == 4
    assert (job.runDir / "log.txt").stat().st_size > 0 and job.logTail(5)

    assert [r["step"] for r in job.metrics() if r["kind"] == "step"] == [1, 2, 3, 4]

    from MedDINOv3SegmentLib.models import listModels

    assert job.modelPath() == str(job.runDir / "model")
    rows = [r for r in listModels() if r["source"] == "trained"]
    assert [Path(r["reference"]) for r in rows] == [job.runDir / "model"]
    assert set(rows[0]["classes"]) >= {"liver", "spine"}

    # the registered model segments a volume (through the Segment Logic when it loads, else the engine)
    image = sitk.ReadImage(str(phantom_data / "imagesTr" / "case0_0000.nii.gz"))
    volumeNode = volume_node_from_sitk(image, "phantom")
    try:
        from MedDINOv3SegmentLib.logic import MedDINOv3SegmentLogic
    except ImportError:
        MedDINOv3SegmentLogic = None
    if MedDINOv3SegmentLogic is not None:
        segmentLogic = MedDINOv3SegmentLogic()
        assert any(r["reference"] == rows[0]["reference"] for r in segmentLogic.availableModels())
        segmentation = segmentLogic.segment(volumeNode, rows[0]["reference"], device="cpu")
        seg = segmentation.GetSegmentation()
        names = {seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
        assert names <= set(rows[0]["classes"])  # a 4-step model: which classes it finds is not the point
    else:
        from meddinov3.engine import segment_image

        result = segment_image(image, rows[0]["reference"], device="cpu")
        assert result is not None


def _wait_for_step(job, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = job.status()
        if status["step"] >= step or status["state"] not in ("starting", "running"):
            return
        assert time.monotonic() < deadline, job.logTail(30)
        time.sleep(0.1)


@pytest.mark.slicer_python
def test_stop_reattach_resume_to_completion(headless_slicer, phantom_data, cache, tmp_path):
    """Start; "restart Slicer" (a new Logic finds the running job); Stop -> resumable "stopped"; Resume -> the
    step count continues to the end; a third Logic sees it finished."""
    from MedDINOv3TrainLib.logic import MedDINOv3TrainLogic

    first = MedDINOv3TrainLogic()
    started = first.startJob("finetune", phantom_data, tmp_path / "run", size="tiny",
                             options={"steps": 12, **_tiny(cache, val_fraction=0.0, checkpoint_every=1)})
    _wait_for_step(started, 2)
    del first

    second = MedDINOv3TrainLogic()
    found = {job.runDir: job for job in second.jobs()}  # an output folder outside the jobs root is remembered
    assert set(found) == {started.runDir}
    job = found[started.runDir]
    assert job.status()["state"] == "running", job.logTail(30)
    with pytest.raises(Exception, match="running"):
        job.delete()
    trainer = job.rawStatus()["pid"]
    assert trainer != job.pid and trainer in launched_interpreters(job.pid)  # PythonSlicer's child does the work
    assert job.stop(timeout=60) == "stopped", job.logTail(30)
    assert not process_alive(trainer) and not process_alive(job.pid)
    stopped = job.status()
    assert stopped["state"] == "stopped" and 2 <= stopped["step"] < 12
    assert (job.runDir / "checkpoints" / "latest.pt").is_file() and not job.isProcessRunning()

    second.resumeJob(job)
    assert job.status()["state"] in ("starting", "running", "finished")
    assert job.wait(timeout=240) == "finished", job.logTail(30)
    steps = [r["step"] for r in job.metrics() if r["kind"] == "step"]
    assert steps == list(range(1, 13)), "the step count continues: nothing lost, nothing counted twice"
    assert len(json.loads((job.runDir / "job.json").read_text())["launches"]) == 2
    launches = [line for line in job.logTail(500) if line.startswith("# ")]  # one header line per launch
    assert len(launches) == 2 and "--resume" in launches[1] and "--resume" not in launches[0]

    third = MedDINOv3TrainLogic()
    (again,) = third.jobs()
    assert again.runDir == started.runDir and again.status()["state"] == "finished"
    from MedDINOv3SegmentLib.models import listModels

    assert [Path(r["reference"]) for r in listModels() if r["source"] == "trained"] == [job.runDir / "model"]
    again.delete()
    assert not started.runDir.exists() and MedDINOv3TrainLogic().jobs() == []


def launched_interpreters(launcher: int) -> list[int]:
    """Children of the stand-in PythonSlicer launcher (Linux /proc)."""
    return [int(pid) for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]


@pytest.mark.slicer_python
def test_trainer_outliving_its_launcher_is_still_running_until_stop_ends_it(headless_slicer, phantom_data, cache,
                                                                             tmp_path):
    """The launcher dies (a CTKAppLauncher does on SIGTERM, which it forwards nowhere) while its trainer goes on:
    the job is still running, Resume and Delete are refused, Stop ends the trainer itself."""
    import signal

    from MedDINOv3TrainLib.jobs import _CHILDREN, TrainJobError
    from MedDINOv3TrainLib.logic import MedDINOv3TrainLogic

    logic = MedDINOv3TrainLogic()
    job = logic.startJob("finetune", phantom_data, tmp_path / "run", size="tiny",
                         options={"steps": 60, **_tiny(cache, checkpoint_every=1)})
    _wait_for_step(job, 1)
    trainer = job.rawStatus()["pid"]
    assert trainer in launched_interpreters(job.pid)
    os.kill(job.pid, signal.SIGKILL)
    _CHILDREN[str(job.runDir)].wait(10)
    assert process_alive(trainer)
    status = job.status()
    assert status["state"] == "running" and status["processRunning"] and status["trainerPid"] == trainer
    with pytest.raises(TrainJobError, match="still running"):
        logic.resumeJob(job)
    with pytest.raises(TrainJobError, match="running"):
        job.delete()
    assert job.runDir.is_dir() and len(job.info()["launches"]) == 1  # no second trainer in the same folder
    assert job.stop(timeout=60) == "stopped", job.logTail(30)
    assert not process_alive(trainer) and (job.runDir / "checkpoints" / "latest.pt").is_file()
    job.delete()
    assert not job.runDir.exists()


def test_trainer_that_died_while_running_is_reported_killed(logic, tmp_path):
    """status.json says "running" for this host with a pid that is gone (out of memory, kill -9): "killed", with
    what happened and that Resume continues; not "failed"."""
    import socket
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"mode": "finetune", "pid": finished.pid, "started": time.time() - 5}))
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 7, "total": 20, "updated": time.time(),
                                                 "pid": finished.pid, "host": socket.gethostname()}))
    status = logic.job(run).status()
    assert status["state"] == "killed" and not status["processRunning"]
    assert "killed at step 7 of 20" in status["error"] and "Resume continues" in status["error"]


def test_dead_process_is_reported_failed_with_the_log_tail(logic, tmp_path):
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"mode": "finetune", "pid": finished.pid, "started": time.time() - 5}))
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 1, "total": 2, "updated": time.time()}))
    (run / "log.txt").write_text("step 1\nRuntimeError: CUDA error: no kernel image\n")
    status = logic.job(run).status()
    assert status["state"] == "failed" and "no kernel image" in status["error"] and status["logTail"]


def test_start_job_refuses_an_existing_job_folder(logic, phantom_data, tmp_path):
    from MedDINOv3TrainLib.jobs import TrainJobError

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text("{}")
    with pytest.raises(TrainJobError, match="already holds"):
        logic.startJob("finetune", phantom_data, run)
    with pytest.raises(TrainJobError, match="Unknown mode"):
        logic.startJob("distill", phantom_data, tmp_path / "x")


def test_pretrain_command_and_config_file(logic, tmp_path):
    logic.pythonExecutable = "/opt/PythonSlicer"
    command = logic.buildCommand("pretrain", tmp_path, tmp_path / "run", size="small",
                                 options={"stage": 2, "steps": 10, "device": "cuda:1", "lr": 1e-4},
                                 configPath=tmp_path / "c.json")
    assert command == ["/opt/PythonSlicer", "-m", "meddinov3.cli", "pretrain", "--data", str(tmp_path), "--out",
                       str(tmp_path / "run"), "--size", "small", "--config", str(tmp_path / "c.json"), "--stage", "2",
                       "--steps", "10", "--device", "cuda:1", "--json-progress"]
    from MedDINOv3TrainLib.jobs import TrainJob, TrainJobError, resumeCommand

    info = {"mode": "pretrain", "data": "/d", "stage": 2, "command": command}
    assert resumeCommand(info, "/r") == ["/opt/PythonSlicer", "-m", "meddinov3.cli", "pretrain", "--out", "/r",
                                         "--resume", "--json-progress"]
    with pytest.raises(TrainJobError, match="steps"):
        logic.buildCommand("pretrain", tmp_path, tmp_path / "run", options={"epochs": 3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.json").write_text(json.dumps(info))
    assert TrainJob(tmp_path / "run").modelPath() == str(tmp_path / "run" / "backbone")


# -------------------------------------------------------------------------------------------- charts


def test_update_plot_nodes_builds_loss_and_dice_series(logic, slicer_scene, tmp_path):
    from MedDINOv3TrainLib.jobs import TrainJob

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"mode": "finetune"}))
    records = [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 5)]
    records.insert(2, {"kind": "validation", "step": 2, "dice": {"liver": 0.5, "spine": 0.25}, "mean_dice": 0.375})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')
    job = TrainJob(run)

    chart = logic.updatePlotNodes(job)
    assert chart.IsA("vtkMRMLPlotChartNode")
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    names = {s.GetYColumnName(): s for s in series}
    assert set(names) == {"loss", "mean Dice", "liver", "spine"}
    lossTable = names["loss"].GetTableNode()
    assert lossTable.GetNumberOfRows() == 4
    assert lossTable.GetTable().GetColumnByName("loss").GetValue(3) == pytest.approx(0.25)
    diceTable = names["liver"].GetTableNode()
    assert diceTable.GetTable().GetColumnByName("liver").GetValue(0) == pytest.approx(0.5)
    assert diceTable.GetTable().GetColumnByName("step").GetValue(0) == 2

    # polling again updates the same nodes in place
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"kind": "step", "step": 5, "loss": 0.1}\n')
        f.write(json.dumps({"kind": "validation", "step": 5, "dice": {"liver": 0.7, "spine": 0.5}, "mean_dice": 0.6})
                + "\n")
    nodes_before = slicer_scene.GetNumberOfNodes()
    assert logic.updatePlotNodes(job) is chart
    assert slicer_scene.GetNumberOfNodes() == nodes_before
    assert lossTable.GetNumberOfRows() == 5 and diceTable.GetNumberOfRows() == 2
    assert len(job.metrics()) == 7  # read incrementally: the half-written line, completed later, is skipped
    table = lossTable.GetTable()
    assert logic.updatePlotNodes(job) is chart and lossTable.GetTable() is table  # nothing new: not rebuilt
    logic.removePlotNodes(job)
    assert slicer_scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 0


def test_gpu_memory_comes_from_the_jobs_own_status(tmp_path):
    """The Widget shows the peak GPU memory the training process reports; no GPU query from the GUI thread."""
    from MedDINOv3TrainLib.jobs import TrainJob

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"mode": "finetune"}))
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 3, "metrics": {"loss": 0.5}}))
    assert TrainJob(run).status()["metrics"].get("gpu_memory_gb") is None  # CPU runs report none
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 4,
                                                 "metrics": {"loss": 0.4, "gpu_memory_gb": 12.5}}))
    assert TrainJob(run).status()["metrics"]["gpu_memory_gb"] == 12.5


def test_plot_nodes_survive_a_scene_close(logic, slicer_scene, tmp_path):
    """Node IDs restart after a scene close: the Logic must not take over a new node that got an old ID."""
    from MedDINOv3TrainLib.jobs import TrainJob

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"mode": "finetune"}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": 0.5}) + "\n")
    job = TrainJob(run)
    chart = logic.updatePlotNodes(job)
    oldIds = {chart.GetID()} | {chart.GetNthPlotSeriesNodeID(i) for i in range(chart.GetNumberOfPlotSeriesNodes())}

    slicer_scene.Clear(0)
    userChart = slicer_scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "user chart")
    userTable = slicer_scene.AddNewNodeByClass("vtkMRMLTableNode", "user table")
    assert userChart.GetID() in oldIds  # the scene reuses the IDs

    newChart = logic.updatePlotNodes(job)
    assert newChart is not userChart and newChart.GetNumberOfPlotSeriesNodes() == len(oldIds) - 1
    assert userChart.GetNumberOfPlotSeriesNodes() == 0 and userTable.GetTable().GetNumberOfColumns() == 0
    logic.removePlotNodes(job)
    assert slicer_scene.GetNodeByID(userChart.GetID()) is userChart
    assert slicer_scene.GetNodeByID(userTable.GetID()) is userTable
    assert slicer_scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1


def test_module_file_imports_headless_with_parameter_node(logic, slicer_scene):
    import MedDINOv3Train as module

    parameters = logic.getParameterNode()
    assert (parameters.dataSource, parameters.mode, parameters.modelSize) == (module.SOURCES[0], "Fine-tune", "base")
    parameters.mode = "Pretrain stage 2"
    assert logic.getParameterNode().mode == "Pretrain stage 2"
    with pytest.raises(ValueError):
        parameters.modelSize = "huge"  # Choice: only what the size selector offers
