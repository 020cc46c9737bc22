"""*Complete from painted slices*: the Logic of MedDINOv3Segment's completion section (no widgets).

The chosen segments of a segmentation being painted in the Segment Editor are exported as one label map on the
volume's grid (segment i -> label i + 1), `meddinov3 complete` runs in the child process (progress, Cancel), and
the result replaces those segments: painted slices come back voxel for voxel, unpainted ones completed. The caller
passes `beforeModify` (the Widget: the Segment Editor's `saveStateForUndo`), called once right before the first
segment changes, so the whole completion is one undoable step. The child caches backbone features per volume
(content hash), so a second Complete after corrections is faster.

    task = completeAsync(logic, volumeNode, segmentationNode, ["Segment_1"], model="scratch")
    while task.poll(): ...            # the Widget uses a QTimer
    task.leastConfident               # {"slice", "point" (LPS mm)}: where a correction helps most
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from . import nodes
from .errors import MedDINOv3SegmentError
from .logic import SegmentTask
from .worker import ChildProcess, python_executable


def buildCompleteCommand(imagePath, labelsPath, outputPath, model: str = "", device: str = "auto",
                         timeBudget: float | None = None, extrapolate: bool = False,
                         python: str | None = None) -> list[str]:
    """The `meddinov3 complete` command line the child runs (`model` "": the CLI's default choice)."""
    command = [python or python_executable(), "-m", "meddinov3.cli", "complete", str(imagePath),
               "--labels", str(labelsPath), "-o", str(outputPath), "--device", str(device or "auto"),
               "--json-progress", "--overwrite"]
    if model:
        command += ["--model", str(model)]
    if timeBudget:
        command += ["--time-budget", str(float(timeBudget))]
    if extrapolate:
        command.append("--extrapolate")
    return command


def paintedLabels(segmentationNode, segmentIds: list[str], volumeNode) -> np.ndarray:
    """(k, j, i) label map on the volume's grid: segment `segmentIds[i]` -> i + 1 (later segments win overlaps)."""
    import slicer

    labels = None
    for number, segmentId in enumerate(segmentIds, start=1):
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise MedDINOv3SegmentError(f"The segmentation has no segment '{segmentId}'.")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        if labels is None:
            labels = np.zeros(mask.shape, dtype=np.uint8 if len(segmentIds) < 256 else np.uint16)
        labels[mask != 0] = number
    return labels


def writeLabelsLike(labels: np.ndarray, referencePath: Path, path: Path) -> Path:
    """Write `labels` (k, j, i) with the geometry of the exported volume file `referencePath`."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(referencePath))
    reader.ReadImageInformation()
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


class CompleteTask(SegmentTask):
    """A running completion: `poll()`, `cancel()`, `wait()`, states and callbacks as SegmentTask's.

    `result`: the segmentation node, its chosen segments replaced; `leastConfident`: from the child's `finished`
    event (None before, or when nothing was completed)."""

    def __init__(self, logic, workDir, process, inputPath, outputPath, volumeNode, segmentationNode,
                 segmentIds: list[str], beforeModify: Callable | None, onProgress, onFinished):
        super().__init__(logic, workDir, process, inputPath, outputPath, volumeNode, segmentationNode, onProgress,
                         onFinished)
        self.segmentIds = list(segmentIds)
        self.beforeModify = beforeModify
        self.leastConfident: dict | None = None

    def _handleEvent(self, event: dict) -> None:
        if event.get("event") == "finished":
            self.leastConfident = event.get("least_confident")
        super()._handleEvent(event)

    def _loadResult(self):
        import slicer

        if not Path(self.outputPath).is_file():
            raise MedDINOv3SegmentError("The completion process finished without writing a result.")
        voxels, fileIjkToRas, _ = nodes.readImageFile(self.outputPath)  # `complete` writes a plain label map
        labels = nodes.arrayOnVolumeGrid(voxels, fileIjkToRas, self.inputVolumeNode)
        if self.beforeModify is not None:
            self.beforeModify()
        segmentationNode = self.outputSegmentationNode
        wasModifying = segmentationNode.StartModify()
        try:
            for number, segmentId in enumerate(self.segmentIds, start=1):
                mask = (labels == number).astype(np.uint8)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId,
                                                                 self.inputVolumeNode)
        finally:
            segmentationNode.EndModify(wasModifying)
        return segmentationNode


def completeAsync(logic, volumeNode, segmentationNode, segmentIds: list[str], model: str = "", device: str = "auto",
                  timeBudget: float | None = None, extrapolate: bool = False, beforeModify: Callable | None = None,
                  onProgress: Callable | None = None, onFinished: Callable | None = None) -> CompleteTask:
    """Start completing `segmentIds` of `segmentationNode` from their painted slices on `volumeNode`.

    `logic`: the MedDINOv3SegmentLogic (tracks the task, gives the child's Python). Input problems raise
    MedDINOv3SegmentError here; the child's errors reach `onFinished(None, error)`. The scene changes only on success.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise MedDINOv3SegmentError("No volume with image data selected.")
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise MedDINOv3SegmentError("No segmentation selected.")
    if not segmentIds:
        raise MedDINOv3SegmentError("No segment selected to complete.")
    workDir = Path(tempfile.mkdtemp(prefix="meddinov3-complete-"))
    try:
        inputPath = nodes.exportVolume(volumeNode, workDir / "input.nrrd")
        labels = paintedLabels(segmentationNode, segmentIds, volumeNode)
        if not labels.any():
            raise MedDINOv3SegmentError("The selected segments are empty: paint them on a few slices first.")
        labelsPath = writeLabelsLike(labels, inputPath, workDir / "painted.nrrd")
        outputPath = workDir / "completed.nrrd"
        command = buildCompleteCommand(inputPath, labelsPath, outputPath, model, device, timeBudget, extrapolate,
                                       python=logic.pythonExecutable)
        logging.info("MedDINOv3: %s", " ".join(command))
        process = ChildProcess(command, cwd=str(workDir))
    except BaseException:
        shutil.rmtree(workDir, ignore_errors=True)
        raise
    task = CompleteTask(logic, workDir, process, inputPath, outputPath, volumeNode, segmentationNode, segmentIds,
                        beforeModify, onProgress, onFinished)
    logic._tasks.add(task)
    return task


def lpsToRas(point) -> list[float]:
    """The child reports LPS millimetres; Slicer's views jump to RAS."""
    return [-float(point[0]), -float(point[1]), float(point[2])]
