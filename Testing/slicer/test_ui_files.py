"""The modules' Qt Designer .ui files: well formed, complete, and consistent with the module code.

No Qt is needed: the XML is checked directly. Helpers for other tests: :func:`ui_object_names`,
:func:`ui_parameter_names`.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI_FILES = {
    "MedDINOv3Segment": REPO / "MedDINOv3Segment" / "Resources" / "UI" / "MedDINOv3Segment.ui",
    "MedDINOv3Train": REPO / "MedDINOv3Train" / "Resources" / "UI" / "MedDINOv3Train.ui",
}
NAMED_ELEMENTS = ("widget", "layout", "spacer", "action")
QT_CLASS = re.compile(r"^Q[A-Z]")

REQUIRED_WIDGETS = {
    "MedDINOv3Segment": {
        "dependenciesFrame": "QFrame",
        "dependenciesLabel": "QLabel",
        "installDependenciesButton": "QPushButton",
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "modelSelector": "QComboBox",
        "importModelButton": None,
        "refreshModelsButton": None,
        "modelInfoText": "QTextBrowser",
        "deviceSelector": "QComboBox",
        "fastCheckBox": "QCheckBox",
        "ttaCheckBox": "QCheckBox",
        "roiSelector": "qMRMLNodeComboBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox",
        "segmentButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "show3DButton": None,
        "segmentEditorButton": None,
        "advancedCollapsibleButton": "ctkCollapsibleButton",
        "modelPostprocessingCheckBox": "QCheckBox",
        "keepLargestCheckBox": "QCheckBox",
        "fillHolesCheckBox": "QCheckBox",
        "batchSizeSpinBox": "QSpinBox",
        "uncertaintyCheckBox": "QCheckBox",
        "statisticsTableView": "qMRMLTableView",
        "nextUnsureSliceButton": "QPushButton",
    },
    "MedDINOv3Train": {
        "dependenciesFrame": "QFrame",
        "dependenciesLabel": "QLabel",
        "installDependenciesButton": "QPushButton",
        "dataSourceSelector": "QComboBox",
        "pairsTable": "QTableWidget",
        "addPairButton": None,
        "removePairButton": None,
        "classPreviewText": "QTextBrowser",
        "dataFolderPathLineEdit": "ctkPathLineEdit",
        "modeSelector": "QComboBox",
        "baseModelSelector": "QComboBox",
        "sizeSelector": "QComboBox",
        "epochsSpinBox": "QSpinBox",
        "stepsSpinBox": "QSpinBox",
        "learningRateSpinBox": None,
        "batchSizeSpinBox": "QSpinBox",
        "advancedJsonEdit": "QPlainTextEdit",
        "outputFolderPathLineEdit": "ctkPathLineEdit",
        "deviceSelector": "QComboBox",
        "startButton": "QPushButton",
        "stopButton": "QPushButton",
        "resumeButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "metricsLabel": "QLabel",
        "gpuMemoryLabel": "QLabel",
        "plotWidgetFrame": None,
        "logText": "QPlainTextEdit",
        "jobsTable": "QTableWidget",
        "openFolderButton": None,
        "resumeJobButton": None,
        "deleteJobButton": None,
        "segmentWithModelButton": None,
    },
}

#: SlicerParameterName bindings (widget -> parameter-node field) the module code relies on. Not bound (the Widgets
#: sync them by hand): combo boxes filled at run time and ctkPathLineEdits holding a str, which Slicer's
#: parameterNodeWrapper.connectGui cannot connect.
PARAMETER_BINDINGS = {
    "MedDINOv3Segment": {
        "inputVolumeSelector": "inputVolume",
        "fastCheckBox": "fast",
        "ttaCheckBox": "tta",
        "roiSelector": "roi",
        "outputSegmentationSelector": "outputSegmentation",
        "modelPostprocessingCheckBox": "modelPostprocessing",
        "keepLargestCheckBox": "keepLargest",
        "fillHolesCheckBox": "fillHoles",
        "batchSizeSpinBox": "batchSize",
        "uncertaintyCheckBox": "uncertainty",
    },
    "MedDINOv3Train": {
        "dataSourceSelector": "dataSource",
        "modeSelector": "mode",
        "sizeSelector": "modelSize",
        "epochsSpinBox": "epochs",
        "stepsSpinBox": "steps",
        "learningRateSpinBox": "learningRate",
        "batchSizeSpinBox": "batchSize",
    },
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def parse_ui(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "ui", f"{path}: root element is <{root.tag}>, not <ui>"
    return root


def top_widget(root: ET.Element) -> ET.Element:
    widgets = root.findall("widget")
    assert len(widgets) == 1, "a .ui file has exactly one top-level widget"
    return widgets[0]


def ui_object_names(path: Path | str) -> set[str]:
    """objectNames of all widgets, layouts, spacers and actions in a .ui file (what `self.ui.<name>` reaches)."""
    root = parse_ui(Path(path))
    return {element.get("name") for tag in NAMED_ELEMENTS for element in root.iter(tag) if element.get("name")}


def ui_widget_classes(path: Path | str) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in parse_ui(Path(path)).iter("widget")}


def widget_property(widget: ET.Element, name: str) -> ET.Element | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def ui_parameter_names(path: Path | str) -> dict[str, str]:
    """widget objectName -> its `SlicerParameterName` dynamic property (parameter-node binding)."""
    bindings = {}
    for widget in parse_ui(Path(path)).iter("widget"):
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            bindings[widget.get("name")] = prop.findtext("string")
    return bindings


def module_python_files(module: str) -> list[Path]:
    folder = REPO / module
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def ui_attribute_uses(source: str) -> set[str]:
    """Names used as `ui.<name>` (e.g. `self.ui.segmentButton`, `ui.modelSelector`) in Python source."""
    return set(re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", source))


def parameter_wrapper_annotations(source: str) -> dict[str, dict[str, str]]:
    """Annotated fields (name -> annotation source) of each class decorated with `parameterNodeWrapper`."""
    classes = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = {ast.unparse(d).split(".")[-1] for d in node.decorator_list}
        if "parameterNodeWrapper" in decorators:
            classes[node.name] = {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return classes


def parameter_wrapper_fields(source: str) -> dict[str, set[str]]:
    """Annotated fields of each class decorated with `parameterNodeWrapper` in Python source."""
    return {name: set(fields) for name, fields in parameter_wrapper_annotations(source).items()}


def module_parameter_wrappers(module: str) -> dict[str, dict[str, str]]:
    """The `parameterNodeWrapper` classes anywhere in a module's Python files (module file or its Lib), each
    with its fields' annotations; a module without one fails (a moved or renamed file must not skip the checks)."""
    wrappers = {}
    for path in module_python_files(module):
        wrappers.update(parameter_wrapper_annotations(path.read_text(encoding="utf-8")))
    assert wrappers, f"no @parameterNodeWrapper class in {module}'s Python files"
    return wrappers


def require_module_file(module: str) -> Path:
    main = REPO / module / f"{module}.py"
    assert main.is_file(), f"{main.relative_to(REPO)} is missing (renamed? update UI_FILES and this test)"
    return main


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", UI_FILES)
def test_ui_is_well_formed_designer_xml(module):
    path = UI_FILES[module]
    root = parse_ui(path)
    assert root.get("version") == "4.0"
    top = top_widget(root)
    assert root.findtext("class") == top.get("name") == module
    assert top.get("class") == "qMRMLWidget", "Slicer module panels are qMRMLWidget"

    names = [element.get("name") for tag in NAMED_ELEMENTS for element in root.iter(tag)]
    assert all(names), "every widget, layout and spacer needs an objectName"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"duplicate objectNames: {duplicates}"

    # Every non-Qt class is declared as a custom widget (Designer and uic need the header).
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    undeclared = sorted(c for c in used if not QT_CLASS.match(c) and c not in declared)
    assert not undeclared, f"custom widget classes not in <customwidgets>: {undeclared}"

    # Dynamic properties are written with stdset="0".
    for widget in root.iter("widget"):
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            assert prop.get("stdset") == "0", widget.get("name")


@pytest.mark.parametrize("module", UI_FILES)
def test_mrml_widgets_get_the_scene(module):
    root = parse_ui(UI_FILES[module])
    top_name = top_widget(root).get("name")
    mrml_widgets = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")} - {top_name}
    connected = set()
    names = ui_object_names(UI_FILES[module])
    for connection in root.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        assert sender in names and receiver in names, (sender, receiver)
        if (
            sender == top_name
            and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
            and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
        ):
            connected.add(receiver)
    assert mrml_widgets <= connected, f"not connected to mrmlSceneChanged: {sorted(mrml_widgets - connected)}"


@pytest.mark.parametrize("module", UI_FILES)
def test_required_widgets_exist(module):
    classes = ui_widget_classes(UI_FILES[module])
    for name, cls in REQUIRED_WIDGETS[module].items():
        assert name in classes, f"{module}.ui lacks {name}"
        if cls is not None:
            assert classes[name] == cls, f"{name} is a {classes[name]}, expected {cls}"


@pytest.mark.parametrize("module", UI_FILES)
def test_parameter_bindings(module):
    assert ui_parameter_names(UI_FILES[module]) == PARAMETER_BINDINGS[module]


def test_segment_node_selectors_are_configured():
    widgets = {w.get("name"): w for w in parse_ui(UI_FILES["MedDINOv3Segment"]).iter("widget")}

    def prop(widget: str, name: str):
        element = widget_property(widgets[widget], name)
        assert element is not None, f"{widget}.{name} not set"
        child = element[0]
        return [s.text for s in child] if child.tag == "stringlist" else child.text

    assert prop("inputVolumeSelector", "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert prop("roiSelector", "nodeTypes") == ["vtkMRMLMarkupsROINode"]
    assert prop("roiSelector", "noneEnabled") == "true"
    assert prop("outputSegmentationSelector", "nodeTypes") == ["vtkMRMLSegmentationNode"]
    for name in ("noneEnabled", "addEnabled", "renameEnabled"):
        assert prop("outputSegmentationSelector", name) == "true"
    assert prop("outputSegmentationSelector", "noneDisplay") == "Create new segmentation"
    assert prop("batchSizeSpinBox", "minimum") == "0"
    assert prop("advancedCollapsibleButton", "collapsed") == "true"


def test_train_widgets_are_configured():
    root = parse_ui(UI_FILES["MedDINOv3Train"])
    widgets = {w.get("name"): w for w in root.iter("widget")}

    def items(name: str) -> list[str]:
        return [item.find("property/string").text for item in widgets[name].findall("item")]

    def columns(name: str) -> list[str]:
        return [column.find("property/string").text for column in widgets[name].findall("column")]

    assert items("dataSourceSelector") == [
        "Volumes and segmentations in the scene",
        "Dataset folder",
        "Folder of unlabelled volumes",
    ]
    assert items("modeSelector") == ["Fine-tune", "Pretrain stage 1", "Pretrain stage 2", "Pretrain stage 3"]
    assert items("sizeSelector") == ["small", "base", "large"]
    assert columns("pairsTable") == ["Volume", "Segmentation"]
    assert columns("jobsTable") == ["Name", "Mode", "State", "Progress", "Folder"]
    assert widget_property(widgets["learningRateSpinBox"], "decimals").findtext("number") == "6"
    assert widget_property(widgets["logText"], "readOnly").findtext("bool") == "true"
    for name in ("dataFolderPathLineEdit", "outputFolderPathLineEdit"):
        assert "ctkPathLineEdit::Dirs" in widget_property(widgets[name], "filters").findtext("set")


@pytest.mark.parametrize("module", UI_FILES)
def test_module_code_uses_only_widgets_of_its_ui(module):
    require_module_file(module)
    names = ui_object_names(UI_FILES[module])
    problems = []
    for path in module_python_files(module):
        for name in sorted(ui_attribute_uses(path.read_text(encoding="utf-8")) - names):
            problems.append(f"{path.relative_to(REPO)}: ui.{name} is not in {UI_FILES[module].name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", UI_FILES)
def test_parameter_node_fields_match_ui_bindings(module):
    require_module_file(module)
    wrappers = module_parameter_wrappers(module)
    fields = set().union(*wrappers.values())
    unbound = sorted(set(ui_parameter_names(UI_FILES[module]).values()) - fields)
    assert not unbound, f"SlicerParameterName values with no field in {sorted(wrappers)}: {unbound}"


def test_helpers_on_a_small_ui(tmp_path):
    path = tmp_path / "X.ui"
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><ui version="4.0"><class>X</class>'
        '<widget class="qMRMLWidget" name="X"><layout class="QVBoxLayout" name="lay"><item>'
        '<widget class="QPushButton" name="goButton"><property name="SlicerParameterName" stdset="0">'
        "<string>go</string></property></widget></item></layout></widget></ui>"
    )
    assert ui_object_names(path) == {"X", "lay", "goButton"}
    assert ui_parameter_names(path) == {"goButton": "go"}
    source = "self.ui.goButton.clicked.connect(f)\nui.other.setText('')\nself.uix.no = 1\n"
    assert ui_attribute_uses(source) == {"goButton", "other"}
    wrapped = "@parameterNodeWrapper\nclass P:\n    go: bool\n    n: int = 1\n"
    assert parameter_wrapper_fields(wrapped) == {"P": {"go", "n"}}


@pytest.mark.parametrize("module", UI_FILES)
def test_bound_widgets_can_be_connected(module):
    """Bindings that Slicer 5.6's `connectGui` accepts (parameterNodeWrapper/guiConnectors.py): a QComboBox only
    for a field annotated with `Choice`, a ctkPathLineEdit only for a pathlib.Path field; a ctkDoubleSpinBox is
    connectable from Slicer 5.8 only. Anything else raises when the module panel opens."""
    annotations = {}
    for fields in module_parameter_wrappers(module).values():
        annotations.update(fields)
    classes = ui_widget_classes(UI_FILES[module])
    for widget, parameter in ui_parameter_names(UI_FILES[module]).items():
        annotation = annotations[parameter]
        if classes[widget] == "QComboBox":
            assert "Choice(" in annotation, f"{widget} is bound to {parameter}: {annotation} without Choice"
        assert classes[widget] != "ctkPathLineEdit" or "Path" in annotation, f"{widget}: {annotation} is not a Path"
        assert classes[widget] != "ctkDoubleSpinBox", f"{widget}: use QDoubleSpinBox (Slicer 5.6)"


@pytest.mark.parametrize("module", UI_FILES)
def test_gui_tag_is_never_tested_for_truth(module):
    """`connectGui` numbers the connections of each wrapper from 0 (parameterNodeWrapper/wrapper.py,
    `_nextParameterGUIsTag = 0`), and the Logic makes a new wrapper for each getParameterNode(): a check such as
    `if self._parameterNodeGuiTag:` skips disconnectGui for tag 0 and leaves the old connectors attached."""
    source = require_module_file(module).read_text(encoding="utf-8")
    problems = []
    for node in ast.walk(ast.parse(source)):
        tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else []
        tests += node.values if isinstance(node, ast.BoolOp) else []
        tests += [node.operand] if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) else []
        problems += [f"line {t.lineno}: {ast.unparse(t)}" for t in tests
                     if isinstance(t, ast.Attribute) and t.attr == "_parameterNodeGuiTag"]
    assert not problems, "compare the GUI tag with None instead:\n" + "\n".join(problems)


@pytest.mark.parametrize("module", UI_FILES)
def test_gui_tag_comes_from_connect_parameters_to_gui(module, headless_slicer):
    """Slicer 5.8's `connectGui` returns None (wrapper.py `_connectGui` lacks the `return`; fixed in 5.10), so the
    Widgets connect through the shared `connectGui` helper: `connectParametersToGui` returns the tag in every
    version, given the widgets `connectGui` would find (those with a SlicerParameterName)."""
    source = require_module_file(module).read_text(encoding="utf-8")
    direct = [node.lineno for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connectGui"]
    assert not direct, f"lines {direct}: use MedDINOv3SegmentLib.parameters.connectGui (Slicer 5.8 tag)"
    assert "MedDINOv3SegmentLib.parameters import connectGui" in source
    from MedDINOv3SegmentLib.parameters import connectGui as helper

    class FakeWidget:
        def __init__(self, parameter):
            self.parameter = parameter

        def property(self, name):
            assert name == "SlicerParameterName"
            return self.parameter

    bindings = ui_parameter_names(UI_FILES[module])
    ui = type("", (), {})()  # what slicer.util.childWidgetVariables returns
    for name in ui_object_names(UI_FILES[module]):
        setattr(ui, name, FakeWidget(bindings.get(name)))

    class FakeParameterNode:
        def connectParametersToGui(self, mapping):
            self.mapping = mapping
            return 0

    node = FakeParameterNode()
    assert helper(node, ui) == 0
    assert {parameter: widget.parameter for parameter, widget in node.mapping.items()} == {
        parameter: parameter for parameter in bindings.values()}
    assert {name for name in bindings if getattr(ui, name) in node.mapping.values()} == set(bindings)
