"""MedDINOv3 Train: fine-tune or pretrain MedDINOv3 models from Slicer (module, Widget, Test).

The work happens in `MedDINOv3TrainLib` (dataset export, detached training jobs, chart nodes, the parameter node
in `parameters`); this file is glue: module metadata, a thin Widget polling the job's files with a QTimer, and the
self-test.
Training runs in a separate process that survives closing the module or Slicer; the Jobs table reattaches.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MedDINOv3SegmentLib.dependencies import DependenciesSection, fillDeviceSelector
from MedDINOv3SegmentLib.errors import MedDINOv3SegmentError
from MedDINOv3TrainLib.jobs import FINAL_STATES, TrainJobError
from MedDINOv3TrainLib.logic import MedDINOv3TrainLogic  # noqa: F401 - re-exported for the console
from MedDINOv3TrainLib.parameters import MODES, SOURCES, MedDINOv3TrainParameterNode  # noqa: F401 - re-exported

NO_BASE = "(none: train from scratch)"


class MedDINOv3Train(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDINOv3 Train")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["MedDINOv3Segment"]  # models, child process helpers, Segment with model
        self.parent.contributors = ["MedDINOv3 extension contributors"]
        self.parent.helpText = _(
            "Fine-tune a MedDINOv3 segmentation model on volumes and segmentations of the scene (or a dataset "
            "folder), or pretrain a backbone on unlabelled volumes. Jobs run in a separate process that keeps "
            "running when the module or Slicer is closed; Stop saves a checkpoint that Resume continues. "
            "Finished models appear in the MedDINOv3 Segment module.")
        self.parent.acknowledgementText = _(
            "MedDINOv3: Li et al., How to adapt vision foundation models for medical image segmentation? "
            "arXiv 2509.02379. DINOv3 by Meta AI.")


class MedDINOv3TrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: reads the parameter node, calls the Logic, polls the job's files once a second."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._plotWidget = None
        self._ticks = 0
        self._baseReferences: dict[str, str] = {}
        self._segmentTask = None
        self._dependencies = None

    # -- lifecycle --------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDINOv3Train.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDINOv3TrainLogic()
        # First thing a user of a fresh Slicer sees: what is missing, and the Install button.
        self._dependencies = DependenciesSection(self.ui.dependenciesFrame, self.ui.dependenciesLabel, uiWidget,
                                                 onInstalled=self._onDependenciesInstalled)
        self.ui.installDependenciesButton.clicked.connect(lambda checked=False: self._dependencies.install())
        self._dependencies.refresh()

        self._populateDevices()
        self._populateBaseModels()
        self.ui.pairsTable.setColumnCount(2)
        self.ui.pairsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.jobsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.jobsTable.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.ui.jobsTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.logText.setReadOnly(True)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.setValue(0)

        self._plotWidget = slicer.qMRMLPlotWidget()
        self._plotWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.plotWidgetFrame.layout().addWidget(self._plotWidget)

        self.ui.dataSourceSelector.currentIndexChanged.connect(self._updateDataSourceVisibility)
        self.ui.modeSelector.currentIndexChanged.connect(self._updateButtons)
        self.ui.deviceSelector.currentIndexChanged.connect(self._onDeviceChanged)
        self.ui.addPairButton.clicked.connect(lambda: self._addPairRow())
        self.ui.removePairButton.clicked.connect(self._removeSelectedPairs)
        self.ui.startButton.clicked.connect(self.onStart)
        self.ui.stopButton.clicked.connect(self.onStop)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.jobsTable.itemSelectionChanged.connect(self._onJobSelected)
        self.ui.openFolderButton.clicked.connect(self.onOpenFolder)
        self.ui.resumeJobButton.clicked.connect(self.onResume)
        self.ui.deleteJobButton.clicked.connect(self.onDeleteJob)
        self.ui.segmentWithModelButton.clicked.connect(self.onSegmentCurrentVolume)
        self.ui.dataFolderPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("dataFolder", path))
        self.ui.outputFolderPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("outputFolder", path))
        self.ui.baseModelSelector.currentIndexChanged.connect(
            lambda index: self._setParameter("baseModel", self.ui.baseModelSelector.currentText))
        self.ui.deviceSelector.currentIndexChanged.connect(
            lambda index: self._setParameter("device", self.ui.deviceSelector.currentText))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._poll)

        self.initializeParameterNode()
        self._addPairRow()
        self._updateDataSourceVisibility()
        self._refreshJobs()

    def enter(self) -> None:
        self._dependencies.refresh()  # another module may have installed packages meanwhile
        self.initializeParameterNode()
        self._refreshJobs()
        self._timer.start()

    def exit(self) -> None:
        if self._segmentTask is None:  # a segmentation started here is polled (and its result loaded) until it ends
            self._timer.stop()  # the job keeps running; the Jobs table reattaches next time
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._segmentTask is not None:
            self._segmentTask.cancel()
        self.removeObservers()
        self.exit()

    def onSceneStartClose(self, caller, event) -> None:
        if self._segmentTask is not None:
            self._segmentTask.cancel()  # its volume is about to go
        if self._parameterNode and self._parameterNodeGuiTag is not None:  # the first tag of a wrapper is 0
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode, self._parameterNodeGuiTag = None, None
        self._plotWidget.setMRMLPlotViewNode(None)  # removed with the scene; _poll makes a new one

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from MedDINOv3SegmentLib.parameters import connectGui

        node = self.logic.getParameterNode()
        if self._parameterNode and self._parameterNodeGuiTag is not None:  # the first tag of a wrapper is 0
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = node
        self._parameterNodeGuiTag = connectGui(node, self.ui)
        # Widgets not bound by connectGui (see MedDINOv3TrainLib.parameters): parameter node -> widget.
        self.ui.dataFolderPathLineEdit.currentPath = node.dataFolder
        self.ui.outputFolderPathLineEdit.currentPath = node.outputFolder
        for selector, text in ((self.ui.baseModelSelector, node.baseModel), (self.ui.deviceSelector, node.device)):
            index = selector.findText(text)
            if index >= 0:
                selector.setCurrentIndex(index)

    def _setParameter(self, name: str, value: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, value)

    # -- choices ----------------------------------------------------------------------------------

    def _populateDevices(self) -> None:
        wasBlocked = self.ui.deviceSelector.blockSignals(True)  # refilling must not overwrite the saved choice
        self._deviceValues = fillDeviceSelector(self.ui.deviceSelector)
        self.ui.deviceSelector.blockSignals(wasBlocked)
        if self._parameterNode:
            index = self.ui.deviceSelector.findText(self._parameterNode.device)
            self.ui.deviceSelector.setCurrentIndex(max(index, 0))

    def _onDependenciesInstalled(self) -> None:
        """After Install: torch may see GPUs now, and the base model list may have been empty."""
        self._populateDevices()
        self._populateBaseModels()

    def _device(self) -> str:
        return self._deviceValues.get(self.ui.deviceSelector.currentText, "auto")

    def _onDeviceChanged(self) -> None:
        if self.ui.deviceSelector.currentText == "CPU":
            self.ui.statusLabel.text = _("Warning: training on the CPU is very slow; use it only for small tests.")

    def _populateBaseModels(self) -> None:
        self._baseReferences = {NO_BASE: ""}
        try:
            from MedDINOv3SegmentLib.models import listModels

            for row in listModels(segmentableOnly=False):
                label = f"{row['name']} ({row['source']}, {row['kind']})"
                self._baseReferences[label] = row["reference"]
        except Exception as e:  # noqa: BLE001 - the list is optional; training from scratch still works
            logging.warning("MedDINOv3 Train: cannot list base models: %s", e)
        self.ui.baseModelSelector.clear()
        for label in self._baseReferences:
            self.ui.baseModelSelector.addItem(label)

    # -- data -------------------------------------------------------------------------------------

    def _updateDataSourceVisibility(self) -> None:
        scene = self.ui.dataSourceSelector.currentIndex == 0
        for widget in (self.ui.pairsTable, self.ui.addPairButton, self.ui.removePairButton, self.ui.classPreviewText):
            widget.setVisible(scene)
        self.ui.dataFolderPathLineEdit.setVisible(not scene)
        if self.ui.dataSourceSelector.currentIndex == 2 and self.ui.modeSelector.currentIndex == 0:
            self.ui.modeSelector.currentIndex = 1  # unlabelled volumes: pretraining
        self._updateClassPreview()

    def _addPairRow(self, volumeNode=None, segmentationNode=None) -> None:
        row = self.ui.pairsTable.rowCount
        self.ui.pairsTable.insertRow(row)
        for column, (className, node) in enumerate((("vtkMRMLScalarVolumeNode", volumeNode),
                                                     ("vtkMRMLSegmentationNode", segmentationNode))):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = [className]
            if column == 0:
                combo.showChildNodeTypes = False  # no label map volumes
            combo.noneEnabled = True
            combo.addEnabled = False
            combo.removeEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            combo.setCurrentNode(node)
            combo.currentNodeChanged.connect(lambda *args: self._updateClassPreview())
            self.ui.pairsTable.setCellWidget(row, column, combo)
        self._updateClassPreview()

    def _removeSelectedPairs(self) -> None:
        rows = sorted({index.row() for index in self.ui.pairsTable.selectedIndexes()}, reverse=True)
        for row in rows or [self.ui.pairsTable.rowCount - 1]:
            if row >= 0:
                self.ui.pairsTable.removeRow(row)
        self._updateClassPreview()

    def _pairs(self) -> list:
        pairs = []
        for row in range(self.ui.pairsTable.rowCount):
            volumeNode = self.ui.pairsTable.cellWidget(row, 0).currentNode()
            segmentationNode = self.ui.pairsTable.cellWidget(row, 1).currentNode()
            if volumeNode is not None or segmentationNode is not None:
                pairs.append((volumeNode, segmentationNode))
        return pairs

    def _updateClassPreview(self) -> None:
        if self.ui.dataSourceSelector.currentIndex != 0:
            return
        try:
            preview = self.logic.classPreview(self._pairs())
        except Exception as e:  # noqa: BLE001 - shown to the user as it is
            self.ui.classPreviewText.setPlainText(str(e))
            return
        lines = [f"{name} (label {preview['labels'][name]}): {len(cases)} of {len(preview['cases'])} cases"
                 for name, cases in preview["classes"].items()]
        html = "<br>".join(lines)
        if preview["warnings"]:
            html += "<br><span style='color:#c60'>" + "<br>".join(preview["warnings"]) + "</span>"
        self.ui.classPreviewText.setHtml(html)

    # -- jobs -------------------------------------------------------------------------------------

    def _options(self, mode: str, stage) -> dict:
        p = self._parameterNode
        options = {"device": self._device(), "batch_size": int(p.batchSize)}
        if mode == "finetune":
            options.update(epochs=int(p.epochs), steps_per_epoch=int(p.steps), lr_decoder=float(p.learningRate),
                           lr_backbone=float(p.learningRate) / 10.0)
        else:  # pretraining counts optimiser steps
            options.update(stage=stage, steps=int(p.epochs) * int(p.steps))
        text = self.ui.advancedJsonEdit.toPlainText().strip()
        if text:
            extra = json.loads(text)
            if not isinstance(extra, dict):
                raise ValueError(_("Advanced settings must be a JSON object."))
            options.update(extra)
        return options

    def onStart(self) -> None:
        if not self._dependencies.ensure():
            self.ui.statusLabel.text = _("Missing Python packages (see the top of the panel): the job was not started.")
            return
        p = self._parameterNode
        mode, stage = MODES.get(self.ui.modeSelector.currentText, ("finetune", None))
        try:
            if self.ui.dataSourceSelector.currentIndex == 0:
                if mode != "finetune":
                    raise ValueError(_("Pretraining needs a folder of volumes."))
                data = self._pairs()
            else:
                data = p.dataFolder
            base = self._baseReferences.get(self.ui.baseModelSelector.currentText, "") or None
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:  # exporting scene pairs takes a moment; training itself runs in its own process
                self._job = self.logic.startJob(mode, data, p.outputFolder or None, base=base,
                                                size=self.ui.sizeSelector.currentText, options=self._options(mode, stage))
            finally:
                qt.QApplication.restoreOverrideCursor()
        except (ValueError, TrainJobError) as e:
            slicer.util.errorDisplay(str(e))
            return
        except Exception as e:  # noqa: BLE001 - shown with details, the GUI stays usable
            logging.exception("MedDINOv3 Train: starting the job failed")
            slicer.util.errorDisplay(_("Failed to start the job: {error}").format(error=e))
            return
        self.ui.logText.clear()
        self._refreshJobs()
        self._timer.start()
        self._poll()

    def onStop(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = _("Stopping (saving a checkpoint)...")
            with slicer.util.tryWithErrorDisplay(_("Failed to stop the job.")):
                self._job.stop(timeout=0)  # sends the request only; the timer follows the job until it stopped
            self._timer.start()

    def onResume(self) -> None:
        job = self._selectedJob() or self._job
        if job is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the job."), waitCursor=True):
            self._job = self.logic.resumeJob(job)
            self._timer.start()
            self._poll()

    def _selectedJob(self):
        rows = self.ui.jobsTable.selectionModel().selectedRows() if self.ui.jobsTable.selectionModel() else []
        if not rows:
            return None
        item = self.ui.jobsTable.item(rows[0].row(), 4)
        return self.logic.job(item.text()) if item is not None else None

    def _onJobSelected(self) -> None:
        job = self._selectedJob()
        if job is not None:
            self._job = job
            self.ui.logText.clear()
            self._timer.start()  # _poll stops it again if this job has already ended
            self._poll()

    def onOpenFolder(self) -> None:
        job = self._selectedJob() or self._job
        if job is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(job.runDir)))

    def onDeleteJob(self) -> None:
        job = self._selectedJob()
        if job is None or not slicer.util.confirmOkCancelDisplay(
                _("Delete the job folder {path} (checkpoints, logs and model)?").format(path=job.runDir)):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to delete the job."), waitCursor=True):
            self.logic.removePlotNodes(job)
            job.delete()
            if self._job == job:
                self._job = None
        self._refreshJobs()

    def onSegmentCurrentVolume(self) -> None:
        """Run MedDINOv3 Segment on the volume shown in the slice views with the selected job's model."""
        job = self._selectedJob() or self._job
        if job is None:
            return
        try:
            reference = self.logic.registerJobModel(job)
        except (MedDINOv3SegmentError, OSError, ValueError) as e:  # e.g. the model folder is damaged
            slicer.util.errorDisplay(_("The model of {name} cannot be used: {error}").format(name=job.name, error=e))
            return
        if not reference:
            slicer.util.errorDisplay(_("This job has no finished model yet."))
            return
        volumeId = slicer.app.applicationLogic().GetSelectionNode().GetActiveVolumeID()
        volumeNode = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        if volumeNode is None:
            slicer.util.errorDisplay(_("Show a volume in the slice views first."))
            return
        from MedDINOv3SegmentLib.logic import MedDINOv3SegmentLogic

        def finished(node, error):
            self._segmentTask = None
            if not self.parent.isEntered:
                self._timer.stop()  # exit() left it running for this task
            self.ui.statusLabel.text = str(error) if error else _("Segmented {name}.").format(name=volumeNode.GetName())

        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            self._segmentTask = MedDINOv3SegmentLogic().segmentAsync(volumeNode, reference, device=self._device(),
                                                                     onFinished=finished)
            self.ui.statusLabel.text = _("Segmenting {name}...").format(name=volumeNode.GetName())
            self._timer.start()

    # -- live view --------------------------------------------------------------------------------

    def _refreshJobs(self) -> None:
        jobs = self.logic.jobs()
        table = self.ui.jobsTable
        table.setRowCount(len(jobs))
        for row, job in enumerate(jobs):
            status = job.status()
            progress = f"{status.get('step', 0)}/{status.get('total') or '?'}"
            state = status["state"] or "?"
            if state in ("failed", "killed") and status.get("error"):
                state = f"{state}: {status['error']}"
            for column, text in enumerate((job.name, job.mode, state, progress, str(job.runDir))):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(text)
                table.setItem(row, column, item)

    def _poll(self) -> None:
        self._ticks += 1
        if self._segmentTask is not None:
            self._segmentTask.poll()
        if self._ticks % 5 == 0:
            self._refreshJobs()
        job = self._job
        if job is None:
            self._updateButtons()
            return
        status = job.status()
        state, step, total = status["state"], status.get("step") or 0, status.get("total") or 0
        self.ui.progressBar.setValue(int(1000 * step / total) if total else 0)
        eta = status.get("eta_s")
        etaText = f", {int(eta) // 3600}h{int(eta) % 3600 // 60:02d}m left" if eta and state == "running" else ""
        self.ui.statusLabel.text = f"{job.name}: {state}, step {step}/{total or '?'}{etaText}"
        if state in ("failed", "killed") and status.get("error"):
            self.ui.statusLabel.text += f"\n{status['error']}"
        metrics = status.get("metrics") or {}
        parts = []
        if metrics.get("loss") is not None:
            parts.append(f"loss {metrics['loss']:.4f}")
        for name, value in (metrics.get("validation_dice") or {}).items():
            parts.append(f"Dice {name} {value:.3f}")
        self.ui.metricsLabel.text = ", ".join(parts)
        memory = metrics.get("gpu_memory_gb")  # peak the training process reports: no GPU query on this thread
        self.ui.gpuMemoryLabel.text = f"GPU memory (peak) {memory:.1f} GB" if memory else ""
        logText = "\n".join(job.logTail(200))
        if logText != self.ui.logText.toPlainText():  # unchanged: keep the reader's scroll position and selection
            scrollBar = self.ui.logText.verticalScrollBar()
            following = scrollBar.value >= scrollBar.maximum  # at the end: keep following new lines
            self.ui.logText.setPlainText(logText)
            if following:
                scrollBar.setValue(scrollBar.maximum)
        chart = self.logic.updatePlotNodes(job)
        if self._plotWidget.mrmlPlotViewNode() is None:
            viewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "MedDINOv3 Train plot view")
            self._plotWidget.setMRMLPlotViewNode(viewNode)
        self._plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(chart.GetID())
        if state in FINAL_STATES and self._segmentTask is None:
            self._timer.stop()
            self._refreshJobs()
        self._updateButtons()

    def _updateButtons(self) -> None:
        running = self._job is not None and self._job.isProcessRunning()
        self.ui.startButton.enabled = not running
        self.ui.stopButton.enabled = running
        self.ui.resumeButton.enabled = self._job is not None and not running
        selected = self._selectedJob() is not None
        for button in (self.ui.openFolderButton, self.ui.resumeJobButton, self.ui.deleteJobButton,
                       self.ui.segmentWithModelButton):
            button.enabled = selected


class MedDINOv3TrainTest(ScriptedLoadableModuleTest):
    """Inside Slicer: export a small scene to a dataset (no training; the pytest suite runs real jobs)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_export_dataset()

    def test_export_dataset(self):
        import tempfile

        import numpy as np

        volumeNode = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), dtype=np.int16), name="case")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("liver", "Liver")
        mask = np.zeros((4, 8, 8), dtype=np.uint8)
        mask[1:3, 2:6, 2:6] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId, volumeNode)
        logic = MedDINOv3TrainLogic()
        self.assertEqual(logic.classPreview([(volumeNode, segmentationNode)])["labels"], {"background": 0, "Liver": 1})
        with tempfile.TemporaryDirectory() as folder:
            out = Path(logic.exportDataset([(volumeNode, segmentationNode)], os.path.join(folder, "ds")))
            self.assertTrue((out / "labelsTr" / "case.nii.gz").is_file())
            self.assertTrue((out / "imagesTr" / "case_0000.nii.gz").is_file())
        self.delayDisplay("MedDINOv3 Train export test passed")
