"""Python packages both MedDINOv3 modules need in Slicer's Python: what is missing or too old, and installing it.

The one list is `Resources/slicer-requirements.txt` (its header explains the format). torch and torchvision come
from the PyTorch extension, which picks the CUDA build that fits the computer; the others from Slicer's pip. The
check reads installed versions from package metadata and imports nothing, so a torch that is too old is never
loaded into Slicer's process (on Windows its loaded files could not be replaced by the upgrade).

`DependencyInstaller` takes its dialogs and installers as callbacks (`slicerInstaller()` gives Slicer's);
`DependenciesSection` is the panel section of both Widgets, written against duck-typed widgets (no Qt import).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REQUIREMENTS_FILE = "slicer-requirements.txt"
#: Installed by the PyTorch extension (never by pip, which would pick a build that may not fit the GPU).
PYTORCH_PACKAGES = ("torch", "torchvision")
_LINE = re.compile(r"^([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)(?:,<=([0-9][0-9.]*))?$")


class DependencyError(Exception):
    """An installation step that cannot run (e.g. no PyTorch extension); the message says what to do."""


@dataclass(frozen=True)
class Requirement:
    """A line of the requirements file: `name>=minimum` or `name>=minimum,<=tested`."""

    name: str
    minimum: str
    tested: str | None = None

    def __str__(self) -> str:
        return f"{self.name}>={self.minimum}" + (f",<={self.tested}" if self.tested else "")

    @property
    def fromPyTorchExtension(self) -> bool:
        return self.name in PYTORCH_PACKAGES


@dataclass(frozen=True)
class Problem:
    """A requirement that is not met: `installed` is None (not installed) or the installed, too old, version."""

    requirement: Requirement
    installed: str | None

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.requirement.name} (not installed)"
        return f"{self.requirement.name} {self.installed} (too old: {self.requirement.name} >= {self.requirement.minimum} needed)"


def requirementsPath() -> Path:
    from meddinov3.resources import resources_dir  # torch-free; beside the modules in an installed extension

    return resources_dir() / REQUIREMENTS_FILE


def readRequirements(path: str | Path | None = None) -> list[Requirement]:
    """The requirements of `path` (default: the extension's `Resources/slicer-requirements.txt`), in file order."""
    path = Path(path) if path else requirementsPath()
    requirements = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{path}, line {number}: expected NAME>=MINIMUM or NAME>=MINIMUM,<=TESTED, not {line!r}")
        requirements.append(Requirement(*match.groups()))
    return requirements


def versionTuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version, to compare: "2.8.0+cu126" -> (2, 8, 0), "1.0.0rc1" -> (1, 0, 0)."""
    numbers = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(numbers)


def installedVersion(name: str) -> str | None:
    """Version of package `name` in this Python: None when it cannot be imported, "" when it can but has no
    metadata (then it is accepted as it is). Imports nothing."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # a broken package counts as missing
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def findProblems(requirements: list[Requirement] | None = None,
                 versionOf: Callable[[str], str | None] = installedVersion) -> list[Problem]:
    """Requirements (default: the extension's list) that are not installed or older than their minimum."""
    importlib.invalidate_caches()  # see what pip installed since the last look (once: it rebuilds path caches)
    problems = []
    for requirement in readRequirements() if requirements is None else requirements:
        installed = versionOf(requirement.name)
        if installed is None or (installed and versionTuple(installed) < versionTuple(requirement.minimum)):
            problems.append(Problem(requirement, installed))
    return problems


def problemsText(problems: list[Problem]) -> str:
    """What the panel section says while `problems` is not empty."""
    if not problems:
        return ""
    return ("MedDINOv3 needs Python packages that are missing or too old in Slicer's Python:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\nPress Install (PyTorch comes through the PyTorch extension; this can take several minutes).")


def _confirmationText(problems: list[Problem]) -> str:
    lines = [f"  {p.requirement}" + ("  (through the PyTorch extension)" if p.requirement.fromPyTorchExtension else "")
             for p in problems]
    return ("Install these Python packages into Slicer's Python?\n\n" + "\n".join(lines)
            + "\n\nThis downloads them from the internet and can take several minutes (PyTorch with CUDA is a few GB). "
            "Progress is shown in the Python console.")


class DependencyInstaller:
    """Installs what `findProblems` reports, after asking once. PyTorch goes first, through the PyTorch extension:
    pip would otherwise bring torch from PyPI as a dependency of timm, a build that may not fit the GPU. Then the
    others with pip, with Slicer's installed numpy pinned so that pip never replaces it.

    Callbacks: `confirm(text) -> bool`; `installTorch(versionRequirement)` returns the torch module, or None when
    nothing was installed, and raises on failure; `pipInstall(requirements: list[str])` raises
    `subprocess.CalledProcessError` when pip fails; `showError(text)` shows one message; `versionOf(name)` as
    `installedVersion`.
    """

    def __init__(self, confirm: Callable[[str], bool], installTorch: Callable[[str], object],
                 pipInstall: Callable[[list], None], showError: Callable[[str], None],
                 versionOf: Callable[[str], str | None] = installedVersion,
                 requirements: list[Requirement] | None = None):
        self.confirm = confirm
        self.installTorch = installTorch
        self.pipInstall = pipInstall
        self.showError = showError
        self.versionOf = versionOf
        self.requirements = readRequirements() if requirements is None else requirements

    def problems(self) -> list[Problem]:
        return findProblems(self.requirements, self.versionOf)

    def install(self) -> bool:
        """Ask, install, re-check. True when nothing is missing afterwards; every failure is shown with `showError`."""
        problems = self.problems()
        if not problems:
            return True
        if not self.confirm(_confirmationText(problems)):
            return False
        pipRequirements = [str(p.requirement) for p in problems if not p.requirement.fromPyTorchExtension]
        try:
            if any(p.requirement.fromPyTorchExtension for p in problems):
                self._installTorch()
            if pipRequirements:
                self.pipInstall(pipRequirements + self._keptNumpy())
        except subprocess.CalledProcessError as e:
            self.showError(f"Installing Python packages failed: {' '.join(map(str, e.cmd or []))} exited with code "
                           f"{e.returncode}. The Python console shows pip's output; check the network connection "
                           "and press Install again.")
            return False
        except DependencyError as e:
            self.showError(str(e))
            return False
        except Exception as e:  # noqa: BLE001 - whatever the PyTorch extension raises, shown as one message
            logging.exception("MedDINOv3: installing Python packages failed")
            self.showError(f"Installing Python packages failed: {e}")
            return False
        remaining = self.problems()
        if remaining:
            self.showError("After the installation these packages are still missing or too old:\n"
                           + "\n".join(f"  {p}" for p in remaining) + "\nRestart Slicer and press Install again.")
        return not remaining

    def _installTorch(self) -> None:
        torch = next(r for r in self.requirements if r.name == "torch")
        if self.installTorch(f">={torch.minimum}") is None:
            raise DependencyError("PyTorch was not installed, so MedDINOv3 cannot run yet. Press Install to try again.")

    def _keptNumpy(self) -> list[str]:
        numpy = self.versionOf("numpy")
        return [f"numpy=={numpy}"] if numpy else []


def slicerInstaller(versionOf: Callable[[str], str | None] = installedVersion) -> DependencyInstaller:
    """A DependencyInstaller with Slicer's dialogs, the PyTorch extension's `installTorch` and `slicer.util.pip_install`."""
    import slicer

    def installTorch(versionRequirement: str):
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError("MedDINOv3 installs PyTorch through the PyTorch extension, which is not installed: "
                                  "install 'PyTorch' with the Extensions Manager, restart Slicer, and press Install "
                                  "again.") from None
        # Asked already (one question for everything); the extension picks the CUDA build for this computer.
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=versionRequirement)

    return DependencyInstaller(
        confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, "MedDINOv3: install Python packages"),
        installTorch=installTorch, pipInstall=lambda requirements: slicer.util.pip_install(requirements),
        showError=lambda text: slicer.util.errorDisplay(text), versionOf=versionOf)


class DependenciesSection:
    """The section at the top of both module panels: shown while a package is missing or too old, with one Install
    button. `frame` is shown or hidden, `label` says what is missing, `panel` (the whole module panel) is disabled
    while installing, `onInstalled()` refreshes what depends on the packages (device and model lists). The Widget
    connects the button to `install`.
    """

    def __init__(self, frame, label, panel, onInstalled: Callable[[], None], installer: DependencyInstaller | None = None):
        self.frame = frame
        self.label = label
        self.panel = panel
        self.onInstalled = onInstalled
        self.installer = installer or slicerInstaller()

    def refresh(self) -> bool:
        """Show or hide the section; True when nothing is missing."""
        problems = self.installer.problems()
        self.frame.setVisible(bool(problems))
        self.label.text = problemsText(problems)
        return not problems

    def ensure(self) -> bool:
        """True when everything is installed; otherwise offers the installation (Segment / Start pressed)."""
        return self.refresh() or self.install()

    def install(self) -> bool:
        import slicer

        self.label.text = "Installing... progress is shown in the Python console."
        self.panel.setEnabled(False)
        slicer.app.processEvents()  # show the disabled panel before pip blocks
        try:
            return self.installer.install()
        finally:
            self.panel.setEnabled(True)
            self.refresh()
            self.onInstalled()


def deviceChoices() -> list[tuple[str, str]]:
    """(label, device value) pairs: Auto, CPU and one entry per GPU torch sees (only when a usable torch is installed)."""
    choices = [("Auto", "auto"), ("CPU", "cpu")]
    torchRequirement = [r for r in readRequirements() if r.name == "torch"]
    if findProblems(torchRequirement):
        return choices
    try:
        import torch

        for index in range(torch.cuda.device_count()):
            choices.append((f"GPU {index}: {torch.cuda.get_device_name(index)}", f"cuda:{index}"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            choices.append(("Apple GPU (MPS)", "mps"))
    except Exception:  # noqa: BLE001 - a broken CUDA set-up still leaves Auto / CPU
        pass
    return choices


def fillDeviceSelector(selector) -> dict[str, str]:
    """Fill a combo box with the `deviceChoices()` labels; returns label -> device value for the Logic."""
    values = dict(deviceChoices())
    selector.clear()
    for label in values:
        selector.addItem(label)
    return values
