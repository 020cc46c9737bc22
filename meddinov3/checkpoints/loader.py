"""One entry point for every model layout users have: detect, read, build, convert, describe.

Layouts: the project's model package, nnU-Net v2 result folders of the reference trainers, the official
MedDINOv3 pretrained `model.pth` (`{'teacher': ...}`, `backbone.` prefix), Meta's DINOv3 backbone checkpoints,
and `hf:` references / manifest names that resolve to one of those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..catalog import RUN_OUTPUT_FOLDERS, imported_model_path, manifest_entry, registered_models, registered_name
from ..config import ModelConfig
from ..model import MedDINOv3, build_model
from ..resources import resources_dir, user_dir
from ..volumes import check_orientation_code
from .convert import DROPPED_PREFIXES, dinov3_to_backbone, infer_backbone_config, load_strict, strip_prefix, unwrap_module_prefixes
from .hub import resolve_hf
from .nnunet import is_nnunet_folder, read_nnunet_folder
from .package import ModelSpec, default_classes, is_package, provenance_now, read_spec, read_weights, write_package
from .safe_load import CheckpointError, safe_torch_load

FORMATS = ("package", "nnunet", "meddinov3-pretrained", "dinov3-backbone")


class UnknownModel(CheckpointError):
    pass


def resolve(ref: str | os.PathLike, offline: bool | None = None) -> Path:
    """Path on this machine of a model reference: a path, `hf:...`, a manifest name, an imported name, or the name
    of a registered model (all as `meddinov3 models list` shows them), in this order."""
    ref = os.fspath(ref)
    if ref.startswith("hf:"):
        return resolve_hf(ref, offline=offline)
    path = Path(ref).expanduser()
    if path.exists():
        return path
    entry = manifest_entry(ref)
    if entry is not None:
        target = entry["ref"]
        if target.startswith("hf:"):
            return resolve_hf(target, offline=offline)
        return (resources_dir() / target).resolve()
    imported = user_dir() / "models" / ref
    if imported.exists():
        return imported_model_path(imported)
    registered = [p for p in registered_models() if registered_name(p) == ref]
    if len(registered) > 1:
        raise CheckpointError(f"{ref}: several registered models have this name ({', '.join(registered)}); "
                              "give the path of the one you mean")
    if registered:
        return Path(registered[0])
    raise UnknownModel(f"{ref}: unknown model (not a file or folder, not an hf: reference, not a name in the "
                       "model manifest or among imported or registered models; `meddinov3 models list` shows them)")


def run_package(ref: str | os.PathLike) -> str | os.PathLike | Path:
    """The model package a training or pretraining run folder exported (its `model/`, else `backbone/`), for
    `--base RUN_FOLDER`; any other reference unchanged."""
    path = Path(os.fspath(ref)).expanduser()
    if path.is_dir() and not is_package(path):
        for sub in RUN_OUTPUT_FOLDERS:
            if is_package(path / sub):
                return path / sub
    return ref


def detect_format(path: Path) -> str:
    """"package", "nnunet" or "checkpoint" (a .pth whose layout is known only once loaded) for a resolved path;
    CheckpointError saying what a folder lacks (and which package a run folder holds)."""
    if path.is_dir():
        if is_package(path):
            return "package"
        if is_nnunet_folder(path):
            return "nnunet"
        inner = [path / sub for sub in RUN_OUTPUT_FOLDERS if is_package(path / sub)]
        if inner:
            raise CheckpointError(f"{path}: a training or pretraining run folder; its model package is {inner[0]}")
        if any(path.glob("fold_*/checkpoint_*.pth")):
            missing = [n for n in ("plans.json", "dataset.json") if not (path / n).is_file()]
            raise CheckpointError(f"{path}: nnU-Net result folder without {' and '.join(missing)} (copy the "
                                  "folder whole: the folds need the trainer's plans.json and dataset.json)")
        raise CheckpointError(f"{path}: folder is neither a model package (model.json) nor an nnU-Net result "
                              "folder (plans.json + dataset.json + fold_*)")
    if path.name == "model.json":
        return "package"
    return "checkpoint"  # a .pth file; which layout is known only after loading it


def _read_pth(path: Path) -> tuple[str, ModelSpec, list[dict]]:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(ckpt).__name__}")
    if "network_weights" in ckpt:
        raise CheckpointError(f"{path}: this is one fold of an nnU-Net result folder; pass the folder "
                              "(the one holding plans.json and dataset.json) instead")
    if "teacher" in ckpt:
        fmt, sd = "meddinov3-pretrained", ckpt["teacher"]
        sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
        sd = strip_prefix(sd, "backbone.") if any(k.startswith("backbone.") for k in sd) else sd
    else:
        fmt, sd = "dinov3-backbone", unwrap_module_prefixes(ckpt.get("model", ckpt))
    cfg = infer_backbone_config(sd, str(path))
    converted = {f"backbone.{k}": v for k, v in dinov3_to_backbone(sd, str(path)).items()}
    spec = ModelSpec(name=path.stem, config=cfg, classes=[], kind="backbone",
                     normalization={"scheme": "ct_hu"}, description=f"{fmt} checkpoint {path.name}",
                     provenance={"source": str(path)})
    return fmt, spec, [converted]


def read_model(ref: str | os.PathLike, folds: list[str] | None = None, offline: bool | None = None
               ) -> tuple[str, ModelSpec, list[dict], Path]:
    """Read any layout without building a network: `load_model`, `convert`, `describe` and imports share it.

    Args:
        ref: a path, `hf:` reference or model name (see `resolve`).
        folds: fold names to read (package and nnU-Net folders; CheckpointError for an unknown one); None: all.
        offline: never download.

    Returns (format: one of FORMATS, spec, state dicts in `MedDINOv3` naming (one per fold), resolved path).
    """
    path = resolve(ref, offline=offline)
    fmt = detect_format(path)
    if fmt == "package":
        pkg = path if path.is_dir() else path.parent
        spec, _ = read_spec(pkg).with_folds(folds, pkg)
        return fmt, spec, read_weights(pkg, spec), pkg
    if fmt == "nnunet":
        spec, sds = read_nnunet_folder(path, folds)
        return fmt, spec, sds, path
    fmt, spec, sds = _read_pth(path)
    return fmt, spec, sds, path


def has_decoder(ref: str | os.PathLike, offline: bool | None = None) -> bool:
    """Whether `ref` (any layout, a run folder too) is a segmentation model, from its metadata alone (no weights
    read): a package's model.json says which; an nnU-Net result folder always is; a .pth file is a backbone."""
    path = resolve(run_package(ref), offline=offline)
    fmt = detect_format(path)
    if fmt == "package":
        return read_spec(path if path.is_dir() else path.parent).kind == "segmentation"
    return fmt == "nnunet"


@dataclass
class LoadedModel:
    """A segmentation model ready to run: its description and one network per fold."""

    spec: ModelSpec
    networks: list[MedDINOv3]
    format: str
    path: Path

    def with_folds(self, folds: list[str] | None) -> "LoadedModel":
        """The same networks restricted to `folds` (None: this model itself); nothing is read or copied."""
        if folds is None:
            return self
        spec, keep = self.spec.with_folds(folds, self.path)
        return LoadedModel(spec, [self.networks[i] for i in keep], self.format, self.path)


def network_from_state_dict(cfg: ModelConfig, state_dict: dict, source: str) -> MedDINOv3:
    """`build_model(cfg)` with `state_dict` loaded strictly (CheckpointError naming `source` for missing or
    unexpected keys); on the CPU, in train mode."""
    net = build_model(cfg)
    load_strict(net, state_dict, source)
    return net


def load_model(ref: str | os.PathLike | LoadedModel, device: str | torch.device = "cpu",
               folds: list[str] | None = None, offline: bool | None = None) -> LoadedModel:
    """Load a segmentation model of any layout onto `device`, in eval mode.

    Args:
        ref: a path (package, nnU-Net result folder, .pth), `hf:` reference or model name (see `resolve`); or an
            already `LoadedModel`, returned restricted to `folds` (its networks stay where they are).
        device: where the networks go.
        folds: fold names to load (their probabilities are averaged); None: every fold.
        offline: never download (default: `HF_HUB_OFFLINE` / `MEDDINOV3_OFFLINE`).

    Returns a `LoadedModel`: the spec (classes, spacing, normalisation, ...) and one network per fold. Raises
    CheckpointError for a pretrained backbone (no decoder) or an unknown fold, UnknownModel for an unknown `ref`.
    """
    if isinstance(ref, LoadedModel):
        return ref.with_folds(folds)
    fmt, spec, sds, path = read_model(ref, folds=folds, offline=offline)
    if spec.kind != "segmentation":
        raise CheckpointError(f"{path}: this is a pretrained backbone without a segmentation decoder; fine-tune it "
                              "first (`meddinov3 train --base ...`)")
    nets = [network_from_state_dict(spec.config, sd, str(path)).to(device).eval() for sd in sds]
    return LoadedModel(spec, nets, fmt, path)


def load_backbone(ref: str | os.PathLike, offline: bool | None = None) -> tuple[ModelConfig, dict, ModelSpec]:
    """Backbone weights (keys without `backbone.`) and architecture of any layout, for `train/pretrain --base`.

    A training or pretraining run folder is accepted too: its exported `model/` or `backbone/` package is used.
    Returns (architecture, backbone state dict, spec of the source).
    """
    fmt, spec, sds, path = read_model(run_package(ref), folds=None, offline=offline)
    backbone = strip_prefix(sds[0], "backbone.")
    return spec.config, backbone, spec


def convert(ref: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
            name: str | None = None, offline: bool | None = None, training_orientation: str | None = None) -> Path:
    """Write any supported layout as a model package (`meddinov3 convert SRC -o DIR`).

    nnU-Net result folders keep nnU-Net's convention (`slicing: "stored"`); `training_orientation` (e.g. "RAS")
    records how their training files were stored."""
    fmt, spec, sds, path = read_model(ref, offline=offline)
    if training_orientation is not None:
        if spec.slicing != "stored":
            raise CheckpointError(f"{path}: --training-orientation is for nnU-Net result folders (and packages "
                                  "converted from them); this model slices the engine's canonical view")
        spec = spec.replace(nnunet={**spec.nnunet, "training_orientation": check_orientation_code(training_orientation)})
    if spec.kind == "segmentation" and not spec.classes:
        spec = spec.replace(classes=default_classes(spec.config.num_classes))
    spec = spec.replace(name=name or spec.name,
                        provenance={**spec.provenance, **provenance_now(converted_from=str(path), source_format=fmt)})
    return write_package(out_dir, spec, sds, overwrite=overwrite)


def describe(ref: str | os.PathLike, offline: bool | None = None) -> dict:
    """What `meddinov3 info MODEL` prints."""
    fmt, spec, sds, path = read_model(ref, offline=offline)
    n_params = sum(v.numel() for k, v in sds[0].items() if not k.endswith(("periods", "k_bias")))
    return {
        "format": fmt,
        "path": str(path),
        "name": spec.name,
        "kind": spec.kind,
        "architecture": spec.config.to_dict(),
        "parameters": n_params,
        "classes": [c.to_dict() for c in spec.classes],
        "spacing": list(spec.spacing) if spec.spacing else None,
        "normalization": spec.normalization,
        "patch_size": list(spec.patch_size) if spec.patch_size else None,
        "folds": spec.folds,
        "slicing": spec.slicing,
        "modality": spec.modality,
        "license": spec.license,
    }
