"""The models this machine offers: the manifest, imported models and registered model folders.

Reads only small JSON files and folder listings, never weights, and imports neither torch, timm nor safetensors: a
fresh 3D Slicer lists models (and shows how to install PyTorch) before any of them is installed. Resolving and
loading a model is `meddinov3.checkpoints`' job.
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import read_json, write_json
from .resources import resources_dir, user_dir

RUN_OUTPUT_FOLDERS = ("model", "backbone")  # what `train` / `pretrain` write inside a run folder


def load_manifest() -> list[dict]:
    """Entries of `Resources/models.json` (name, title, kind, ref, sha256, license, ...)."""
    path = resources_dir() / "models.json"
    return read_json(path)["models"]


def manifest_entry(name_or_ref: str) -> dict | None:
    for entry in load_manifest():
        if name_or_ref in (entry["name"], entry["ref"]):
            return entry
    return None


def imported_model_path(folder: Path) -> Path:
    """An imported single file is stored as `models/<name>/<file>`: the model is the file, not its folder."""
    if folder.is_dir():
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_file():
            return entries[0]
    return folder


def registry_path() -> Path:
    return user_dir() / "registered.json"


def registered_name(path: str) -> str:
    """The name a registered model is listed and resolved by: its folder's name, or its run folder's name when it is
    a run's `model/` or `backbone/` (every trained model would otherwise be called "model")."""
    p = Path(path)
    return p.parent.name if p.name in RUN_OUTPUT_FOLDERS and p.parent.name else p.name


def registered_models() -> list[str]:
    """Model folders registered by the Train module or `registerModel`, that still exist."""
    path = registry_path()
    paths = read_json(path) if path.exists() else []
    return [p for p in paths if Path(p).exists()]


def register_model(path: str | os.PathLike) -> str:
    """Add a model folder to the user's registry (not validated here); returns its absolute path."""
    p = str(Path(path).resolve())
    paths = registered_models()
    if p not in paths:
        paths.append(p)
        write_json(registry_path(), paths)
    return p


def list_models() -> list[dict]:
    """Each model by the name `resolve` finds it by, with the path (or hf: reference) it resolves to.

    Rows: {"name", "source": "manifest" | "imported" | "registered", "ref"}, manifest rows also "kind", "license".
    """
    rows = [{"name": e["name"], "source": "manifest", "kind": e.get("kind", "segmentation"), "ref": e["ref"],
             "license": e.get("license", "")} for e in load_manifest()]
    models_dir = user_dir() / "models"
    if models_dir.is_dir():
        rows += [{"name": p.name, "source": "imported", "ref": str(imported_model_path(p))}
                 for p in sorted(models_dir.iterdir()) if not p.name.startswith(".")]
    rows += [{"name": registered_name(p), "source": "registered", "ref": p} for p in registered_models()]
    return rows
