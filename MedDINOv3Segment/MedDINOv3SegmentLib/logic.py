"""MedDINOv3SegmentLogic: segment a volume node with a MedDINOv3 model in a child process.

Usable from Slicer's Python console; never touches widgets::

    logic = MedDINOv3SegmentLogic()
    segmentationNode = logic.segment(volumeNode, "demo-liver-ct")            # blocking
    task = logic.segmentAsync(volumeNode, "demo-liver-ct", onProgress=print,  # returns at once
                              onFinished=lambda node, error: print(node, error), uncertainty=True)
    while task.poll(): time.sleep(0.1)                                         # the Widget uses a QTimer
    task.cancel()
    task.statisticsTableNode, task.uncertaintyVolumeNode, task.unsureSlices   # after success

The scene is changed only when a segmentation succeeded, and only on the thread that calls `poll()`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import models, nodes, results
from .errors import MedDINOv3SegmentCancelled, MedDINOv3SegmentError
from .worker import ChildProcess, child_environment, errorMessageFromChild, python_executable

DEVICES_HELP = "auto, cpu, cuda, cuda:N"


def buildCommand(inputPath, outputPath, model: str, device: str = "auto", fast: bool = False, tta: bool = False,
                 roiBox: list[int] | None = None, keepLargest: bool = False, fillHoles: bool = False,
                 batchSize: int | str = "auto", python: str | None = None, modelPostprocessing: bool = True,
                 statisticsPath=None, uncertaintyPath=None) -> list[str]:
    """The `meddinov3 segment` command line the child runs (`modelPostprocessing`: the package's own clean-up;
    `statisticsPath` / `uncertaintyPath`: also write per-segment statistics / the uncertainty map there)."""
    command = [python or python_executable(), "-m", "meddinov3.cli", "segment", str(inputPath),
               "-o", str(outputPath), "--model", str(model), "--device", str(device or "auto"),
               "--batch-size", str(batchSize or "auto"), "--json-progress", "--overwrite"]
    if fast:
        command.append("--fast")
    if tta:
        command.append("--tta")
    if roiBox is not None:
        command += ["--roi", ",".join(str(int(v)) for v in roiBox)]
    if keepLargest:
        command.append("--keep-largest")
    if fillHoles:
        command.append("--fill-holes")
    if not modelPostprocessing:
        command.append("--no-postprocessing")
    if statisticsPath is not None:
        command += ["--statistics", str(statisticsPath)]
    if uncertaintyPath is not None:
        command += ["--save-uncertainty", str(uncertaintyPath)]
    return command


class SegmentTask:
    """A running segmentation. `poll()` (caller's thread) drains progress and, at the end, builds the node.

    States: "running", "succeeded", "failed", "cancelled". `result` is the segmentation node on success,
    `error` a MedDINOv3SegmentError otherwise. On success also: `statistics` (the child's statistics JSON),
    `statisticsTableNode` (volume and intensities per segment), and when asked for, `uncertaintyVolumeNode` and
    `unsureSlices` ((index, confidence, RAS) of the slices below full confidence, least confident first). Callbacks run inside `poll()` / `cancel()`. If the input volume or
    the output node leaves the scene (deleted, scene closed) while running, the next `poll()` stops the child: "failed".
    """

    def __init__(self, logic: "MedDINOv3SegmentLogic", workDir: Path, process: ChildProcess, inputPath: Path,
                 outputPath: Path, inputVolumeNode, outputSegmentationNode, onProgress: Callable | None, onFinished: Callable | None):
        self._logic = logic
        self.workDir = workDir
        self.process = process
        self.inputPath = inputPath
        self.outputPath = outputPath
        self.inputVolumeNode = inputVolumeNode
        self.outputSegmentationNode = outputSegmentationNode
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.state = "running"
        self.result = None
        self.error: MedDINOv3SegmentError | None = None
        self.lastProgress: dict = {}
        self.statistics: dict = {}
        self.statisticsTableNode = None
        self.uncertaintyVolumeNode = None
        self.unsureSlices: list = []
        self._failedMessage: str | None = None
        self.startTime = time.monotonic()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def poll(self) -> bool:
        """Handle what the child reported; returns True while the task is still running."""
        if not self.running:
            return False
        removed = self._removedNodeMessage()
        if removed is not None:  # e.g. the scene was closed: the result could go nowhere, stop the child now
            self.process.kill(timeout=1.0)
            self._finish("failed", MedDINOv3SegmentError(removed))
            return False
        for event in self.process.drain():
            self._handleEvent(event)
        code = self.process.returncode()
        if code is None:
            return True
        for event in self.process.drain():  # the readers saw the pipes close: nothing else will come
            self._handleEvent(event)
        if code == 0:
            try:
                self.result = self._loadResult()
                self._loadExtras()
                self._finish("succeeded")
            except MedDINOv3SegmentError as e:
                self._finish("failed", e)
            except Exception as e:  # noqa: BLE001 - reported to the user as one line
                logging.exception("MedDINOv3: loading the segmentation result failed")
                self._finish("failed", MedDINOv3SegmentError(f"Loading the segmentation result failed: {e}"))
        else:
            message = errorMessageFromChild(code, self._failedMessage, list(self.process.stderrTail))
            # The temporary file means nothing to the user: name the volume instead.
            message = message.replace(str(self.inputPath), f"Volume '{self.inputVolumeNode.GetName()}'")
            stderr = "\n".join(self.process.stderrTail)
            if stderr:
                logging.info("MedDINOv3 segment process output:\n%s", stderr)
            self._finish("failed", MedDINOv3SegmentError(message))
        return False

    def _loadResult(self):
        """Put the child's result into the scene (subclasses: other results, e.g. completed segments)."""
        return self._logic._loadResult(self.outputPath, self.inputVolumeNode, self.outputSegmentationNode)

    def _loadExtras(self) -> None:
        """Statistics table, and the uncertainty volume and unsure slices when the run made them."""
        statisticsPath = self.workDir / "statistics.json"
        if not statisticsPath.is_file():
            return
        self.statistics = results.readStatistics(statisticsPath)
        scene = self.inputVolumeNode.GetScene()
        self.statisticsTableNode = results.statisticsTableNode(self.statistics, scene,
                                                               f"{self.result.GetName()} statistics")
        uncertaintyPath = self.workDir / "uncertainty.nrrd"
        if uncertaintyPath.is_file():
            self.uncertaintyVolumeNode = results.loadUncertaintyVolume(uncertaintyPath, self.inputVolumeNode)
            self.unsureSlices = results.unsureSlices(self.statistics["slice_confidence"], self.inputVolumeNode)

    def _removedNodeMessage(self) -> str | None:
        if self.inputVolumeNode.GetScene() is None:
            return "The input volume was removed from the scene during segmentation."
        if self.outputSegmentationNode is not None and self.outputSegmentationNode.GetScene() is None:
            return "The output segmentation was removed from the scene during segmentation."
        return None

    def _handleEvent(self, event: dict) -> None:
        name = event.get("event")
        if name == "failed" and event.get("message"):
            self._failedMessage = str(event["message"])
        if name == "progress":
            self.lastProgress = event
        if self.onProgress is not None:
            try:
                self.onProgress(event)
            except Exception:  # noqa: BLE001 - a broken callback must not break the task
                logging.exception("MedDINOv3: progress callback failed")

    def cancel(self) -> None:
        """Kill the child process tree (within a second); the scene stays unchanged."""
        if not self.running:
            return
        self.process.kill(timeout=1.0)
        self._finish("cancelled", MedDINOv3SegmentCancelled("Segmentation cancelled."))

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until finished (True) or `timeout` seconds passed (False). Console / test helper."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def _finish(self, state: str, error: MedDINOv3SegmentError | None = None) -> None:
        self.state = state
        self.error = error
        shutil.rmtree(self.workDir, ignore_errors=True)
        self._logic._tasks.discard(self)
        if self.onFinished is not None:
            try:
                self.onFinished(self.result, self.error)
            except Exception:  # noqa: BLE001
                logging.exception("MedDINOv3: finished callback failed")


class MedDINOv3SegmentLogic(ScriptedLoadableModuleLogic):
    """Segment volumes with MedDINOv3 models; list, import and register models. No widgets."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self._tasks: set[SegmentTask] = set()
        #: Override the child's Python (tests, custom installs); None = PythonSlicer in Slicer, else sys.executable.
        self.pythonExecutable: str | None = None

    def getParameterNode(self):
        from MedDINOv3Segment import MedDINOv3SegmentParameterNode

        return MedDINOv3SegmentParameterNode(super().getParameterNode())

    # -- models ---------------------------------------------------------------------------------

    def availableModels(self, segmentableOnly: bool = True) -> list[dict]:
        """Models to offer: dicts with name, reference (pass as `model`), source, classes, license, description."""
        return models.listModels(segmentableOnly=segmentableOnly)

    def modelInfo(self, reference: str) -> dict:
        return models.modelInfo(reference)

    def registerModel(self, path) -> str:
        """Add a trained model folder to the list (validated first); returns its reference."""
        return models.registerModel(path)

    def importModel(self, path, name: str | None = None) -> str:
        """Import a downloaded weights file or model folder (offline machines); returns its reference."""
        return models.importModel(path, name)

    # -- segmentation ---------------------------------------------------------------------------

    def segment(self, inputVolumeNode, model: str, outputSegmentationNode=None, device: str = "auto",
                fast: bool = False, tta: bool = False, roiNode=None, keepLargest: bool = False,
                fillHoles: bool = False, batchSize: int | str = "auto", onProgress: Callable | None = None,
                modelPostprocessing: bool = True, uncertainty: bool = False):
        """Segment and wait. Returns the segmentation node; raises MedDINOv3SegmentError."""
        task = self.segmentAsync(inputVolumeNode, model, outputSegmentationNode, device=device, fast=fast, tta=tta,
                                 roiNode=roiNode, keepLargest=keepLargest, fillHoles=fillHoles, batchSize=batchSize,
                                 onProgress=onProgress, modelPostprocessing=modelPostprocessing,
                                 uncertainty=uncertainty)
        try:
            while task.poll():
                time.sleep(0.05)
                slicer.app.processEvents()
        except BaseException:
            task.cancel()
            raise
        if task.error is not None:
            raise task.error
        return task.result

    def segmentAsync(self, inputVolumeNode, model: str, outputSegmentationNode=None, device: str = "auto",
                     fast: bool = False, tta: bool = False, roiNode=None, keepLargest: bool = False,
                     fillHoles: bool = False, batchSize: int | str = "auto", onProgress: Callable | None = None,
                     onFinished: Callable | None = None, modelPostprocessing: bool = True,
                     uncertainty: bool = False) -> SegmentTask:
        """Start segmenting; returns a SegmentTask at once (call its `poll()` regularly, or `cancel()`).

        `outputSegmentationNode`: None creates a new node on success; a node has its segments replaced. Either way
        the node gets the input volume's parent transform and its grid as reference geometry.
        `modelPostprocessing`: apply the clean-up steps the model package declares (False: the raw labels).
        Per-segment statistics are always computed (`task.statisticsTableNode`); `uncertainty`: also an uncertainty
        volume (normalised entropy, percent) and the slices ordered from the least confident.
        Input problems raise MedDINOv3SegmentError here; later problems reach `onFinished(None, error)`.
        """
        if inputVolumeNode is None:
            raise MedDINOv3SegmentError("No input volume selected.")
        if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            kind = "a label map" if inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode") else f"a {inputVolumeNode.GetClassName()}"
            raise MedDINOv3SegmentError(f"The input must be a scalar (grayscale) volume, not {kind}.")
        if not model:
            raise MedDINOv3SegmentError("No model selected.")
        if outputSegmentationNode is not None and not outputSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise MedDINOv3SegmentError("The output must be a segmentation node.")
        if inputVolumeNode.GetImageData() is None:
            raise MedDINOv3SegmentError("The input volume has no image data.")
        if batchSize in (None, 0, "0", ""):
            batchSize = "auto"
        roiBox = nodes.roiToVoxelBox(roiNode, inputVolumeNode) if roiNode is not None else None

        workDir = Path(tempfile.mkdtemp(prefix="meddinov3-segment-"))
        try:
            inputPath = nodes.exportVolume(inputVolumeNode, workDir / "input.nrrd")
            outputPath = workDir / "output.seg.nrrd"
            command = buildCommand(inputPath, outputPath, model, device=device, fast=fast, tta=tta, roiBox=roiBox,
                                   keepLargest=keepLargest, fillHoles=fillHoles, batchSize=batchSize,
                                   python=self.pythonExecutable, modelPostprocessing=modelPostprocessing,
                                   statisticsPath=workDir / "statistics.json",
                                   uncertaintyPath=workDir / "uncertainty.nrrd" if uncertainty else None)
            logging.info("MedDINOv3: %s", " ".join(command))
            process = ChildProcess(command, env=child_environment(), cwd=str(workDir))
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        task = SegmentTask(self, workDir, process, inputPath, outputPath, inputVolumeNode, outputSegmentationNode,
                           onProgress, onFinished)
        self._tasks.add(task)
        return task

    def jumpToSlice(self, ras) -> None:
        """Move the slice views to the plane through world point `ras` (e.g. one of `task.unsureSlices`)."""
        results.jumpSlicesTo(slicer.mrmlScene, ras)

    def cancelAll(self) -> None:
        """Cancel every running task (module cleanup, scene close)."""
        for task in list(self._tasks):
            task.cancel()

    # -- result ---------------------------------------------------------------------------------

    def _loadResult(self, outputPath: Path, inputVolumeNode, outputSegmentationNode):
        """Build (or replace the segments of) the segmentation node from the child's .seg.nrrd."""
        if not Path(outputPath).is_file():
            raise MedDINOv3SegmentError("The segmentation process finished without writing a result.")
        if inputVolumeNode.GetScene() is None:
            raise MedDINOv3SegmentError("The input volume was removed from the scene during segmentation.")
        voxels, fileIjkToRas, segments = nodes.readSegmentationFile(outputPath)
        labels = nodes.arrayOnVolumeGrid(voxels, fileIjkToRas, inputVolumeNode)
        scene = inputVolumeNode.GetScene()
        created = outputSegmentationNode is None
        if created:
            outputSegmentationNode = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} segmentation"))
        try:
            nodes.fillSegmentationNode(outputSegmentationNode, inputVolumeNode, labels, segments)
            if outputSegmentationNode.GetDisplayNode() is None:
                outputSegmentationNode.CreateDefaultDisplayNodes()
            if created:
                nodes.placeBesideInHierarchy(outputSegmentationNode, inputVolumeNode)
        except BaseException:
            if created:
                scene.RemoveNode(outputSegmentationNode)
            raise
        return outputSegmentationNode
