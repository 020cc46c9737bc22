"""MedDINOv3SegmentLogic: segment a volume node with a MedDINOv3 model in a child process.

Usable from Slicer's Python console; never touches widgets::

    logic = MedDINOv3SegmentLogic()
    segmentationNode = logic.segment(volumeNode, "demo-liver-ct")            # blocking
    task = logic.segmentAsync(volumeNode, "demo-liver-ct", onProgress=print,  # returns at once
                              onFinished=lambda node, error: print(node, error), uncertainty=True)
    while task.poll(): time.sleep(0.1)                                         # the Widget uses a QTimer
    task.cancel()
    task.statisticsTableNode, task.uncertaintyVolumeNode, task.unsureSlices   # after success
    logic.segment(volumeNode, "demo-liver-ct", options=SegmentOptions(folds=("0",), tta=True))  # every option

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
from .parameters import MedDINOv3SegmentParameterNode
from .worker import ChildProcess, errorMessageFromChild, python_executable

from meddinov3.options import SegmentOptions  # torch-free: usable before PyTorch is installed

# the Logic's keyword arguments (camelCase, as Slicer's API) -> `SegmentOptions` fields
OPTION_KEYWORDS = {"device": "device", "fast": "fast", "tta": "tta", "roiBox": "roi", "keepLargest": "keep_largest",
                   "fillHoles": "fill_holes", "batchSize": "batch_size", "modelPostprocessing": "postprocess"}


def segmentOptions(options: SegmentOptions | None = None, **keywords) -> SegmentOptions:
    """`options` (default: the defaults) with the Logic's keyword arguments that are not None applied.

    Keywords are `OPTION_KEYWORDS`' names; `device` "" and `batchSize` 0, "0" or "" mean automatic (the panel's
    values), a numeric string is a number. Raises MedDINOv3SegmentError for a value the command could not take."""
    unknown = set(keywords) - set(OPTION_KEYWORDS)
    if unknown:
        raise TypeError(f"unknown segmentation option(s): {', '.join(sorted(unknown))}")
    given = {OPTION_KEYWORDS[name]: value for name, value in keywords.items() if value is not None}
    if given.get("device") == "":
        given["device"] = "auto"
    if given.get("batch_size") in (0, "0", ""):
        given["batch_size"] = "auto"
    elif isinstance(given.get("batch_size"), str) and given["batch_size"].isdigit():
        given["batch_size"] = int(given["batch_size"])
    try:
        return SegmentOptions.merged(options, **given)
    except ValueError as e:
        raise MedDINOv3SegmentError(str(e)) from None


def buildCommand(inputPath, outputPath, model: str, device: str | None = None, fast: bool | None = None,
                 tta: bool | None = None, roiBox: list[int] | None = None, keepLargest: bool | None = None,
                 fillHoles: bool | None = None, batchSize: int | str | None = None, python: str | None = None,
                 modelPostprocessing: bool | None = None, statisticsPath=None, uncertaintyPath=None,
                 options: SegmentOptions | None = None) -> list[str]:
    """The `meddinov3 segment` command line the child runs.

    `options` (`meddinov3.options.SegmentOptions`) with the keyword options that are not None applied (see
    `segmentOptions`; `modelPostprocessing`: the package's own clean-up); `statisticsPath` / `uncertaintyPath`:
    also write per-segment statistics / the uncertainty map there; `python`: the child's interpreter (default
    `worker.python_executable()`). Returns the argv list, flags as `SegmentOptions.to_argv` writes them.
    """
    options = segmentOptions(options, device=device, fast=fast, tta=tta, roiBox=roiBox, keepLargest=keepLargest,
                             fillHoles=fillHoles, batchSize=batchSize, modelPostprocessing=modelPostprocessing)
    command = [python or python_executable(), "-m", "meddinov3.cli", "segment", str(inputPath),
               "-o", str(outputPath), "--model", str(model), *options.to_argv(), "--json-progress", "--overwrite"]
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
        """The module's saved panel settings (`parameters.MedDINOv3SegmentParameterNode`)."""
        return MedDINOv3SegmentParameterNode(super().getParameterNode())

    # -- models ---------------------------------------------------------------------------------

    def availableModels(self, segmentableOnly: bool = True) -> list[dict]:
        """Models to offer: dicts with name, reference (pass as `model`), source, classes, license, description."""
        return models.listModels(segmentableOnly=segmentableOnly)

    def modelInfo(self, reference: str) -> dict:
        """What the model panel shows for `reference` (a listed reference, a path or a manifest name): the
        `availableModels` row plus `path`; no weights are read. MedDINOv3SegmentError for an unknown model."""
        return models.modelInfo(reference)

    def registerModel(self, path) -> str:
        """Add a trained model folder to the list (validated first); returns its reference."""
        return models.registerModel(path)

    def importModel(self, path, name: str | None = None) -> str:
        """Import a downloaded weights file or model folder (offline machines); returns its reference."""
        return models.importModel(path, name)

    # -- segmentation ---------------------------------------------------------------------------

    def segment(self, inputVolumeNode, model: str, outputSegmentationNode=None, device: str | None = None,
                fast: bool | None = None, tta: bool | None = None, roiNode=None, keepLargest: bool | None = None,
                fillHoles: bool | None = None, batchSize: int | str | None = None, onProgress: Callable | None = None,
                modelPostprocessing: bool | None = None, uncertainty: bool = False,
                options: SegmentOptions | None = None):
        """Segment and wait (processing Slicer's events). Arguments as `segmentAsync`'s.

        Returns the segmentation node; raises MedDINOv3SegmentError (MedDINOv3SegmentCancelled when cancelled)."""
        options = segmentOptions(options, device=device, fast=fast, tta=tta, keepLargest=keepLargest,
                                 fillHoles=fillHoles, batchSize=batchSize, modelPostprocessing=modelPostprocessing)
        task = self.segmentAsync(inputVolumeNode, model, outputSegmentationNode, roiNode=roiNode,
                                 onProgress=onProgress, uncertainty=uncertainty, options=options)
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

    def segmentAsync(self, inputVolumeNode, model: str, outputSegmentationNode=None, device: str | None = None,
                     fast: bool | None = None, tta: bool | None = None, roiNode=None,
                     keepLargest: bool | None = None, fillHoles: bool | None = None,
                     batchSize: int | str | None = None, onProgress: Callable | None = None,
                     onFinished: Callable | None = None, modelPostprocessing: bool | None = None,
                     uncertainty: bool = False, options: SegmentOptions | None = None) -> SegmentTask:
        """Start segmenting; returns a SegmentTask at once (call its `poll()` regularly, or `cancel()`).

        Args:
            inputVolumeNode: a scalar volume node (not a label map) with image data.
            model: a model reference as `availableModels()` lists it (name, path or hf: reference).
            outputSegmentationNode: None creates a new node on success; a node has its segments replaced. Either
                way the node gets the input volume's parent transform and its grid as reference geometry.
            options: every segmentation option (`meddinov3.options.SegmentOptions`: device, fast, tta, folds,
                batch size, post-processing, ...); default: the defaults. The keyword options override single
                fields when not None: `device` ("auto", "cpu", "cuda:N", "mps"), `fast`, `tta`, `keepLargest`,
                `fillHoles`, `batchSize` (0 or "auto": sized from the free memory), `modelPostprocessing` (the
                clean-up steps the model package declares; False: the raw labels).
            roiNode: a markups ROI node: only the voxels inside it are segmented (overrides `options.roi`).
            onProgress: called with each progress event (dict) of the child, inside `poll()`.
            onFinished: called as `onFinished(node, error)` when the task ends (node None on failure).
            uncertainty: also an uncertainty volume (normalised entropy, percent) and the slices ordered from the
                least confident; per-segment statistics are always computed (`task.statisticsTableNode`).

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
        options = segmentOptions(options, device=device, fast=fast, tta=tta, keepLargest=keepLargest,
                                 fillHoles=fillHoles, batchSize=batchSize, modelPostprocessing=modelPostprocessing,
                                 roiBox=nodes.roiToVoxelBox(roiNode, inputVolumeNode) if roiNode is not None else None)

        workDir = Path(tempfile.mkdtemp(prefix="meddinov3-segment-"))
        try:
            inputPath = nodes.exportVolume(inputVolumeNode, workDir / "input.nrrd")
            outputPath = workDir / "output.seg.nrrd"
            command = buildCommand(inputPath, outputPath, model, options=options, python=self.pythonExecutable,
                                   statisticsPath=workDir / "statistics.json",
                                   uncertaintyPath=workDir / "uncertainty.nrrd" if uncertainty else None)
            logging.info("MedDINOv3: %s", " ".join(command))
            process = ChildProcess(command, cwd=str(workDir))
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
        """Cancel every running task of this Logic: segmentations and completions, started by the panel or from the
        Python console. The Widget calls it on module cleanup and scene close, so no child outlives them."""
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
