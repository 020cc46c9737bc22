"""Headless 3D Slicer for tests, built on PyPI ``slicer-core``.

``slicer-core`` gives the real MRML scene, nodes, storage nodes, module logics and Slicer's own
``slicer/util.py``, but nothing that needs the Qt application. :func:`setup_headless_slicer`
fills that gap so that module Logic code runs unchanged under pytest:

Real objects (from slicer-core):

- ``slicer.mrmlScene``: a ``vtkMRMLScene``.
- ``slicer.app.applicationLogic()``: a ``vtkSlicerApplicationLogic`` with the scene set, a temporary
  path, and every module logic below registered with ``SetModuleLogic``.
- ``slicer.modules.<name>.logic()`` for ``colors`` (``vtkSlicerColorLogic``, also the application's
  colour logic), ``subjecthierarchy``, ``terminologies``, ``volumes``, ``segmentations``, ``markups``,
  ``transforms``, ``models``, ``tables``, ``plots``, ``sequences``, ``cropvolume``, ``texts``, ``units``.
  Each logic gets ``SetMRMLApplicationLogic`` before ``SetMRMLScene``, as in Slicer.

Stand-ins (documented as such; they exist only because the Qt GUI cannot exist here):

- ``slicer.app``: :class:`ApplicationStandIn` (``applicationLogic()``, ``mrmlScene()``,
  ``temporaryPath``, ``slicerHome``, ``processEvents()``, ``testingEnabled()``, ``pauseRender()``/``resumeRender()``).
  ``slicerHome/bin/PythonSlicer`` is a stand-in launcher (``Testing/python_slicer_stand_in.py``, POSIX): like
  Slicer's CTKAppLauncher it runs the real interpreter as its child and forwards no signal, so the modules'
  child processes are started, stopped and cancelled as in Slicer.
  No ``moduleManager()``, ``coreIOManager()`` or ``layoutManager()``: ``slicer.util.loadVolume``,
  ``saveNode``, ``getModule*`` and anything about views do not work; use storage nodes or
  ``slicer.modules.volumes.logic().AddArchetypeVolume`` instead (Logic code should anyway).
- ``slicer.modules``: a namespace of :class:`ModuleStandIn` (``name``, ``path``, ``logic()``);
  :func:`register_module` adds one (e.g. a scripted module under test).
- ``qt`` and ``ctk``: modules in which any attribute is an inert placeholder class, so that module
  files that ``import qt, ctk`` and mention Qt classes at import time can be imported. Widgets
  are not emulated: test the Logic, not the Widget.
- ``slicer.ScriptedLoadableModule``: ``ScriptedLoadableModule``, ``ScriptedLoadableModuleWidget``,
  ``ScriptedLoadableModuleLogic`` (real parameter nodes: ``getParameterNode`` / ``createParameterNode``
  store a ``vtkMRMLScriptedModuleNode`` in the scene) and ``ScriptedLoadableModuleTest``.
- ``slicer.parameterNodeWrapper``: ``parameterNodeWrapper`` that stores typed fields in the wrapped
  ``vtkMRMLScriptedModuleNode`` (MRML nodes as node references, other values as JSON parameters),
  ``parameterPack``, validators ``WithinRange``, ``Minimum``, ``Maximum``, ``Choice``, ``NotEmpty``,
  ``Default``, and GUI hints ``Decimals``, ``SingleStep``, ``Label`` (accepted, ignored).
  ``connectGui`` / ``connectParametersToGui`` / ``disconnectGui`` are no-ops.
- ``slicer.i18n``: ``tr(text)`` and ``translate(context, text)`` return the text.

Fakes for the dependency install path (a fresh Slicer's Python cannot be made here): :class:`FakePythonPackages`
(what is "installed"), :class:`FakePyTorchUtils` (the PyTorch extension's module), :class:`FakePip`
(``slicer.util.pip_install``) and :class:`RecordingDialogs`, put in place by :func:`install_fakes`; they record
their calls.

Also :func:`volume_node_from_sitk` and :func:`sitk_from_volume_node` (test-side conversions between
SimpleITK images, which are LPS, and volume nodes, which are RAS, keeping the exact geometry), and
:func:`wait_until` (polling for a child process to start or end).

Inside a real Slicer (``slicer.app`` already exists) :func:`setup_headless_slicer` does nothing.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import types
import typing
import unittest

import numpy as np

_MARKER = "_meddinov3_headless"

#: Slicer module name (as in ``slicer.modules.<key>``) -> (Slicer module title, slicer-core logic class).
#: Order matters: the subject hierarchy and colours first, as other logics use them.
MODULE_LOGICS = {
    "colors": ("Colors", "vtkSlicerColorLogic"),
    "subjecthierarchy": ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    "terminologies": ("Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    "volumes": ("Volumes", "vtkSlicerVolumesLogic"),
    "segmentations": ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    "markups": ("Markups", "vtkSlicerMarkupsLogic"),
    "transforms": ("Transforms", "vtkSlicerTransformLogic"),
    "models": ("Models", "vtkSlicerModelsLogic"),
    "tables": ("Tables", "vtkSlicerTablesLogic"),
    "plots": ("Plots", "vtkSlicerPlotsLogic"),
    "sequences": ("Sequences", "vtkSlicerSequencesLogic"),
    "cropvolume": ("CropVolume", "vtkSlicerCropVolumeLogic"),
    "texts": ("Texts", "vtkSlicerTextsLogic"),
    "units": ("Units", "vtkSlicerUnitsLogic"),
}


# --------------------------------------------------------------------------------------------
# Application and module stand-ins
# --------------------------------------------------------------------------------------------


class ApplicationStandIn:
    """Stand-in for ``slicer.app`` (a ``qSlicerApplication`` in Slicer): only what Logic code needs."""

    isHeadlessStandIn = True

    def __init__(self, scene, application_logic, temporary_path: str):
        self._scene = scene
        self._application_logic = application_logic
        self.temporaryPath = temporary_path
        self.slicerHome = _install_python_slicer(os.path.join(temporary_path, "slicer-home"))
        self.commandOptions = lambda: types.SimpleNamespace(noMainWindow=True, testingEnabled=True)

    def applicationLogic(self):
        return self._application_logic

    def mrmlScene(self):
        return self._scene

    def processEvents(self, *args) -> None:
        """No event loop without Qt: nothing to process."""

    def testingEnabled(self) -> bool:
        return True

    def pauseRender(self) -> None:
        """No views to render."""

    def resumeRender(self) -> None:
        """No views to render."""


def _install_python_slicer(home: str) -> str:
    """Make ``home/bin/PythonSlicer`` run the stand-in launcher with this interpreter (POSIX); returns ``home``."""
    launcher = pathlib.Path(home) / "bin" / "PythonSlicer"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    if os.name != "nt":
        stand_in = pathlib.Path(__file__).with_name("python_slicer_stand_in.py")
        launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stand_in}" "$@"\n')
        launcher.chmod(0o755)
    return home


class ModuleStandIn:
    """Stand-in for a ``qSlicerAbstractCoreModule`` in ``slicer.modules``: name, path and logic."""

    def __init__(self, name: str, logic, path: str = ""):
        self.name = name
        self.title = name
        self.path = path
        self._logic = logic

    def logic(self):
        return self._logic

    def __repr__(self) -> str:
        return f"ModuleStandIn({self.name!r})"


def register_module(name: str, logic=None, path: str = "") -> ModuleStandIn:
    """Expose ``logic`` as ``slicer.modules.<name.lower()>.logic()`` (e.g. a scripted module under test)."""
    import slicer

    module = ModuleStandIn(name, logic, path)
    setattr(slicer.modules, name.lower(), module)
    return module


# --------------------------------------------------------------------------------------------
# qt / ctk placeholders
# --------------------------------------------------------------------------------------------


class _Inert:
    """Instances accept any call and any attribute; used for ``qt.X`` / ``ctk.X`` placeholders."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def connect(self, *args, **kwargs) -> bool:
        return True


class _InertMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


def _placeholder_module(name: str) -> types.ModuleType:
    """A module whose attributes are placeholder classes (``qt.QTimer``, ``ctk.ctkCollapsibleButton``...)."""
    module = types.ModuleType(name, f"Headless stand-in for `{name}`: every attribute is an inert placeholder class.")
    module.__dict__[_MARKER] = True
    cache: dict[str, type] = {}

    def __getattr__(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if attribute not in cache:
            cache[attribute] = _InertMeta(attribute, (_Inert,), {"__module__": name})
        return cache[attribute]

    module.__getattr__ = __getattr__
    return module


# --------------------------------------------------------------------------------------------
# slicer.i18n
# --------------------------------------------------------------------------------------------


def _i18n_module() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n", "Headless stand-in for slicer.i18n: no translations, text is returned as is.")

    def tr(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    module.tr = tr
    module.translate = translate
    return module


# --------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule
# --------------------------------------------------------------------------------------------


def _scripted_loadable_module() -> types.ModuleType:
    module = types.ModuleType(
        "slicer.ScriptedLoadableModule",
        "Headless stand-in for slicer.ScriptedLoadableModule (no GUI; real parameter nodes).",
    )

    class ScriptedLoadableModule:
        """Module metadata holder. ``parent`` may be None (a namespace is created)."""

        def __init__(self, parent=None):
            if parent is None:
                source = sys.modules[self.__class__.__module__].__dict__.get("__file__", "")
                parent = types.SimpleNamespace(path=source)
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def getDefaultModuleDocumentationLink(self, docPage: str = "") -> str:
            return ""

    class ScriptedLoadableModuleWidget:
        """Widget base: keeps ``parent`` and ``moduleName``; ``setup()`` builds nothing (no Qt)."""

        def __init__(self, parent=None):
            self.parent = parent
            self.layout = _Inert()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[: -len("Widget")]
            self.developerMode = False

        def resourcePath(self, filename: str) -> str:
            source = sys.modules[self.__class__.__module__].__dict__.get("__file__", "")
            return os.path.join(os.path.dirname(source), "Resources", filename)

        def setup(self) -> None:
            pass

        def cleanup(self) -> None:
            pass

        def enter(self) -> None:
            pass

        def exit(self) -> None:
            pass

    class ScriptedLoadableModuleLogic:
        """Logic base with Slicer's parameter-node behaviour, on the real scene."""

        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[: -len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            import slicer

            if self.isSingletonParameterNode:
                node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node:
                    return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def getAllParameterNodes(self) -> list:
            import slicer

            nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLScriptedModuleNode")
            found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
            return [node for node in found if node.GetAttribute("ModuleName") == self.moduleName]

        def createParameterNode(self):
            import slicer

            node = slicer.vtkMRMLScriptedModuleNode()
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetHideFromEditors(True)
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """Test base; ``delayDisplay`` logs instead of showing a message."""

        def delayDisplay(self, message: str, requestedDelay=None, msec=None) -> None:
            logging.info(message)

        def takeScreenshot(self, name: str, description: str, type=-1) -> None:
            pass

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    module.__all__ = [
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    ]
    return module


# --------------------------------------------------------------------------------------------
# slicer.parameterNodeWrapper
# --------------------------------------------------------------------------------------------


class Validator:
    """Base of the validator annotations: ``validate(value)`` raises ValueError."""

    def validate(self, value) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class WithinRange(Validator):
    minimum: float
    maximum: float

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


@dataclasses.dataclass(frozen=True)
class Minimum(Validator):
    minimum: float

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"{value} is less than {self.minimum}")


@dataclasses.dataclass(frozen=True)
class Maximum(Validator):
    maximum: float

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"{value} is greater than {self.maximum}")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


class NotEmpty(Validator):
    def validate(self, value) -> None:
        if not value:
            raise ValueError("value must not be empty")


@dataclasses.dataclass(frozen=True)
class Default:
    value: typing.Any = None
    generator: typing.Callable | None = None

    def make(self):
        return self.generator() if self.generator is not None else self.value


@dataclasses.dataclass(frozen=True)
class _GuiHint:
    value: typing.Any = None


class Decimals(_GuiHint):
    pass


class SingleStep(_GuiHint):
    pass


class Label(_GuiHint):
    pass


def _is_mrml_node_type(tp) -> bool:
    import slicer

    return isinstance(tp, type) and issubclass(tp, slicer.vtkMRMLNode)


@dataclasses.dataclass
class _Field:
    name: str
    type: typing.Any  # without Annotated / Optional
    optional: bool
    validators: list
    default: typing.Any

    @property
    def is_node(self) -> bool:
        return _is_mrml_node_type(self.type)


def _type_default(tp, optional: bool):
    if optional or _is_mrml_node_type(tp):
        return None
    origin = typing.get_origin(tp)
    if origin in (list, tuple, dict, set):
        return origin()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return next(iter(tp))
    if dataclasses.is_dataclass(tp):
        return tp()
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    return {bool: False, int: 0, float: 0.0, str: "", pathlib.Path: pathlib.Path()}.get(tp)


def _fields_of(cls, localns: dict | None = None) -> list[_Field]:
    hints = typing.get_type_hints(cls, localns=localns, include_extras=True)
    fields = []
    for name, tp in hints.items():
        if name.startswith("_"):
            continue
        validators, default = [], dataclasses.MISSING
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            for extra in extras:
                if isinstance(extra, Validator):
                    validators.append(extra)
                elif isinstance(extra, Default):
                    default = extra.make()
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            tp = args[0] if len(args) == 1 else tp
        if name in cls.__dict__:
            default = cls.__dict__[name]
        if default is dataclasses.MISSING:
            default = _type_default(tp, optional)
        fields.append(_Field(name, tp, optional, validators, default))
    return fields


def _to_json(value):
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp, data):
    if data is None:
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp[data]
    if tp is pathlib.Path:
        return pathlib.Path(data)
    if tp is float:
        return float(data)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _from_json(hints.get(k), v) for k, v in data.items()})
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        item = args[0] if args else None
        return origin(_from_json(item, v) for v in data)
    return data


def parameterPack(cls):
    """Stand-in for Slicer's ``parameterPack``: a dataclass, serialised as JSON inside the parameter node."""
    return dataclasses.dataclass(cls)


def parameterNodeWrapper(cls):
    """Stand-in for Slicer's ``parameterNodeWrapper``: typed properties over a ``vtkMRMLScriptedModuleNode``.

    ``Wrapped(parameterNode)`` writes the default of every field the node does not have yet.
    MRML-node fields are node references (role = field name); other fields are JSON strings
    (``GetParameter(name)``), so values survive scene save/load like Slicer's own wrapper.
    """
    # The caller's locals resolve string annotations of classes defined inside functions.
    fields = {field.name: field for field in _fields_of(cls, localns=sys._getframe(1).f_locals)}

    def make_property(field: _Field) -> property:
        def getter(self):
            node = self.parameterNode
            if field.is_node:
                return node.GetNodeReference(field.name)
            text = node.GetParameter(field.name)
            return _from_json(field.type, json.loads(text)) if text else None

        def setter(self, value):
            if value is None and not (field.optional or field.is_node):
                raise ValueError(f"{cls.__name__}.{field.name} cannot be None")
            if field.is_node:
                if value is not None and not isinstance(value, field.type):
                    raise TypeError(f"{cls.__name__}.{field.name} expects {field.type.__name__}, got {type(value).__name__}")
                self.parameterNode.SetNodeReferenceID(field.name, value.GetID() if value is not None else None)
                return
            if field.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None:
                for validator in field.validators:
                    validator.validate(value)
            self.parameterNode.SetParameter(field.name, json.dumps(_to_json(value)))

        return property(getter, setter)

    def __init__(self, parameterNode):
        object.__setattr__(self, "parameterNode", parameterNode)
        wasModifying = parameterNode.StartModify()
        try:
            for field in fields.values():
                missing = (
                    not parameterNode.GetNodeReferenceID(field.name)
                    if field.is_node
                    else not parameterNode.GetParameter(field.name)
                )
                if missing and field.default is not None:
                    setattr(self, field.name, field.default)
                elif missing and not field.is_node:
                    parameterNode.SetParameter(field.name, "null")
        finally:
            parameterNode.EndModify(wasModifying)

    def connectGui(self, gui) -> int:
        """No Qt: nothing to connect. Returns a tag for ``disconnectGui``."""
        return 0

    def connectParametersToGui(self, mapping) -> int:
        """No Qt: nothing to connect (``mapping``: parameter name -> widget). Returns a tag for ``disconnectGui``."""
        return 0

    def disconnectGui(self, tag) -> None:
        pass

    def StartModify(self) -> int:
        return self.parameterNode.StartModify()

    def EndModify(self, wasModifying: int) -> int:
        return self.parameterNode.EndModify(wasModifying)

    def AddObserver(self, event, callback, priority: float = 0.0) -> int:
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag) -> None:
        self.parameterNode.RemoveObserver(tag)

    namespace = {
        "__init__": __init__,
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "connectGui": connectGui,
        "connectParametersToGui": connectParametersToGui,
        "disconnectGui": disconnectGui,
        "StartModify": StartModify,
        "EndModify": EndModify,
        "AddObserver": AddObserver,
        "RemoveObserver": RemoveObserver,
        "allParameters": property(lambda self: {name: getattr(self, name) for name in fields}),
        "_fields": fields,
    }
    for name, value in cls.__dict__.items():
        if name not in fields and not (name.startswith("__") and name.endswith("__")):
            namespace[name] = value  # user methods and properties
    for field in fields.values():
        namespace[field.name] = make_property(field)
    return type(cls.__name__, (), namespace)


def _parameter_node_wrapper_module() -> types.ModuleType:
    module = types.ModuleType(
        "slicer.parameterNodeWrapper",
        "Headless stand-in for slicer.parameterNodeWrapper (values stored in the real parameter node; no GUI binding).",
    )
    names = [
        "parameterNodeWrapper",
        "parameterPack",
        "Validator",
        "WithinRange",
        "Minimum",
        "Maximum",
        "Choice",
        "NotEmpty",
        "Default",
        "Decimals",
        "SingleStep",
        "Label",
    ]
    for name in names:
        setattr(module, name, globals()[name])
    module.__all__ = names
    return module


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def _create_logic(slicer, class_name: str, application_logic, scene):
    logic = getattr(slicer, class_name)()
    logic.SetMRMLApplicationLogic(application_logic)
    logic.SetMRMLScene(scene)
    return logic


def setup_headless_slicer(temporary_path: str | None = None):
    """Make ``slicer.mrmlScene``, ``slicer.app``, ``slicer.modules`` and the stand-in modules exist.

    Idempotent: later calls return the same ``slicer`` module. Does nothing inside a real Slicer.
    Returns the ``slicer`` module.
    """
    import slicer
    import vtk

    if getattr(slicer, _MARKER, False):
        return slicer
    if hasattr(slicer, "app"):  # a real Slicer application
        return slicer

    for name in ("qt", "ctk"):
        existing = sys.modules.get(name)
        if existing is None:
            sys.modules[name] = _placeholder_module(name)
        elif not getattr(existing, _MARKER, False):
            raise RuntimeError(f"a real `{name}` module is importable; setup_headless_slicer expects none")

    submodules = {
        "i18n": _i18n_module(),
        "ScriptedLoadableModule": _scripted_loadable_module(),
        "parameterNodeWrapper": _parameter_node_wrapper_module(),
    }
    for name, module in submodules.items():
        sys.modules[f"slicer.{name}"] = module
        setattr(slicer, name, module)

    if temporary_path is None:  # ours: removed when the process ends
        temporary_path = tempfile.mkdtemp(prefix="meddinov3-slicer-")
        atexit.register(shutil.rmtree, temporary_path, True)
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetTemporaryPath(temporary_path)
    application_logic.SetMRMLScene(scene)

    # Slicer's share folders (default colour tables, .term.json files) are not in the wheel:
    # silence the logics' "file not found" errors while they look for them.
    was_displaying = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    modules = types.SimpleNamespace()
    try:
        for key, (title, class_name) in MODULE_LOGICS.items():
            if not hasattr(slicer, class_name):
                continue
            logic = _create_logic(slicer, class_name, application_logic, scene)
            application_logic.SetModuleLogic(title, logic)
            if key == "colors":
                application_logic.SetColorLogic(logic)
            setattr(modules, key, ModuleStandIn(title, logic))
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(was_displaying)

    slicer.mrmlScene = scene
    slicer.app = ApplicationStandIn(scene, application_logic, temporary_path)
    slicer.modules = modules
    setattr(slicer, _MARKER, True)
    return slicer


def clear_scene() -> None:
    """Remove every non-singleton node (what File / Close Scene does); colour tables stay."""
    import slicer

    slicer.mrmlScene.Clear(0)


# --------------------------------------------------------------------------------------------
# SimpleITK <-> volume node (test-side helpers)
# --------------------------------------------------------------------------------------------

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def volume_node_from_sitk(image, name: str = "", node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add ``image`` (SimpleITK, LPS) to ``slicer.mrmlScene`` as a volume node with the same geometry."""
    import SimpleITK as sitk
    import slicer

    spacing = np.array(image.GetSpacing(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    ijk_to_ras[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    voxels = sitk.GetArrayFromImage(image)  # (k, j, i), as slicer.util arrays
    return slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name=name, nodeClassName=node_class)


def sitk_from_volume_node(node):
    """SimpleITK image (LPS) with the voxels and exact geometry of a volume node (RAS)."""
    import SimpleITK as sitk
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    spacing = np.array(node.GetSpacing(), dtype=float)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node).copy())
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((_LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist())
    image.SetDirection((_LPS_TO_RAS @ ijk_to_ras[:3, :3] @ np.diag(1.0 / spacing)).ravel().tolist())
    return image


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; returns its last value as a bool (tests
    that wait for a child process to start or to go)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------------------------
# Installing Python packages into Slicer (fakes for the install-path tests)
# --------------------------------------------------------------------------------------------
#
# A fresh Slicer's Python (no torch, an old timm...) cannot be made inside this test environment, and the PyTorch
# extension (`PyTorchUtils`) is a Slicer module, not a PyPI package. These stand-ins keep a set of "installed"
# packages that the real install logic reads (MedDINOv3SegmentLib.dependencies: `versionOf`) and that the fake
# installers change, with the signatures of the real functions (checked against Slicer 5.8's slicer/util.py
# `pip_install(requirements)` and SlicerPyTorch's `PyTorchUtilsLogic.installTorch(askConfirmation=False,
# forceComputationBackend=None, torchVersionRequirement=None)`), recording every call.


class FakePythonPackages:
    """Installed packages as name -> version; `versionOf(name)` answers like `dependencies.installedVersion`."""

    def __init__(self, versions: dict[str, str]):
        self.versions = dict(versions)

    def versionOf(self, name: str) -> str | None:
        return self.versions.get(name)


class FakePyTorchUtils:
    """Stand-in for the PyTorch extension's ``PyTorchUtils`` module. ``installTorch`` records its keyword arguments,
    calls ``during()`` (to look at the GUI state while installing), then "installs" ``torch_version`` (and
    torchvision) and returns a module, or raises ``error`` when one is given. ``module()`` is what
    ``import PyTorchUtils`` should find (``sys.modules``)."""

    def __init__(self, packages: FakePythonPackages, torch_version: str = "2.8.0", torchvision_version: str = "0.23.0",
                 error: Exception | None = None, during=None):
        self.packages = packages
        self.torch_version = torch_version
        self.torchvision_version = torchvision_version
        self.error = error
        self.during = during
        self.calls: list[dict] = []

    def module(self) -> types.ModuleType:
        fake = self
        module = types.ModuleType("PyTorchUtils", "Headless stand-in for the PyTorch extension's PyTorchUtils module.")

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
                fake.calls.append({"askConfirmation": askConfirmation, "forceComputationBackend": forceComputationBackend,
                                   "torchVersionRequirement": torchVersionRequirement})
                if fake.during is not None:
                    fake.during()
                if fake.error is not None:
                    raise fake.error
                fake.packages.versions.update(torch=fake.torch_version, torchvision=fake.torchvision_version)
                return types.SimpleNamespace(__version__=fake.torch_version)

        module.PyTorchUtilsLogic = PyTorchUtilsLogic
        return module


class FakePip:
    """Stand-in for ``slicer.util.pip_install(requirements)``: records the requirement list of each call, calls
    ``during()``, then either raises ``subprocess.CalledProcessError`` (``fail``, as Slicer's does when pip exits
    non-zero) or "installs" each requirement: ``name==V`` and ``name>=A,<=B`` as V / B, ``name>=A`` as A."""

    def __init__(self, packages: FakePythonPackages, fail: bool = False, during=None):
        self.packages = packages
        self.fail = fail
        self.during = during
        self.calls: list[list[str]] = []

    def __call__(self, requirements) -> None:
        import re
        import shlex
        import subprocess

        if isinstance(requirements, str):
            requirements = shlex.split(requirements)
        self.calls.append(list(requirements))
        if self.during is not None:
            self.during()
        if self.fail:
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *requirements])
        for requirement in requirements:
            name, rest = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
            versions = re.findall(r"[0-9][0-9.]*", rest)
            self.packages.versions[name] = versions[-1] if versions else "1.0"


class RecordingDialogs:
    """Stand-ins for ``slicer.util.confirmOkCancelDisplay`` (answers ``answer``) and ``slicer.util.errorDisplay``:
    the texts they were shown are in ``questions`` and ``errors``."""

    def __init__(self, answer: bool = True):
        self.answer = answer
        self.questions: list[str] = []
        self.errors: list[str] = []

    def confirmOkCancelDisplay(self, text, windowTitle=None, parent=None, **kwargs) -> bool:
        self.questions.append(text)
        return self.answer

    def errorDisplay(self, text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
        self.errors.append(text)


def install_fakes(monkeypatch, packages: FakePythonPackages, pytorch_utils: FakePyTorchUtils | None = None,
                  pip: FakePip | None = None, dialogs: RecordingDialogs | None = None) -> RecordingDialogs:
    """Put the fakes where Slicer code finds them (``sys.modules["PyTorchUtils"]``, ``slicer.util.pip_install``,
    the two dialogs), through pytest's ``monkeypatch`` so that they are removed after the test. Without
    ``pytorch_utils`` there is no PyTorch extension. Returns the dialogs."""
    import slicer

    dialogs = dialogs or RecordingDialogs()
    if pytorch_utils is not None:
        monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils.module())
    else:
        monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # `import PyTorchUtils` raises ImportError
    monkeypatch.setattr(slicer.util, "pip_install", pip or FakePip(packages))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", dialogs.confirmOkCancelDisplay)
    monkeypatch.setattr(slicer.util, "errorDisplay", dialogs.errorDisplay)
    return dialogs
