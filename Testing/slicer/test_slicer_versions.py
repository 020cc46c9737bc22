"""What differs between Slicer versions and the Widgets' own small behaviours, tested headless.

- Slicer 5.8 has no `vtkSegment::SetTerminology` (5.10+): the result's terminology goes into the segment's tag.
  slicer-core is 5.13, so the test hides the method as 5.8's segment lacks it and runs the real fill code.
- The Widgets cannot be built without Qt: these tests create them without `setup()` and give them stand-in
  widgets (`self.ui`), then call the methods under test; the Logic, scene and parameter nodes are real.
"""

from __future__ import annotations

import types
import warnings

import numpy as np

TERMINOLOGY = "MedDINOv3~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes~^^~^^"


class Slicer58Segment:
    """A real vtkSegment seen as Slicer 5.8 has it: no SetTerminology / GetTerminology."""

    def __init__(self, segment):
        self._segment = segment

    def __getattr__(self, name):
        if name in ("SetTerminology", "GetTerminology"):
            raise AttributeError(name)
        return getattr(self._segment, name)


def _fill(slicer_scene, monkeypatch, slicer58: bool):
    import slicer

    from MedDINOv3SegmentLib import nodes

    if slicer58:
        original = nodes._setTerminology
        monkeypatch.setattr(nodes, "_setTerminology", lambda segment, text: original(Slicer58Segment(segment), text))
    volume = slicer.util.addVolumeFromArray(np.zeros((3, 8, 8), dtype=np.int16), name="CT")
    labels = np.zeros((3, 8, 8), dtype=np.uint8)
    labels[1, 2:5, 2:5] = 1
    node = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = nodes.fillSegmentationNode(node, volume, labels, [
        {"labelValue": 1, "name": "liver", "color": (0.8, 0.5, 0.4), "terminology": TERMINOLOGY},
        {"labelValue": 2, "name": "tumour", "color": None, "terminology": None}])
    return node.GetSegmentation(), ids


def test_slicer58_stores_terminology_in_the_segment_tag(slicer_scene, monkeypatch):
    segmentation, ids = _fill(slicer_scene, monkeypatch, slicer58=True)
    liver, tumour = (segmentation.GetSegment(i) for i in ids)
    assert _tag(liver) == TERMINOLOGY  # what Slicer 5.8 reads
    assert liver.GetTerminology() == TERMINOLOGY  # and 5.10+ read the same entry
    assert _tag(tumour) != TERMINOLOGY  # no entry given: Slicer's default stays
    monkeypatch.undo()
    newer, _ = _fill(slicer_scene, monkeypatch, slicer58=False)  # 5.10+: SetTerminology, the same tag
    assert _tag(newer.GetSegment(newer.GetNthSegmentID(0))) == TERMINOLOGY


def _tag(segment):
    import vtk

    value = vtk.reference("")
    return value.get() if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else None


class Stand:
    """A Qt widget stand-in: any method call is accepted; combo boxes keep items; `text`/`enabled` are plain data."""

    def __init__(self, text=""):
        self.text = text
        self.enabled = True
        self.items: list[str] = []
        self.currentIndex = -1

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex] if 0 <= self.currentIndex < len(self.items) else ""

    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text):
        self.items.append(text)
        self.currentIndex = max(self.currentIndex, 0)

    def findText(self, text):
        return self.items.index(text) if text in self.items else -1

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def blockSignals(self, blocked):
        return False

    def setHtml(self, text):
        self.text = text

    setPlainText = setHtml

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class UI(types.SimpleNamespace):
    def __getattr__(self, name):  # every widget of the .ui
        widget = Stand()
        setattr(self, name, widget)
        return widget


def test_reentering_segment_module_prints_no_observer_warning(headless_slicer, slicer_scene):
    import MedDINOv3Segment
    from MedDINOv3SegmentLib.dependencies import DependenciesSection

    widget = MedDINOv3Segment.MedDINOv3SegmentWidget(types.SimpleNamespace(isEntered=True))
    widget.ui = UI()
    widget.logic = MedDINOv3Segment.MedDINOv3SegmentLogic()
    widget._dependencies = DependenciesSection(Stand(), Stand(), Stand(), onInstalled=lambda: None,
                                               installer=types.SimpleNamespace(problems=lambda: []))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            widget.enter()
            widget.exit()
        widget.enter()
        widget.cleanup()
    assert [str(w.message) for w in caught] == []
    assert widget._parameterNode is not None and widget._parameterNodeGuiTag is None


def test_device_list_is_rebuilt_after_install_keeping_the_choice(headless_slicer, slicer_scene, monkeypatch):
    import MedDINOv3Segment
    from MedDINOv3SegmentLib import dependencies

    widget = MedDINOv3Segment.MedDINOv3SegmentWidget(types.SimpleNamespace(isEntered=True))
    widget.ui = UI()
    widget.logic = MedDINOv3Segment.MedDINOv3SegmentLogic()
    choices = [("Auto", "auto"), ("CPU", "cpu")]
    monkeypatch.setattr(dependencies, "deviceChoices", lambda: list(choices))  # GPUs cannot exist here
    widget._fillDevices()
    widget.initializeParameterNode()
    widget._parameterNode.device = "CPU"  # the user's choice before installing torch
    choices.append(("GPU 0: H200", "cuda:0"))  # what torch sees once installed
    widget._onDependenciesInstalled()
    assert widget.ui.deviceSelector.items == ["Auto", "CPU", "GPU 0: H200"] and widget._deviceValues["GPU 0: H200"] == "cuda:0"
    assert widget.ui.deviceSelector.currentText == "CPU" and widget._parameterNode.device == "CPU"


def test_train_shows_register_errors_in_a_dialog(headless_slicer, slicer_scene, monkeypatch):
    import MedDINOv3Train
    from MedDINOv3SegmentLib.errors import MedDINOv3SegmentError
    from Testing.slicer_headless import RecordingDialogs

    import slicer

    dialogs = RecordingDialogs()
    monkeypatch.setattr(slicer.util, "errorDisplay", dialogs.errorDisplay)
    widget = MedDINOv3Train.MedDINOv3TrainWidget(types.SimpleNamespace(isEntered=True))
    widget.ui = UI()
    widget.ui.jobsTable = types.SimpleNamespace(selectionModel=lambda: None)

    def refuse(job):
        raise MedDINOv3SegmentError("Cannot register /runs/r1/model: not a usable model (truncated file).")

    widget.logic = types.SimpleNamespace(registerJobModel=refuse)
    widget._job = types.SimpleNamespace(name="r1")
    widget.onSegmentCurrentVolume()
    assert dialogs.errors == ["The model of r1 cannot be used: Cannot register /runs/r1/model: not a usable model "
                              "(truncated file)."]
