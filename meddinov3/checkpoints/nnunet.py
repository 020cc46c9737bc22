"""nnU-Net v2 result folders of the MedDINOv3 reference trainers, read without nnU-Net installed.

Layout: `<Trainer>__<Plans>__<configuration>/{dataset.json, plans.json, fold_N/checkpoint_final.pth}`.
The folder name gives the trainer and configuration; `plans.json` the spacing, patch size, normalisation, axis
transposes and resampling; `dataset.json` the label names and values; each fold's `network_weights` the
`dino_encoder.*` backbone and the `up_projection.decode.*` decoder, `inference_allowed_mirroring_axes` the TTA axes.
The spec says `slicing: "stored"`: the engine predicts as nnUNetv2_predict does (`engine.nnunet_mode`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, quartile_blocks
from .convert import (dinov3_to_backbone, infer_backbone_config, primus_decoder_to_decoder, strip_prefix,
                      unwrap_module_prefixes)
from .package import ClassInfo, ModelSpec
from .safe_load import CheckpointError, safe_torch_load

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
# nnU-Net's planner defaults, for plans without `resampling_fn_*_kwargs` (read here, used by `engine.nnunet_mode`)
DEFAULT_RESAMPLING_DATA = {"order": 3, "order_z": 0, "force_separate_z": None}
DEFAULT_RESAMPLING_PROBABILITIES = {"order": 1, "order_z": 0, "force_separate_z": None}


def is_nnunet_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def fold_checkpoints(folder: Path, folds: list[str] | None = None) -> dict[str, Path]:
    """fold name -> checkpoint file (final preferred over best) for every (or each requested) fold."""
    found = {}
    for fold_dir in sorted(folder.glob("fold_*")):
        fold = fold_dir.name[len("fold_"):]
        for name in CHECKPOINT_NAMES:
            if (fold_dir / name).is_file():
                found[fold] = fold_dir / name
                break
    if folds is not None:
        missing = [f for f in folds if f not in found]
        if missing:
            raise CheckpointError(f"{folder}: no checkpoint for fold(s) {', '.join(missing)} "
                                  f"(available: {', '.join(found) or 'none'})")
        found = {f: found[f] for f in folds}
    if not found:
        raise CheckpointError(f"{folder}: no fold_*/checkpoint_final.pth or checkpoint_best.pth found")
    return found


def _configuration(plans: dict, name: str, source: str) -> dict:
    """Resolve `inherits_from` chains of nnU-Net plans configurations."""
    configs = plans.get("configurations", {})
    if name not in configs:
        raise CheckpointError(f"{source}: configuration {name!r} not in plans.json (has {', '.join(configs)})")
    cfg = dict(configs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise CheckpointError(f"{source}: bad inherits_from {parent!r} in configuration {name!r}")
        seen.add(parent)
        cfg = {**configs[parent], **cfg}
    return cfg


def _normalization(plans: dict, cfg: dict, source: str) -> dict:
    scheme = (cfg.get("normalization_schemes") or ["CTNormalization"])[0]
    if scheme == "CTNormalization":
        props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
        if not props:
            raise CheckpointError(f"{source}: CTNormalization without foreground_intensity_properties_per_channel")
        return {"scheme": "ct", "mean": float(props["mean"]), "std": float(props["std"]),
                "lower": float(props["percentile_00_5"]), "upper": float(props["percentile_99_5"])}
    if scheme == "ZScoreNormalization":
        return {"scheme": "zscore", "use_mask": bool((cfg.get("use_mask_for_norm") or [False])[0])}
    if scheme in ("NoNormalization", "RescaleTo01Normalization"):
        return {"scheme": {"NoNormalization": "none", "RescaleTo01Normalization": "rescale01"}[scheme]}
    raise CheckpointError(f"{source}: unsupported normalisation scheme {scheme!r}")


def _classes(dataset: dict, source: str) -> list[ClassInfo]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise CheckpointError(f"{source}: dataset.json has no labels")
    classes = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise CheckpointError(f"{source}: region-based (overlapping) labels are not supported")
        if name == "ignore":
            continue
        classes.append(ClassInfo(int(value), name))
    return sorted(classes, key=lambda c: c.value)  # nnU-Net's output channels follow sorted label values


def read_nnunet_folder(folder: str | Path, folds: list[str] | None = None
                       ) -> tuple[ModelSpec, list[dict[str, torch.Tensor]]]:
    """Spec and one converted state dict (keys of `MedDINOv3`) per fold."""
    folder = Path(folder)
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot read plans.json / dataset.json ({e})") from None
    parts = folder.name.split("__")
    trainer = parts[0] if len(parts) == 3 else ""
    config_name = parts[2] if len(parts) == 3 else "2d"
    cfg = _configuration(plans, config_name, str(folder / "plans.json"))
    classes = _classes(dataset, str(folder / "dataset.json"))
    ckpts = fold_checkpoints(folder, folds)

    state_dicts, model_cfg, mirroring = [], None, None
    for fold, path in ckpts.items():
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
            raise CheckpointError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
        fold_trainer = ckpt.get("trainer_name") or trainer
        if fold_trainer != trainer and state_dicts:
            raise CheckpointError(f"{path}: fold {fold} was trained with {fold_trainer}, the folds before it with "
                                  f"{trainer}; one result folder holds the folds of one trainer")
        trainer = fold_trainer
        if mirroring is None:  # nnU-Net reads it from the checkpoints; absent: its default, every in-plane axis
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirroring = tuple(int(a) for a in axes) if axes is not None else (0, 1)
        weights = unwrap_module_prefixes(ckpt["network_weights"])
        if not any(k.startswith("dino_encoder.") for k in weights):
            raise CheckpointError(f"{path}: trainer {trainer or 'unknown'} is not a MedDINOv3 / DINOv3 Primus trainer "
                                  "(no dino_encoder weights); supported: meddinov3_base_primus_multiscale_Trainer, "
                                  "dinov3_base_primus_multiscale_Trainer and their single-scale *_primus_Trainer")
        encoder = strip_prefix(weights, "dino_encoder.")
        decoder = strip_prefix(weights, "up_projection.")
        other = [k for k in weights if not k.startswith(("dino_encoder.", "up_projection."))]
        if other:
            raise CheckpointError(f"{path}: unexpected weights outside dino_encoder/up_projection: {', '.join(other[:10])}")
        fold_cfg = _config_for(encoder, decoder, trainer, len(classes), str(path))
        if model_cfg is not None and fold_cfg != model_cfg:
            raise CheckpointError(f"{path}: fold {fold} has a different architecture than the other folds")
        model_cfg = fold_cfg
        num_stages = len(model_cfg.decoder_channels) - 1
        sd = {f"backbone.{k}": v for k, v in dinov3_to_backbone(encoder, str(path)).items()}
        sd.update({f"decoder.{k}": v for k, v in primus_decoder_to_decoder(decoder, num_stages, str(path)).items()})
        state_dicts.append(sd)

    spec = ModelSpec(
        name=f"{plans.get('dataset_name', folder.parent.name)} {trainer} {config_name}".strip(),
        config=model_cfg,
        classes=classes,
        modality=str((dataset.get("channel_names") or dataset.get("modality") or {"0": "CT"}).get("0", "CT")),
        spacing=tuple(float(s) for s in cfg["spacing"][-2:]),
        patch_size=tuple(int(s) for s in cfg["patch_size"][-2:]),
        normalization=_normalization(plans, cfg, str(folder / "plans.json")),
        mirroring_axes=mirroring,
        slicing="stored",
        nnunet=_nnunet_semantics(plans, cfg, str(folder / "plans.json")),
        weights=[f"fold_{f}.safetensors" for f in ckpts],
        folds=list(ckpts),
        description=f"nnU-Net v2 result folder {folder.name}",
        license=str(dataset.get("licence") or dataset.get("license") or ""),
        provenance={"source": str(folder), "trainer": trainer, "configuration": config_name,
                    "plans": plans.get("plans_name", "")},
    )
    return spec, state_dicts


def _resampling(cfg: dict, which: str, source: str) -> dict:
    """{order, order_z, force_separate_z} of the plans' `resampling_fn_<which>` (nnU-Net's defaults if absent)."""
    fn = cfg.get(f"resampling_fn_{which}", "resample_data_or_seg_to_shape")
    if fn != "resample_data_or_seg_to_shape":
        raise CheckpointError(f"{source}: resampling_fn_{which} {fn!r} is not supported (only nnU-Net's default "
                              "resample_data_or_seg_to_shape)")
    defaults = DEFAULT_RESAMPLING_DATA if which == "data" else DEFAULT_RESAMPLING_PROBABILITIES
    kwargs = cfg.get(f"resampling_fn_{which}_kwargs") or {}
    return {k: kwargs.get(k, v) for k, v in defaults.items()}


def _nnunet_semantics(plans: dict, cfg: dict, source: str) -> dict:
    """The `model.json` "nnunet" block: axis transposes and the image / logits resampling of the plans."""
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    backward = [int(a) for a in plans.get("transpose_backward", list(np.argsort(forward)))]
    if sorted(forward) != [0, 1, 2] or [forward[b] for b in backward] != [0, 1, 2]:
        raise CheckpointError(f"{source}: transpose_forward {forward} / transpose_backward {backward} are not "
                              "inverse permutations of the three axes")
    return {"transpose_forward": forward, "transpose_backward": backward,
            "resampling_data": _resampling(cfg, "data", source),
            "resampling_probabilities": _resampling(cfg, "probabilities", source),
            "training_orientation": None}


def _config_for(encoder: dict, decoder: dict, trainer: str, num_classes: int, source: str) -> ModelConfig:
    """Architecture from the weights; multi-scale from the trainer name, checked against the decoder width."""
    base = infer_backbone_config(encoder, source, num_classes=num_classes)
    first = decoder.get("decode.0.0.weight")
    if first is None:
        raise CheckpointError(f"{source}: no up_projection.decode.0.0.weight (not a Primus decoder)")
    n_maps = first.shape[0] // base.embed_dim
    if n_maps * base.embed_dim != first.shape[0] or n_maps not in (1, 4):
        raise CheckpointError(f"{source}: decoder input width {first.shape[0]} does not match the backbone width")
    if trainer and ("multiscale" in trainer) != (n_maps == 4):
        raise CheckpointError(f"{source}: trainer {trainer} does not match a decoder fed by {n_maps} feature map(s)")
    blocks = quartile_blocks(base.depth) if n_maps == 4 else (base.depth - 1,)
    num_stages = sum(1 for k in decoder if re.match(r"decode\.\d+\.0\.weight$", k))
    head = decoder.get(f"decode.{num_stages}.weight")
    if head is None or head.shape[0] != num_classes:
        raise CheckpointError(f"{source}: decoder output ({None if head is None else head.shape[0]} channels) does "
                              f"not match the {num_classes} labels of dataset.json")
    return base.replace(feature_blocks=blocks, patch_size=2 ** num_stages)
