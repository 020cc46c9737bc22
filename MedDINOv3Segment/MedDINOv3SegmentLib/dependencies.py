"""Python packages the Segment module needs inside Slicer, and installing them after asking (Widget only).

torch comes from the PyTorch extension (`PyTorchUtils`, which picks the CUDA variant); the others are pip
packages. Nothing is ever installed while Slicer runs its tests.
"""

from __future__ import annotations

import importlib.util

#: import name -> pip requirement (lower bounds as the core package needs them)
PIP_PACKAGES = {
    "timm": "timm>=1.0.20",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "SimpleITK": "SimpleITK",
    "slicerio": "slicerio",  # the child writes .seg.nrrd with it
}
#: more for training jobs: curves.png
TRAINING_PIP_PACKAGES = {"matplotlib": "matplotlib"}


def missingPackages(training: bool = False) -> tuple[bool, list[str]]:
    """(torch missing, pip requirements missing); `training` adds what training jobs need."""
    torchMissing = importlib.util.find_spec("torch") is None
    wanted = {**PIP_PACKAGES, **(TRAINING_PIP_PACKAGES if training else {})}
    pipMissing = [req for name, req in wanted.items() if importlib.util.find_spec(name) is None]
    return torchMissing, pipMissing


def deviceChoices() -> list[tuple[str, str]]:
    """(label, device value) pairs: Auto, CPU and one entry per CUDA GPU torch sees (if torch imports)."""
    choices = [("Auto", "auto"), ("CPU", "cpu")]
    if importlib.util.find_spec("torch") is None:
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


def ensureDependencies(askConfirmation: bool = True, training: bool = False) -> bool:
    """Offer to install what is missing (`training`: also what training jobs need). True when everything is
    importable afterwards. Never installs during Slicer's self-tests (`slicer.app.testingEnabled()`).
    """
    import slicer

    torchMissing, pipMissing = missingPackages(training)
    if not torchMissing and not pipMissing:
        return True
    if slicer.app.testingEnabled():
        return False
    if torchMissing:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("MedDINOv3 needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, and open this module again.")
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)
        if torch is None:
            return False
    if pipMissing:
        text = ("MedDINOv3 needs these Python packages, which are not installed in Slicer yet:\n\n  "
                + "\n  ".join(pipMissing) + "\n\nInstall them now? This can take a few minutes.")
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(text, "MedDINOv3: missing packages"):
            return False
        slicer.util.pip_install(" ".join(f'"{req}"' for req in pipMissing))
    torchMissing, pipMissing = missingPackages(training)
    return not torchMissing and not pipMissing

