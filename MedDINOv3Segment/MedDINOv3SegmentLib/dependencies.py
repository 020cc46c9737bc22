"""Python packages the Segment module needs inside Slicer, and installing them after asking (Widget only).

torch comes from the PyTorch extension (`PyTorchUtils`, which picks the CUDA variant); the others are pip
packages. Nothing is ever installed while Slicer runs its tests.
"""

from __future__ import annotations

import importlib.util

#: import name -> pip requirement
PIP_PACKAGES = {
    "timm": "timm",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "skimage": "scikit-image",
    "SimpleITK": "SimpleITK",
}


def missingPackages() -> tuple[bool, list[str]]:
    """(torch missing, pip requirements missing)."""
    torchMissing = importlib.util.find_spec("torch") is None
    pipMissing = [req for name, req in PIP_PACKAGES.items() if importlib.util.find_spec(name) is None]
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


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Offer to install what is missing. True when everything is importable afterwards.

    Never installs during Slicer's self-tests (`slicer.app.testingEnabled()`).
    """
    import slicer

    torchMissing, pipMissing = missingPackages()
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
        slicer.util.pip_install(" ".join(pipMissing))
    torchMissing, pipMissing = missingPackages()
    return not torchMissing and not pipMissing

