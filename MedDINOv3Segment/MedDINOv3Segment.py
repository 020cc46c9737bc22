"""MedDINOv3 Segment: segment CT volumes with MedDINOv3 models (module, Widget, Logic, Test).

The work happens in `MedDINOv3SegmentLib` (Logic, child process, node conversions, model listing); this file
is glue: module metadata, a thin Widget, and the self-test Slicer runs with ctest (the parameter node is in
`MedDINOv3SegmentLib.parameters`).
"""

from __future__ import annotations

import os
import time

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget

from MedDINOv3SegmentLib.dependencies import DependenciesSection, fillDeviceSelector, findProblems
from MedDINOv3SegmentLib.errors import MedDINOv3SegmentCancelled, MedDINOv3SegmentError
from MedDINOv3SegmentLib.logic import MedDINOv3SegmentLogic
from MedDINOv3SegmentLib.parameters import connectGui

from slicer.util import VTKObservationMixin


class MedDINOv3Segment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDINOv3 Segment")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDINOv3 extension contributors"]
        self.parent.helpText = _(
            "Segment CT volumes with MedDINOv3 models (DINOv3 vision transformers adapted to CT). "
            "Pick a volume and a model, press Segment; the result is a segmentation you can refine in "
            "the Segment Editor. Models: the shipped demo model, downloaded, imported or trained ones.")
        self.parent.acknowledgementText = _(
            "MedDINOv3: Li et al., How to adapt vision foundation models for medical image segmentation? "
            "arXiv 2509.02379. DINOv3 by Meta AI.")


class MedDINOv3SegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: the parameter node drives the Logic; long work runs in the Logic's child process."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._timer = None
        self._complete = None  # the Complete-from-painted-slices section
        self._modelReferences: dict[str, str] = {}
        self._deviceValues: dict[str, str] = {}
        self._dependencies = None
        self._unsureSlices: list = []  # (index, confidence, RAS) of the last run, least confident first
        self._unsureIndex = -1

    # -- lifecycle --------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDINOv3Segment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDINOv3SegmentLogic()
        # First thing a user of a fresh Slicer sees: what is missing, and the Install button.
        self._dependencies = DependenciesSection(self.ui.dependenciesFrame, self.ui.dependenciesLabel, uiWidget,
                                                 onInstalled=self._onDependenciesInstalled)
        self.ui.installDependenciesButton.clicked.connect(lambda checked=False: self._dependencies.install())
        self._dependencies.refresh()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._pollTask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._fillDevices()
        self._fillModels()
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.refreshModelsButton.clicked.connect(self._fillModels)
        self.ui.modelSelector.currentIndexChanged.connect(lambda index: self._updateModelInfo())
        self.ui.modelSelector.currentIndexChanged.connect(lambda index: self._onSelectorChanged("model"))
        self.ui.deviceSelector.currentIndexChanged.connect(lambda index: self._onSelectorChanged("device"))
        self._setUpImportMenu()
        self.ui.show3DButton.clicked.connect(self.onShow3D)
        self.ui.segmentEditorButton.clicked.connect(self.onSegmentEditor)
        self.ui.nextUnsureSliceButton.clicked.connect(self.onNextUnsureSlice)
        self.ui.progressBar.setVisible(False)
        from MedDINOv3SegmentLib.completeSection import CompleteSection

        self._complete = CompleteSection(self.layout, self.logic,
                                         lambda: self._deviceValues.get(self._parameterNode.device, "auto"),
                                         self._dependencies.ensure)
        self.layout.addStretch(1)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancelAll()  # the panel's segmentation and completion, and tasks started from the console
        if self._timer is not None:
            self._timer.stop()
        self._disconnectParameterNode()  # before removeObservers(): removing its observer again only warns
        self.removeObservers()

    def enter(self) -> None:
        self._dependencies.refresh()  # another module may have installed packages meanwhile
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancelAll()  # their results could go nowhere
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = volume

    def _disconnectParameterNode(self) -> None:
        """Idempotent: exit() disconnects and the next enter() disconnects again before connecting (removing an
        observation twice would print a VTKObservationMixin warning)."""
        if not self._parameterNode:
            return
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def setParameterNode(self, parameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = connectGui(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateSelectorsFromParameterNode()
        self._updateButtons()

    def _selectors(self) -> dict:
        """Parameter name -> combo box filled at run time. connectGui binds a QComboBox to a str only through a
        fixed `Choice` list, so these are not bound in the .ui but kept in step with the parameter node here."""
        return {"model": self.ui.modelSelector, "device": self.ui.deviceSelector}

    def _onSelectorChanged(self, name: str) -> None:
        text = self._selectors()[name].currentText
        if self._parameterNode and text:
            setattr(self._parameterNode, name, text)

    def _updateSelectorsFromParameterNode(self) -> None:
        if not self._parameterNode:
            return
        for name, selector in self._selectors().items():
            value = getattr(self._parameterNode, name)
            index = selector.findText(value)
            if index >= 0:
                selector.setCurrentIndex(index)
            elif selector.currentText and selector.currentText != value:
                setattr(self._parameterNode, name, selector.currentText)  # the saved choice is not offered

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._task is not None
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        ready = bool(p and p.inputVolume and self.modelReference())
        self.ui.segmentButton.enabled = running or ready
        self.ui.segmentButton.toolTip = _("Stop the running segmentation") if running else (
            _("Segment the input volume") if ready else _("Select an input volume and a model"))
        hasOutput = bool(p and p.outputSegmentation)
        self.ui.show3DButton.enabled = hasOutput and not running
        self.ui.segmentEditorButton.enabled = hasOutput and not running
        self.ui.nextUnsureSliceButton.enabled = bool(self._unsureSlices) and not running

    # -- models and devices ----------------------------------------------------------------------

    def modelReference(self) -> str:
        """The Logic's model reference for the selector's current text."""
        text = self._parameterNode.model if self._parameterNode else self.ui.modelSelector.currentText
        return self._modelReferences.get(text, "")

    def _fillModels(self) -> None:
        current = self._parameterNode.model if self._parameterNode else ""
        try:
            rows = self.logic.availableModels()
        except MedDINOv3SegmentError as e:
            rows = []
            self.ui.statusLabel.text = str(e)
        self._modelReferences = {}
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for row in rows:
            text = f"{row['name']} ({row['source']})"
            self._modelReferences[text] = row["reference"]
            self.ui.modelSelector.addItem(text)
        index = self.ui.modelSelector.findText(current) if current else 0
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.modelSelector.blockSignals(wasBlocked)
        if self._parameterNode and self.ui.modelSelector.currentText:
            self._parameterNode.model = self.ui.modelSelector.currentText
        self._updateModelInfo()
        self._updateButtons()

    def _updateModelInfo(self) -> None:
        reference = self._modelReferences.get(self.ui.modelSelector.currentText, "")
        if not reference:
            self.ui.modelInfoText.setHtml(_("No model. Import one, or train one with the MedDINOv3 Train module."))
            return
        try:
            info = self.logic.modelInfo(reference)
        except MedDINOv3SegmentError as e:
            self.ui.modelInfoText.setPlainText(str(e))
            return
        import html

        rows = [(_("Classes"), ", ".join(info["classes"]) or _("(unknown until loaded)")),
                (_("Source"), info["source"]), (_("Licence"), info["license"] or _("not stated")),
                (_("Description"), info["description"])]
        self.ui.modelInfoText.setHtml("".join(f"<b>{html.escape(k)}:</b> {html.escape(str(v))}<br>" for k, v in rows if v))

    def _fillDevices(self) -> None:
        wasBlocked = self.ui.deviceSelector.blockSignals(True)  # refilling must not overwrite the saved choice
        self._deviceValues = fillDeviceSelector(self.ui.deviceSelector)
        self.ui.deviceSelector.blockSignals(wasBlocked)
        if self._parameterNode:
            self._updateSelectorsFromParameterNode()  # the saved device, when it is offered (again)

    def _onDependenciesInstalled(self) -> None:
        """After Install: torch may see GPUs now, and the model list may have been empty."""
        self._fillDevices()
        self._fillModels()

    def _setUpImportMenu(self) -> None:
        menu = qt.QMenu(self.ui.importModelButton)
        menu.addAction(_("Import model file...")).triggered.connect(lambda checked=False: self.onImportModel(folder=False))
        menu.addAction(_("Import model folder...")).triggered.connect(lambda checked=False: self.onImportModel(folder=True))
        self.ui.importModelButton.setMenu(menu)
        self.ui.importModelButton.popupMode = qt.QToolButton.InstantPopup
        self._importMenu = menu

    def onImportModel(self, folder: bool) -> None:
        if folder:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder (package or nnU-Net result)"))
        else:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Model file"), "",
                                                  _("Model weights (*.pth *.pt *.safetensors *.json);;All files (*)"))
        if not path:
            return
        try:
            reference = self.logic.importModel(path)
        except MedDINOv3SegmentError as e:
            slicer.util.errorDisplay(str(e))
            return
        self._fillModels()
        for text, ref in self._modelReferences.items():
            if ref == reference:
                self._parameterNode.model = text
        self.ui.statusLabel.text = _("Imported {path}").format(path=reference)

    # -- segmentation ----------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            return
        if not self._dependencies.ensure():
            self.ui.statusLabel.text = _("Missing Python packages (see the top of the panel): segmentation not started.")
            return
        p = self._parameterNode
        output = p.outputSegmentation
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmOkCancelDisplay(
                    _("Replace all segments of '{name}' with the new result?").format(name=output.GetName())):
                return
        try:
            self._task = self.logic.segmentAsync(
                p.inputVolume, self.modelReference(), output, device=self._deviceValues.get(p.device, "auto"),
                fast=p.fast, tta=p.tta, roiNode=p.roi, keepLargest=p.keepLargest, fillHoles=p.fillHoles,
                batchSize=p.batchSize or "auto", onProgress=self._onProgress, onFinished=self._onFinished,
                modelPostprocessing=p.modelPostprocessing, uncertainty=p.uncertainty)
        except MedDINOv3SegmentError as e:
            slicer.util.errorDisplay(str(e))
            return
        self._unsureSlices = []  # they were the previous result's
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = _("Starting...")
        self._timer.start()
        self._updateButtons()

    def _pollTask(self) -> None:
        if self._task is not None:
            self._task.poll()

    def _onProgress(self, event: dict) -> None:
        name = event.get("event")
        if name == "started":
            self.ui.statusLabel.text = _("Running on {device}").format(device=event.get("device", "?"))
        elif name == "progress":
            self.ui.progressBar.setValue(int(100 * float(event.get("fraction") or 0.0)))
            text = f"{event.get('stage', '')} {event.get('done', 0)}/{event.get('total', 0)}"
            if event.get("eta_s") is not None:
                text += _(" - {seconds:.0f} s left").format(seconds=float(event["eta_s"]))
            self.ui.statusLabel.text = text
        elif name in ("download", "downloading"):
            self.ui.statusLabel.text = _("Downloading model weights...")

    def _onFinished(self, node, error) -> None:
        task, self._task = self._task, None
        self._timer.stop()
        self.ui.progressBar.setVisible(False)
        seconds = time.monotonic() - task.startTime if task is not None else 0.0
        if isinstance(error, MedDINOv3SegmentCancelled):
            self.ui.statusLabel.text = _("Cancelled.")
        elif error is not None:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(str(error))
        else:
            self._parameterNode.outputSegmentation = node
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=seconds)
            self._showResults(task)
        self._updateButtons()

    def _showResults(self, task) -> None:
        """The run's statistics table, and its uncertainty volume over the input in the slice views."""
        if task.statisticsTableNode is not None:
            self.ui.statisticsTableView.setMRMLTableNode(task.statisticsTableNode)
        self._unsureSlices, self._unsureIndex = list(task.unsureSlices), -1
        if task.uncertaintyVolumeNode is not None:
            slicer.util.setSliceViewerLayers(background=task.inputVolumeNode, foreground=task.uncertaintyVolumeNode,
                                             foregroundOpacity=0.5)

    def onNextUnsureSlice(self) -> None:
        if not self._unsureSlices:
            return
        self._unsureIndex = (self._unsureIndex + 1) % len(self._unsureSlices)
        index, confidence, ras = self._unsureSlices[self._unsureIndex]
        self.logic.jumpToSlice(ras)
        self.ui.statusLabel.text = _("Slice {index}: mean confidence {confidence:.2f} ({rank} of {count} unsure "
                                     "slices)").format(index=index, confidence=confidence, rank=self._unsureIndex + 1,
                                                       count=len(self._unsureSlices))

    def onShow3D(self) -> None:
        node = self._parameterNode.outputSegmentation
        if node is not None:
            node.CreateClosedSurfaceRepresentation()

    def onSegmentEditor(self) -> None:
        node, volume = self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(node)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:
            editor.setMasterVolumeNode(volume)


class MedDINOv3SegmentTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a tiny random model package segments a generated CT-like volume."""

    def setUp(self) -> None:
        problems = findProblems()
        if problems:  # a build machine without torch: say why instead of failing
            self.skipTest("MedDINOv3 Segment self-test needs Python packages that are not installed: "
                          + ", ".join(str(p) for p in problems))
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentTinyModel()

    def test_SegmentTinyModel(self) -> None:
        import tempfile

        import numpy as np

        from meddinov3.checkpoints import ClassInfo, ModelSpec, write_package
        from meddinov3.config import model_config
        from meddinov3.model import build_model

        self.delayDisplay("Building a tiny model package")
        with tempfile.TemporaryDirectory() as folder:
            config = model_config("tiny", num_classes=3, depth=2)
            package = write_package(os.path.join(folder, "tiny"), ModelSpec(
                "tiny-selftest", config, classes=[ClassInfo(0, "background"), ClassInfo(1, "liver"), ClassInfo(2, "tumour")],
                spacing=(2.0, 2.0), normalization={"scheme": "ct_hu"}), [build_model(config).state_dict()])
            voxels = np.full((6, 48, 48), -1000.0, dtype=np.float32)
            voxels[:, 8:40, 8:40] = 60.0
            voxels[:, 20:28, 20:28] = 300.0
            volume = slicer.util.addVolumeFromArray(voxels, name="selftest CT")
            volume.SetSpacing(1.5, 1.5, 4.0)

            self.delayDisplay("Segmenting")
            logic = MedDINOv3SegmentLogic()
            segmentation = logic.segment(volume, str(package), device="cpu")
            names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(names, ["liver", "tumour"])
            with self.assertRaises(MedDINOv3SegmentError):
                logic.segment(volume, "")
        self.delayDisplay("Test passed")
