"""Which models the Segment module offers, and importing / registering more (no Slicer, no Qt).

Listing reads only small description files (`model.json`, nnU-Net `dataset.json`, the manifest), never weights,
never touches the network (manifest `hf:` models are downloaded by the segmentation child process) and imports
neither torch, timm nor safetensors (`meddinov3.catalog`): a fresh Slicer lists models before they are installed.
Registering and importing validate the model with the core, which needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from meddinov3.files import read_json_or

from .errors import MedDINOv3SegmentError

SOURCES = ("manifest", "imported", "trained", "nnU-Net folder")


def _core(what: str):
    """Import a core module, turning a missing dependency into a clear error."""
    import importlib

    try:
        return importlib.import_module(what)
    except ImportError as e:
        raise MedDINOv3SegmentError(
            f"The MedDINOv3 core cannot be imported ({e}); install the missing Python packages with the Install "
            "button at the top of the MedDINOv3 Segment or MedDINOv3 Train module panel.") from None


def _readJson(path: Path) -> dict:
    """The JSON object in `path`, or {} for a missing, unreadable or non-object file (a listing never raises)."""
    data = read_json_or(path, {})
    return data if isinstance(data, dict) else {}


def _classNames(classes) -> list[str]:
    names = []
    for item in classes or []:
        if isinstance(item, dict):
            if int(item.get("value", 1)) != 0:
                names.append(str(item.get("name", "")))
        elif isinstance(item, str) and item.lower() != "background":
            names.append(item)
    return names


def describeFolder(path: str | os.PathLike) -> dict:
    """Light description of a local model: kind, format, class names, licence, description (no weights read)."""
    path = Path(path)
    package = path / "model.json" if path.is_dir() else (path if path.name == "model.json" else None)
    if package is not None and package.is_file():
        data = _readJson(package)
        if data.get("format") == "meddinov3-model":
            return {"format": "package", "kind": data.get("kind", "segmentation"), "name": data.get("name", path.name),
                    "classes": _classNames(data.get("classes")), "license": data.get("license", ""),
                    "description": data.get("description", ""), "modality": data.get("modality", "")}
        return {"format": "unknown", "kind": "unknown", "classes": [], "license": "", "description": ""}
    if path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file():
        labels = _readJson(path / "dataset.json").get("labels") or {}
        names = [name for name, value in sorted(labels.items(), key=lambda kv: str(kv[1]))
                 if name not in ("background", "ignore") and value != 0]
        return {"format": "nnunet", "kind": "segmentation", "name": path.name, "classes": names, "license": "",
                "description": "nnU-Net v2 result folder"}
    if path.suffix == ".pth" or (path.is_dir() and any(path.glob("*.pth"))):
        return {"format": "checkpoint", "kind": "backbone", "name": path.stem, "classes": [], "license": "",
                "description": "pretrained backbone checkpoint (no segmentation decoder)"}
    return {"format": "unknown", "kind": "unknown", "name": path.name, "classes": [], "license": "", "description": ""}


def _row(name: str, reference: str, source: str, info: dict) -> dict:
    kind = info.get("kind", "segmentation")
    return {
        "name": name,
        "reference": reference,
        "source": source,
        "kind": kind,
        "segmentable": kind == "segmentation",
        "classes": list(info.get("classes", [])),
        "license": info.get("license", ""),
        "description": info.get("description", ""),
    }


def listModels(segmentableOnly: bool = True) -> list[dict]:
    """Rows for the model selector: manifest, imported, trained (registered packages) and nnU-Net folders."""
    from meddinov3 import catalog, resources

    entries = {e["name"]: e for e in catalog.load_manifest()}
    rows = []
    for item in catalog.list_models():
        source, ref = item["source"], str(item["ref"])
        if source == "manifest":
            entry = entries.get(item["name"], {})
            info = {"kind": entry.get("kind", "segmentation"), "classes": _classNames(entry.get("classes")),
                    "license": entry.get("license", ""),
                    "description": entry.get("description") or entry.get("title", "")}
            if not ref.startswith("hf:"):
                local = describeFolder(resources.resources_dir() / ref)
                info.update({k: v for k, v in local.items() if v and k in ("kind", "classes", "license", "description")})
            rows.append(_row(item["name"], item["name"], "manifest", info))
        elif source == "imported":
            rows.append(_row(item["name"], ref, "imported", describeFolder(ref)))
        else:  # registered
            info = describeFolder(ref)
            rows.append(_row(item["name"], ref, "nnU-Net folder" if info["format"] == "nnunet" else "trained", info))
    if segmentableOnly:
        rows = [row for row in rows if row["segmentable"]]
    return rows


def modelInfo(reference: str) -> dict:
    """What the model panel shows for `reference` (a listed reference, a path or a manifest name)."""
    if not reference:
        raise MedDINOv3SegmentError("No model selected.")
    for row in listModels(segmentableOnly=False):
        if reference in (row["reference"], row["name"]):
            return dict(row, path=row["reference"] if row["source"] != "manifest" else "")
    path = Path(reference).expanduser()
    if path.exists():
        return dict(_row(path.name, str(path), "file", describeFolder(path)), path=str(path))
    raise MedDINOv3SegmentError(f"Unknown model: {reference}")


def registerModel(path: str | os.PathLike) -> str:
    """Validate a trained model folder (package or nnU-Net result) and add it to the user's registry."""
    checkpoints = _core("meddinov3.checkpoints")
    path = Path(path).expanduser()
    if not path.exists():
        raise MedDINOv3SegmentError(f"Cannot register {path}: no such file or folder.")
    try:
        checkpoints.describe(str(path), offline=True)
    except Exception as e:  # CheckpointError and anything a broken file raises
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedDINOv3SegmentError(f"Cannot register {path}: not a usable model ({message}).") from None
    return checkpoints.register_model(path)


def importModel(path: str | os.PathLike, name: str | None = None) -> str:
    """Copy a downloaded weights file or model folder into the user's store; returns its model reference."""
    checkpoints = _core("meddinov3.checkpoints")
    try:
        return str(checkpoints.import_file(path, name=name))
    except (FileExistsError, OSError) as e:
        raise MedDINOv3SegmentError(f"Cannot import {path}: {e}") from None
    except Exception as e:
        raise MedDINOv3SegmentError(f"Cannot import {path}: {str(e).strip().splitlines()[0]}") from None
