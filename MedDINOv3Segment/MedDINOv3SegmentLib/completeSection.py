"""The *Complete from painted slices* section of the MedDINOv3 Segment panel (Qt; the work is in `complete`).

Built in code, in its own collapsible section, so that it stays apart from the panel's .ui. Pick the volume, the
segmentation being painted in the Segment Editor and its segments; *Complete* runs `meddinov3 complete` in the child
process (progress, Cancel) and replaces the unpainted slices of those segments as one Segment Editor undo step;
*Least confident slice* moves the slice views to where a correction helps most.
"""

from __future__ import annotations

import time

import ctk
import qt
import slicer
from slicer.i18n import tr as _

from .complete import completeAsync, lpsToRas
from .errors import MedDINOv3SegmentCancelled, MedDINOv3SegmentError


class CompleteSection:
    """Widgets and handlers of the section. `logic`: the module's Logic; `deviceValue()`: the panel's device."""

    def __init__(self, parentLayout, logic, deviceValue, ensureDependencies):
        self.logic, self.deviceValue, self.ensureDependencies = logic, deviceValue, ensureDependencies
        self.task = None
        self.leastConfident = None
        box = ctk.ctkCollapsibleButton()
        box.text = _("Complete from painted slices")
        box.collapsed = True
        parentLayout.addWidget(box)
        form = qt.QFormLayout(box)
        self.volumeSelector = self._nodeSelector(["vtkMRMLScalarVolumeNode"], _("Volume the segments are painted on"))
        form.addRow(_("Volume:"), self.volumeSelector)
        self.segmentsSelector = slicer.qMRMLSegmentSelectorWidget()
        self.segmentsSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentsSelector.multiSelection = True
        self.segmentsSelector.toolTip = _("Segmentation being painted and the segments to complete")
        form.addRow(_("Segments:"), self.segmentsSelector)
        self.modelCombo = qt.QComboBox()
        self.modelCombo.editable = True  # a model folder or hf: reference can be typed in
        self.modelCombo.toolTip = _(
            "Default: the official backbone when downloaded, else scratch (a small network fitted on the painted "
            "slices). A segmentation model also contributes its own answer, which helps most where the painted "
            "structure is one of its classes.")
        self._modelReferences = {}
        self._fillModels()
        box.contentsCollapsed.connect(lambda collapsed: collapsed or self._fillModels())
        form.addRow(_("Model:"), self.modelCombo)
        self.budgetSpin = qt.QDoubleSpinBox()
        self.budgetSpin.setRange(1, 600)
        self.budgetSpin.value = 20
        self.budgetSpin.suffix = " s"
        form.addRow(_("Time budget:"), self.budgetSpin)
        self.extrapolateCheck = qt.QCheckBox(_("Also beyond the first and last painted slice"))
        form.addRow(self.extrapolateCheck)
        self.completeButton = qt.QPushButton(_("Complete"))
        self.jumpButton = qt.QPushButton(_("Least confident slice"))
        self.jumpButton.enabled = False
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.completeButton)
        buttons.addWidget(self.jumpButton)
        form.addRow(buttons)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        form.addRow(self.statusLabel)
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(lambda: self.task is not None and self.task.poll())
        self.completeButton.clicked.connect(self.onComplete)
        self.jumpButton.clicked.connect(self.onJump)

    def _fillModels(self) -> None:
        """Default, scratch and every model the Segment panel knows (backbones too), keeping the current choice."""
        current = self.modelCombo.currentText
        self._modelReferences = {_("Default"): "", "scratch": "scratch"}
        try:
            rows = self.logic.availableModels(segmentableOnly=False)
        except MedDINOv3SegmentError:
            rows = []  # the core cannot be imported yet: the Dependencies section says so
        for row in rows:
            self._modelReferences[f"{row['name']} ({row['source']})"] = row["reference"]
        wasBlocked = self.modelCombo.blockSignals(True)
        self.modelCombo.clear()
        for text in self._modelReferences:
            self.modelCombo.addItem(text)
        self.modelCombo.setCurrentText(current or _("Default"))
        self.modelCombo.blockSignals(wasBlocked)

    def modelReference(self) -> str:
        """The `meddinov3 complete --model` value of the current choice ("" = the CLI's default; typed text as is)."""
        text = self.modelCombo.currentText.strip()
        return self._modelReferences.get(text, text)

    def _nodeSelector(self, classes, tooltip):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = classes
        selector.addEnabled = selector.removeEnabled = selector.noneEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.toolTip = tooltip
        return selector

    def _undoSaver(self, segmentationNode):
        """The Segment Editor's saveStateForUndo when it edits this segmentation (one undo step), else None."""
        widget = getattr(slicer.modules, "SegmentEditorWidget", None)
        editor = getattr(widget, "editor", None)
        if editor is not None and editor.segmentationNode() is segmentationNode:
            return editor.saveStateForUndo
        return None

    def onComplete(self) -> None:
        if self.task is not None:
            self.task.cancel()
            return
        if not self.ensureDependencies():
            self.statusLabel.text = _("Missing Python packages (see the top of the panel).")
            return
        segmentation = self.segmentsSelector.currentNode()
        try:
            self.task = completeAsync(
                self.logic, self.volumeSelector.currentNode(), segmentation, list(self.segmentsSelector.selectedSegmentIDs()),
                model=self.modelReference(), device=self.deviceValue(), timeBudget=self.budgetSpin.value,
                extrapolate=self.extrapolateCheck.checked, beforeModify=self._undoSaver(segmentation),
                onProgress=self._onProgress, onFinished=self._onFinished)
        except MedDINOv3SegmentError as e:
            slicer.util.errorDisplay(str(e))
            return
        self.progressBar.setVisible(True)
        self.progressBar.setValue(0)
        self.completeButton.text = _("Cancel")
        self.statusLabel.text = _("Starting...")
        self.timer.start()

    def _onProgress(self, event: dict) -> None:
        if event.get("event") == "progress":
            self.progressBar.setValue(int(100 * float(event.get("fraction") or 0.0)))
            self.statusLabel.text = f"{event.get('stage', '')} {event.get('done', 0)}/{event.get('total', 0)}"
        elif event.get("event") == "finished":
            self.statusLabel.text = str(event.get("model", ""))

    def _onFinished(self, node, error) -> None:
        task, self.task = self.task, None
        self.timer.stop()
        self.progressBar.setVisible(False)
        self.completeButton.text = _("Complete")
        if isinstance(error, MedDINOv3SegmentCancelled):
            self.statusLabel.text = _("Cancelled.")
        elif error is not None:
            self.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(str(error))
        else:
            self.leastConfident = task.leastConfident
            self.jumpButton.enabled = self.leastConfident is not None
            self.statusLabel.text = _("Completed in {seconds:.1f} s.").format(seconds=time.monotonic() - task.startTime)

    def onJump(self) -> None:
        if self.leastConfident:
            x, y, z = lpsToRas(self.leastConfident["point"])
            slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
