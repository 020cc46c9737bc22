"""The project's own model package: a folder with `model.json` and `.safetensors` weights.

`model.json` is everything the engine and the Slicer modules need besides the weights: architecture, classes
(names, colours, SNOMED CT terminology), in-plane spacing, normalisation, patch size, provenance and licence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..files import atomic_dir
from .safe_load import CheckpointError

POSTPROCESSING_STEPS = ("largest_component",)
SLICING = ("canonical", "stored")

PACKAGE_FORMAT = "meddinov3-model"
PACKAGE_VERSION = 1
MODEL_JSON = "model.json"


@dataclass
class ClassInfo:
    """One output class. `value` is the label value written to label maps; channel order = list order."""

    value: int
    name: str
    color: tuple[int, int, int] | None = None  # RGB 0-255
    terminology: dict | None = None  # {"category": {...}, "type": {...}, "modifier": {...}} SNOMED CT codes

    def to_dict(self) -> dict:
        d = {"value": self.value, "name": self.name}
        if self.color is not None:
            d["color"] = list(self.color)
        if self.terminology:
            d["terminology"] = self.terminology
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassInfo":
        color = d.get("color")
        return cls(int(d["value"]), str(d["name"]), tuple(int(c) for c in color) if color else None, d.get("terminology"))


@dataclass
class ModelSpec:
    """What a model is and how its input must be prepared (the content of `model.json`)."""

    name: str
    config: ModelConfig
    classes: list[ClassInfo]
    kind: str = "segmentation"  # or "backbone" (pretrained features, no decoder)
    modality: str = "CT"
    spacing: tuple[float, float] | None = None  # target in-plane spacing (row, column) = (y, x) in mm
    patch_size: tuple[int, int] | None = None  # sliding-window tile (rows, columns)
    normalization: dict = field(default_factory=lambda: {"scheme": "ct_hu"})
    mirroring_axes: tuple[int, ...] = (0, 1)  # in-plane axes allowed for test-time mirroring
    transpose_in_plane: bool = False  # nnU-Net transpose_forward [0, 2, 1]: the network saw (x, y) slices
    # "canonical": slices of the engine's (S, P, L) view (the project's own packages); "stored": nnU-Net's convention,
    # slices of the array as the file stores it, after `nnunet["transpose_forward"]` (engine.nnunet_mode)
    slicing: str = "canonical"
    # for "stored": transpose_forward/backward, resampling_data/resampling_probabilities {order, order_z,
    # force_separate_z}, training_orientation (e.g. "RAS" or None: the array as stored)
    nnunet: dict | None = None
    skip_empty_slices: bool = False  # slices that are all air may be skipped (background)
    fast: dict | None = None  # e.g. {"spacing": [1.5, 1.5]}: lower resolution for CPU fast mode
    postprocessing: list[dict] = field(default_factory=list)  # steps the engine applies (engine.postprocess)
    weights: list[str] = field(default_factory=lambda: ["model.safetensors"])  # one file per fold
    folds: list[str] = field(default_factory=lambda: ["0"])
    description: str = ""
    license: str = ""
    provenance: dict = field(default_factory=dict)

    def with_folds(self, folds: list[str] | None, source) -> tuple["ModelSpec", list[int]]:
        """This spec restricted to `folds` (in that order) and their indices in `self.folds` (None: every fold).

        The one place a fold selection is checked, whether the weights are still to be read (`read_model`) or the
        networks already built (`LoadedModel.with_folds`). CheckpointError naming `source` for an unknown fold."""
        if folds is None:
            return self, list(range(len(self.folds)))
        missing = [f for f in folds if f not in self.folds]
        if missing:
            raise CheckpointError(f"{source}: no fold(s) {', '.join(missing)} (has {', '.join(self.folds)})")
        keep = [self.folds.index(f) for f in folds]
        weights = [self.weights[i] for i in keep] if len(self.weights) == len(self.folds) else self.weights
        return self.replace(weights=weights, folds=list(folds)), keep

    def to_dict(self) -> dict:
        return {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_VERSION,
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "modality": self.modality,
            "architecture": self.config.to_dict(),
            "classes": [c.to_dict() for c in self.classes],
            "spacing": list(self.spacing) if self.spacing else None,
            "patch_size": list(self.patch_size) if self.patch_size else None,
            "normalization": self.normalization,
            "mirroring_axes": list(self.mirroring_axes),
            "transpose_in_plane": self.transpose_in_plane,
            "slicing": self.slicing,
            "nnunet": self.nnunet,
            "skip_empty_slices": self.skip_empty_slices,
            "fast": self.fast,
            "postprocessing": self.postprocessing,
            "weights": list(self.weights),
            "folds": list(self.folds),
            "license": self.license,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "model.json") -> "ModelSpec":
        if d.get("format") != PACKAGE_FORMAT:
            raise CheckpointError(f"{source}: not a MedDINOv3 model package (format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > PACKAGE_VERSION:
            raise CheckpointError(f"{source}: package format version {d['format_version']} is newer than this "
                                  f"software supports ({PACKAGE_VERSION}); update meddinov3")
        try:
            return cls(
                name=d["name"],
                config=ModelConfig.from_dict(d["architecture"]),
                classes=[ClassInfo.from_dict(c) for c in d.get("classes", [])],
                kind=d.get("kind", "segmentation"),
                modality=d.get("modality", "CT"),
                spacing=tuple(d["spacing"]) if d.get("spacing") else None,
                patch_size=tuple(d["patch_size"]) if d.get("patch_size") else None,
                normalization=d.get("normalization") or {"scheme": "ct_hu"},
                mirroring_axes=tuple(d.get("mirroring_axes", (0, 1))),
                transpose_in_plane=bool(d.get("transpose_in_plane", False)),
                slicing=check_slicing(d.get("slicing", "canonical"), d.get("nnunet")),
                nnunet=d.get("nnunet"),
                skip_empty_slices=bool(d.get("skip_empty_slices", False)),
                fast=d.get("fast"),
                postprocessing=check_postprocessing(d.get("postprocessing"), [c["value"] for c in d.get("classes", [])]),
                weights=list(d.get("weights", ["model.safetensors"])),
                folds=[str(f) for f in d.get("folds", [str(i) for i in range(len(d.get("weights", [1])))])],
                description=d.get("description", ""),
                license=d.get("license", ""),
                provenance=d.get("provenance", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid model.json ({type(e).__name__}: {e})") from None

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


def check_slicing(slicing, nnunet) -> str:
    """Validate `slicing` (ValueError otherwise): "stored" needs the nnU-Net block that says how to slice."""
    if slicing not in SLICING:
        raise ValueError(f"'slicing' must be one of {', '.join(SLICING)}, got {slicing!r}")
    if slicing == "stored":
        if not isinstance(nnunet, dict) or not all(k in nnunet for k in ("transpose_forward", "transpose_backward",
                                                                         "resampling_data", "resampling_probabilities")):
            raise ValueError("'slicing': 'stored' needs an 'nnunet' block with transpose_forward, transpose_backward, "
                             "resampling_data and resampling_probabilities")
        if nnunet.get("training_orientation") is not None:
            from ..volumes import check_orientation_code

            check_orientation_code(nnunet["training_orientation"])
    return slicing


def check_postprocessing(steps, label_values) -> list[dict]:
    """Validate a package's `postprocessing` list (ValueError naming the step otherwise).

    A step: {"step": "largest_component", "labels": [values...], "opening_mm": float >= 0}: the union of those
    labels (an organ and its lesions, say) keeps only its largest region (`engine.postprocess.largest_region`)."""
    if steps is None:
        return []
    if not isinstance(steps, list):
        raise ValueError(f"'postprocessing' must be a list of steps, got {type(steps).__name__}")
    known = set(int(v) for v in label_values)
    out = []
    for i, step in enumerate(steps):
        where = f"postprocessing step {i}"
        if not isinstance(step, dict) or step.get("step") not in POSTPROCESSING_STEPS:
            raise ValueError(f"{where}: unknown step {step!r} (known: {', '.join(POSTPROCESSING_STEPS)})")
        extra = set(step) - {"step", "labels", "opening_mm"}
        if extra:
            raise ValueError(f"{where}: unknown keys {sorted(extra)}")
        labels = step.get("labels")
        if not isinstance(labels, list) or not labels or any(not isinstance(v, int) or v not in known or v == 0
                                                              for v in labels):
            raise ValueError(f"{where}: 'labels' must list foreground label values of this model "
                             f"({sorted(known - {0})}), got {labels!r}")
        opening = step.get("opening_mm", 0.0)
        if not isinstance(opening, (int, float)) or not 0 <= opening <= 50:
            raise ValueError(f"{where}: 'opening_mm' must be a number of millimetres in [0, 50], got {opening!r}")
        out.append({"step": step["step"], "labels": list(labels), "opening_mm": float(opening)})
    return out


def is_package(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def read_spec(path: str | os.PathLike) -> ModelSpec:
    path = Path(path)
    json_path = path / MODEL_JSON if path.is_dir() else path
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: cannot read model description ({e})") from None
    return ModelSpec.from_dict(data, source=str(json_path))


def read_weights(package_dir: str | os.PathLike, spec: ModelSpec) -> list[dict[str, torch.Tensor]]:
    """One state dict per fold, in `spec.weights` order."""
    out = []
    for name in spec.weights:
        file = Path(package_dir) / name
        if not file.is_file():
            raise CheckpointError(f"{file}: weights file listed in model.json is missing")
        try:
            out.append(load_file(str(file)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return out


def write_package(out_dir: str | os.PathLike, spec: ModelSpec, state_dicts: list[dict[str, torch.Tensor]],
                  overwrite: bool = False, dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a package atomically: built in a temporary folder beside `out_dir`, then renamed into place.

    `dtype` (e.g. torch.float16) stores floating weights smaller; they are cast back to float32 on load.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if out_dir.exists() and not (out_dir.is_dir() and (is_package(out_dir) or not any(out_dir.iterdir()))):
        raise FileExistsError(f"{out_dir}: exists and is not a model package; --overwrite replaces only a model "
                              "package (or an empty folder), never other files: choose another output")
    if len(state_dicts) != len(spec.weights):
        spec = spec.replace(weights=["model.safetensors"] if len(state_dicts) == 1
                            else [f"fold_{f}.safetensors" for f in spec.folds])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, sd in zip(spec.weights, state_dicts):
            tensors = {}
            for k, v in sd.items():
                v = v.detach().cpu()
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
                tensors[k] = v.contiguous()
            save_file(tensors, str(tmp / name), metadata={"format": PACKAGE_FORMAT})
        (tmp / MODEL_JSON).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def default_classes(num_classes: int) -> list[ClassInfo]:
    return [ClassInfo(0, "background")] + [ClassInfo(i, f"class_{i}") for i in range(1, num_classes)]


def provenance_now(**fields: Any) -> dict:
    import datetime

    from .. import __version__
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "software": f"meddinov3 {__version__}", **fields}
