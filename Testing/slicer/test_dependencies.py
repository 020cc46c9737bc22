"""Python packages in Slicer: the one requirements list, the check (missing / too old), and the Install path.

The install path runs the real `DependenciesSection` / `DependencyInstaller` / `slicerInstaller` code against the
harness's fakes (Testing/slicer_headless.py): a fake PyTorch extension and a fake `slicer.util.pip_install` that
record their calls and change a fake set of installed packages, and recording dialogs. The panel widgets are
minimal stand-ins (Qt cannot run here). The check itself is run for real, on this Python and in a child process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from Testing.slicer_headless import FakePip, FakePyTorchUtils, FakePythonPackages, install_fakes

REPO = Path(__file__).resolve().parents[2]
#: What a Slicer with everything the core needs has (Slicer 5.8's numpy; pip packages at their minimums).
COMPLETE = {"numpy": "1.26.4", "torch": "2.8.0", "torchvision": "0.23.0", "timm": "1.0.30", "safetensors": "0.7.0",
            "huggingface_hub": "1.8.0", "slicerio": "1.4.0", "tqdm": "4.70.1", "matplotlib": "3.9.4",
            "scipy": "1.13.1", "SimpleITK": "2.4.0"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[_normalized(match.group(1))] = match.group(2)
    return pins


def test_requirements_agree_with_the_lock_file_and_pyproject(headless_slicer):
    """Each pip package is capped at the version requirements.lock pins (what CI tests), which must meet its
    minimum; the list holds every dependency of pyproject.toml except numpy, which is Slicer's own, and the DICOM SEG
    writer's packages (`segment --output-format dicom-seg`, imported only there), which the modules do not offer."""
    import tomllib

    from MedDINOv3SegmentLib.dependencies import readRequirements, versionTuple

    requirements = readRequirements()
    lock = _pins((REPO / "requirements.lock").read_text().splitlines())
    pyproject = _pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    assert {_normalized(r.name) for r in requirements} == set(pyproject) - {"numpy", "highdicom", "pydicom"}
    for requirement in requirements:
        tested = lock[_normalized(requirement.name)]
        assert versionTuple(tested) >= versionTuple(requirement.minimum), requirement
        if requirement.fromPyTorchExtension:
            assert requirement.tested is None, f"{requirement}: the PyTorch extension picks the version"
        else:
            assert requirement.tested == tested, f"{requirement} is not capped at requirements.lock's {tested}"
    assert [str(r) for r in requirements if r.name == "torch"] == ["torch>=2.6"]


def test_a_malformed_requirement_line_names_the_file_and_line(headless_slicer, tmp_path):
    from MedDINOv3SegmentLib.dependencies import readRequirements

    path = tmp_path / "req.txt"
    path.write_text("# comment\ntimm>=1.0.20  # why\n\ntimm==1.0.31\n")
    with pytest.raises(ValueError, match=r"req\.txt, line 4: expected NAME>=MINIMUM"):
        readRequirements(path)


def test_installed_versions_come_from_metadata_without_importing(tmp_path):
    """In a fresh process: the real check finds this environment complete, reads torch's version, and imports
    neither torch nor timm (a too-old torch must not be loaded into Slicer's process)."""
    code = ("import json, sys; from MedDINOv3SegmentLib.dependencies import findProblems, installedVersion, Requirement\n"
            "too_old = findProblems([Requirement('timm', '99.0'), Requirement('no-such-package-meddinov3', '1.0')])\n"
            "print(json.dumps({'problems': [str(p) for p in findProblems()], 'torch': installedVersion('torch'),\n"
            "                  'imported': sorted({'torch', 'timm'} & set(sys.modules)), 'too_old': [str(p) for p in too_old]}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "MedDINOv3Segment")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    import timm
    import torch

    assert json.loads(result.stdout) == {
        "problems": [], "torch": torch.__version__.split("+")[0], "imported": [],
        "too_old": [f"timm {timm.__version__} (too old: timm >= 99.0 needed)", "no-such-package-meddinov3 (not installed)"]}


def test_version_comparison_ignores_local_and_pre_release_parts(headless_slicer):
    from MedDINOv3SegmentLib.dependencies import versionTuple

    assert versionTuple("2.8.0+cu126") == (2, 8, 0) and versionTuple("1.0.0rc1") == (1, 0, 0)
    assert versionTuple("2.10.1") > versionTuple("2.6") > versionTuple("2.5.1")


# ---------------------------------------------------------------------------------------------
# The Install path: DependenciesSection on stand-in widgets, Slicer's installer with the fakes
# ---------------------------------------------------------------------------------------------


class Frame:
    """Stand-in for the section's QFrame and the module panel: visibility and enabled state."""

    def __init__(self):
        self.visible = True
        self.enabled = True

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)


class Label:
    text = ""


class Panel:
    """A module panel's section with its refresh callback; `enabledWhileInstalling` is read by the fakes."""

    def __init__(self, packages: FakePythonPackages):
        from MedDINOv3SegmentLib.dependencies import DependenciesSection, slicerInstaller

        self.frame, self.label, self.panel = Frame(), Label(), Frame()
        self.refreshed = 0
        self.enabledWhileInstalling: list[bool] = []
        self.section = DependenciesSection(self.frame, self.label, self.panel, self._onInstalled,
                                           installer=slicerInstaller(versionOf=packages.versionOf))

    def _onInstalled(self) -> None:
        self.refreshed += 1

    def during(self) -> None:
        self.enabledWhileInstalling.append(self.panel.enabled)


def _setup(monkeypatch, versions: dict, pip_fails: bool = False, extension: bool = True, torch_error=None):
    packages = FakePythonPackages(versions)
    panel = Panel(packages)
    torch_utils = FakePyTorchUtils(packages, error=torch_error, during=panel.during) if extension else None
    pip = FakePip(packages, fail=pip_fails, during=panel.during)
    dialogs = install_fakes(monkeypatch, packages, torch_utils, pip)
    return packages, panel, torch_utils, pip, dialogs


def test_nothing_missing_hides_the_section(headless_slicer, monkeypatch):
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, COMPLETE)
    assert panel.section.refresh() and not panel.frame.visible and panel.label.text == ""
    assert panel.section.ensure() and not dialogs.questions and not pip.calls and not torch_utils.calls


def test_missing_torch_is_installed_through_the_pytorch_extension(headless_slicer, monkeypatch):
    versions = {k: v for k, v in COMPLETE.items() if k not in ("torch", "torchvision")}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions)
    assert not panel.section.refresh() and panel.frame.visible
    assert "torch (not installed)" in panel.label.text and "torchvision (not installed)" in panel.label.text
    assert panel.section.install()
    assert len(dialogs.questions) == 1 and "torch>=2.6  (through the PyTorch extension)" in dialogs.questions[0]
    assert torch_utils.calls == [{"askConfirmation": False, "forceComputationBackend": None,
                                  "torchVersionRequirement": ">=2.6"}]
    assert pip.calls == [] and dialogs.errors == []
    assert panel.enabledWhileInstalling == [False] and panel.panel.enabled
    assert not panel.frame.visible and panel.refreshed == 1  # device and model lists rebuilt


def test_too_old_torch_shows_and_is_upgraded(headless_slicer, monkeypatch):
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, dict(COMPLETE, torch="2.5.1"))
    assert not panel.section.refresh()
    assert "torch 2.5.1 (too old: torch >= 2.6 needed)" in panel.label.text
    assert panel.section.ensure()  # Segment / Start pressed: offers the installation
    assert [call["torchVersionRequirement"] for call in torch_utils.calls] == [">=2.6"]
    assert packages.versions["torch"] == "2.8.0" and not panel.frame.visible and not pip.calls


def test_missing_timm_is_installed_with_pip_keeping_slicers_numpy(headless_slicer, monkeypatch):
    versions = {k: v for k, v in COMPLETE.items() if k != "timm"}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions)
    assert panel.section.install()
    assert pip.calls == [["timm>=1.0.20,<=1.0.31", "numpy==1.26.4"]] and not torch_utils.calls
    assert panel.enabledWhileInstalling == [False] and panel.panel.enabled and not panel.frame.visible


def test_torch_goes_first_and_pip_waits_for_it(headless_slicer, monkeypatch):
    """With torch and timm missing, torch comes from the PyTorch extension before pip installs timm (which
    would otherwise pull a torch from PyPI); when installing torch fails, pip is not run at all."""
    versions = {k: v for k, v in COMPLETE.items() if k not in ("torch", "timm")}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions)
    order = []
    torch_utils.during = lambda: order.append("torch")
    pip.during = lambda: order.append("pip")
    assert panel.section.install() and order == ["torch", "pip"]

    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions, torch_error=RuntimeError("ltt failed"))
    assert not panel.section.install()
    assert not pip.calls and dialogs.errors == ["Installing Python packages failed: ltt failed"]
    assert panel.panel.enabled and panel.frame.visible


def test_pip_failure_is_shown_in_a_dialog_and_the_panel_comes_back(headless_slicer, monkeypatch):
    versions = {k: v for k, v in COMPLETE.items() if k != "timm"}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions, pip_fails=True)
    assert not panel.section.install()
    assert len(dialogs.errors) == 1 and "pip install timm>=1.0.20,<=1.0.31 numpy==1.26.4 exited with code 1" in dialogs.errors[0]
    assert panel.enabledWhileInstalling == [False] and panel.panel.enabled
    assert panel.frame.visible and "timm (not installed)" in panel.label.text and panel.refreshed == 1


def test_without_the_pytorch_extension_the_dialog_says_how_to_get_it(headless_slicer, monkeypatch):
    versions = {k: v for k, v in COMPLETE.items() if k != "torch"}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions, extension=False)
    assert not panel.section.install()
    assert len(dialogs.errors) == 1 and "Extensions Manager" in dialogs.errors[0] and not pip.calls


def test_nothing_is_installed_when_the_user_declines(headless_slicer, monkeypatch):
    versions = {k: v for k, v in COMPLETE.items() if k not in ("torch", "timm")}
    packages, panel, torch_utils, pip, dialogs = _setup(monkeypatch, versions)
    dialogs.answer = False
    assert not panel.section.ensure()
    assert len(dialogs.questions) == 1 and not torch_utils.calls and not pip.calls and not dialogs.errors
    assert panel.panel.enabled and panel.frame.visible
