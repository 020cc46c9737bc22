"""What a fine-tuning run trains on, decided before its first step: the training / validation split (nnU-Net's
folds), the patch and batch size (nnU-Net's 2D planner rules), the slice cache, the network (from scratch or a base)
and the model package's description."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data.cache import SliceCache, build_cache
from ..data.dataset import Dataset
from .config import TrainConfig, TrainError


def cross_validation_splits(ds: Dataset, cfg: TrainConfig) -> list[dict] | None:
    """All folds (nnU-Net's splits_final.json content) when `fold` or `splits` is set, else None."""
    from .splits import nnunet_folds, read_splits

    try:
        if cfg.splits:
            return read_splits(cfg.splits)
        return nnunet_folds([c.name for c in ds.cases]) if cfg.fold is not None else None
    except ValueError as e:
        raise TrainError(str(e)) from None


def split_cases(ds: Dataset, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training, validation) case names, by precedence: `val_cases`; `fold`/`splits` (nnU-Net's folds); a seeded
    `val_fraction` (none when only one case). `val_cases` with `fold`/`splits` is refused by `validate`."""
    from .splits import fold_cases

    names = [c.name for c in ds.cases]
    splits = cross_validation_splits(ds, cfg)
    if splits is not None:
        try:
            return fold_cases(splits, cfg.fold or 0, names, cfg.splits or "nnU-Net's 5-fold split")
        except ValueError as e:
            raise TrainError(str(e)) from None
    if cfg.val_cases:
        unknown = [n for n in cfg.val_cases if n not in names]
        if unknown:
            raise TrainError(f"validation case(s) {unknown} are not in the dataset (cases: "
                             f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        val = [n for n in names if n in set(cfg.val_cases)]
    elif len(names) < 2 or cfg.val_fraction <= 0:
        val = []
    else:
        k = min(len(names) - 1, max(1, int(round(len(names) * cfg.val_fraction))))
        order = np.random.default_rng(cfg.seed).permutation(len(names))
        val = sorted(names[i] for i in order[:k])
    train = [n for n in names if n not in set(val)]
    if not train:
        raise TrainError("no training cases left after choosing the validation cases")
    return train, val


def default_patch(shapes: list[tuple[int, int]], multiple: int, cap: int = 512) -> tuple[int, int]:
    med = np.median(np.array(shapes), axis=0)
    return tuple(int(min(cap, math.ceil(m / multiple) * multiple)) for m in med)


# nnU-Net's 2D planner: batch 12 at the reference VRAM for a 512 x 512 U-Net patch, at most 5 % of the dataset's
# voxels per batch, at least 2 (ExperimentPlanner: UNet_reference_val_corresp_bs_2d, max_dataset_covered,
# UNet_min_batch_size)
NNUNET_REFERENCE_BATCH_2D, NNUNET_REFERENCE_AREA_2D, NNUNET_MAX_COVERED, NNUNET_MIN_BATCH = 12, 512 * 512, 0.05, 2


def nnunet_batch_size(slice_counts_and_shapes: list[tuple[int, int, int]], n_cases: int, patch) -> int:
    """nnU-Net's 2D batch size for `patch`: the reference batch scaled by patch area (the U-Net's VRAM estimate
    grows with it; exact at 512 x 512), capped so one batch covers at most 5 % of the dataset (median case volume
    x number of cases, at the training spacing), at least 2."""
    vram_batch = round(NNUNET_REFERENCE_BATCH_2D * NNUNET_REFERENCE_AREA_2D / float(np.prod(patch)))
    median_voxels = float(np.prod(np.median(np.array(slice_counts_and_shapes, float), axis=0)))
    five_percent = round(median_voxels * n_cases * NNUNET_MAX_COVERED / float(np.prod(patch)))
    return int(max(min(vram_batch, five_percent), NNUNET_MIN_BATCH))


def prepare_cache(ds: Dataset, train_names: list[str], root: Path, cfg: TrainConfig, multiple: int, log
                  ) -> tuple[Path, int]:
    """The training slice cache and the global batch size (main process only).

    With `resolution`: the configuration without it (spacing and patch: given or the defaults, from a cache at that
    spacing when needed) gives the spacing scaled per axis by patch / resolution, as MedDINOv3's 2d_896 plan; the
    "nnunet" batch is the one of that configuration (2d_896 inherits it from 2d).
    """
    train_ds = ds.subset(train_names)
    spacing, patch, first = cfg.spacing, cfg.patch_size, None
    if cfg.resolution and not (spacing and patch) or cfg.batch_size == "nnunet":
        first = SliceCache(build_cache(train_ds, root, cfg.spacing, cfg.normalization, cfg.seed, log,
                                       cfg.image_resampling))
        spacing = spacing or first.spacing
        patch = patch or default_patch(first.slice_shapes, multiple)
    if cfg.resolution:
        spacing = [float(s) * p / cfg.resolution for s, p in zip(spacing, patch)]
        log(f"resolution {cfg.resolution}: spacing {[round(s, 4) for s in spacing]} mm (patch {list(patch)} -> "
            f"{[cfg.resolution] * 2})")
    if first is not None and not cfg.resolution:  # the cache built above is this one
        folder = first.folder
    else:
        folder = build_cache(train_ds, root, spacing if cfg.resolution else cfg.spacing, cfg.normalization, cfg.seed,
                             log, cfg.image_resampling)
    batch = cfg.batch_size
    if batch == "nnunet":
        batch = nnunet_batch_size([c.image.shape for c in first.cases], len(ds.cases), patch)
        log(f"batch size {batch} (nnU-Net's 2D planner rule for patch {list(patch)})")
    return folder, int(batch)


def build_network(cfg: TrainConfig, n_classes: int, class_names: list[str], log) -> tuple[torch.nn.Module, dict]:
    """The network (from scratch, a backbone of any layout, or a previous package) and what was loaded."""
    from ..checkpoints import CheckpointError, load_backbone, read_model
    from ..checkpoints.loader import run_package
    from ..checkpoints.convert import load_strict, strip_prefix
    from ..config import model_config
    from ..model import build_model

    drop = {} if cfg.drop_path is None else {"drop_path_rate": float(cfg.drop_path)}
    if not cfg.base:
        mcfg = model_config(cfg.size, n_classes, **{**drop, **cfg.model})
        return build_model(mcfg), {"base": None, "decoder": "new"}
    try:
        bcfg, backbone_sd, spec = load_backbone(cfg.base)
    except CheckpointError as e:
        raise TrainError(f"--base: {e}") from None
    arch_keys = {"embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "num_reg_tokens", "qkv_bias"}
    bad = sorted(set(cfg.model) & arch_keys)
    if bad:
        raise TrainError(f"--base fixes the architecture; model option(s) {bad} cannot change it")
    mcfg = bcfg.replace(num_classes=n_classes, **{**drop, **cfg.model})
    net = build_model(mcfg)
    load_strict(net.backbone, backbone_sd, str(cfg.base))
    info = {"base": str(cfg.base), "base_name": spec.name, "base_kind": spec.kind, "decoder": "new"}
    if spec.kind == "segmentation" and spec.config.num_classes == n_classes and \
            [c.name for c in spec.classes] == class_names:
        _, _, sds, _ = read_model(run_package(cfg.base))
        dec = strip_prefix(sds[0], "decoder.")
        net.decoder.load_state_dict(dec)
        info["decoder"] = "kept"
    elif spec.kind == "segmentation":
        log(f"base model classes {[c.name for c in spec.classes]} differ from the dataset's {class_names}: "
            "new decoder")
    return net, info


def package_postprocessing(cfg: TrainConfig, ds: Dataset) -> list[dict]:
    """The package's post-processing steps, checked against the dataset's labels before any slow work."""
    from ..checkpoints.package import check_postprocessing

    try:
        return check_postprocessing(cfg.postprocessing, [value for value, _ in ds.class_names()])
    except ValueError as e:
        raise TrainError(f"config: {e}") from None


def make_spec(cfg: TrainConfig, mcfg, ds: Dataset, cache: SliceCache, patch, postprocessing: list[dict],
              provenance: dict):
    from ..checkpoints.package import ClassInfo, ModelSpec, provenance_now
    from ..terminology import lookup

    classes = []
    for i, (value, name) in enumerate(ds.class_names()):
        entry = lookup(name, i)
        classes.append(ClassInfo(value, name, tuple(entry.color) if value else None, entry.terminology if value else None))
    name = cfg.name or Path(cfg.out).name
    return ModelSpec(name=name, config=mcfg, classes=classes, modality=ds.modality, spacing=tuple(cache.spacing),
                     patch_size=tuple(patch), normalization=cache.normalization, postprocessing=postprocessing,
                     description=cfg.description or f"Fine-tuned with `meddinov3 train` on {Path(ds.source).name}",
                     license=cfg.license, provenance=provenance_now(**provenance))
