"""Where the extension's shared resources (model manifest, demo model, terminology) and the user's model store live."""

from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    """`Resources/` of the extension: beside the package in a checkout, or `MEDDINOV3_RESOURCES`."""
    env = os.environ.get("MEDDINOV3_RESOURCES")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "Resources", here / "Resources"]
    for c in candidates:
        if (c / "models.json").is_file():
            return c
    raise FileNotFoundError("MedDINOv3 Resources folder (with models.json) not found; set MEDDINOV3_RESOURCES")


def user_dir() -> Path:
    """Per-user store for imported and trained models (`MEDDINOV3_HOME`, default ~/.cache/meddinov3)."""
    env = os.environ.get("MEDDINOV3_HOME")
    path = Path(env) if env else Path.home() / ".cache" / "meddinov3"
    path.mkdir(parents=True, exist_ok=True)
    return path
