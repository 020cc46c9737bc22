"""The training loop: config in, RUN_DIR out. No subclasses: every option is a `TrainConfig` field.

RUN_DIR: config.json (resolved config, data summary, base, seed, versions), checkpoints/{latest,best}.pt,
metrics.jsonl, curves.png, model/ (a package the engine uses directly, exported from the best validation),
status.json. Works alone, under torchrun (DDP; rank 0 writes), resumes after kill -9, and stops cleanly on
SIGTERM / SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.augment import AugmentConfig, augment
from ..data.cache import SliceCache, build_cache
from ..data.dataset import Dataset, DatasetError, check_dataset, load_dataset, read_case
from ..data.prefetch import Prefetcher
from ..data.sampler import PatchSampler
from ..config import JsonOptions
from ..files import atomic_path, write_json
from .. import distributed as D
from ..memory import MicroBatchChoice, peak_gpu_memory_gb
from ..runs.batch import amp_dtype, amp_name, fit_micro_batch as fit_run_micro_batch, halve_micro_batch, oom_event, \
    start_micro_batch
from ..runs.session import RunKind, RunSession, versions
from .checkpoint import load_state, save_state, set_rng_states
from .curves import plot_curves
from .losses import DiceCELoss
from .optim import freeze_blocks, make_optimizer, make_scheduler


class TrainError(Exception):
    """A problem the user can fix (bad options, existing run folder...)."""


@dataclass
class TrainConfig(JsonOptions):
    SECTION = "train"  # key of these options in the run's config.json
    KIND = "training"
    PATHS = ("data", "out", "cache_dir", "splits")  # stored absolute in config.json
    PATHS_IF_EXISTING = ("base",)  # absolute when a path, kept when a model name

    data: str = ""
    out: str = ""
    base: str | None = None  # backbone / model package / pretrain run; None = from scratch
    size: str = "base"  # when there is no base
    model: dict = field(default_factory=dict)  # model_config overrides, e.g. {"depth": 2, "patch_size": 8}
    drop_path: float | None = None  # stochastic depth on every block (DINOv3's rule); None: the model's (0 new)
    name: str | None = None  # model package name (default: the run folder's name)
    epochs: int = 1000
    steps_per_epoch: int = 250
    steps: int | None = None  # total optimiser steps; overrides epochs
    batch_size: int | str = 8  # global (all ranks together); "nnunet": nnU-Net's 2D planner rule (nnunet_batch_size)
    micro_batch: int | None = None  # per-rank forward size; None = the whole per-rank batch
    patch_size: list | None = None  # default: median slice size rounded up to the patch size, at most 512
    spacing: list | None = None  # in-plane (row, column) mm; default: the dataset's median
    resolution: int | None = None  # high-resolution configuration (MedDINOv3's 2d_896): patch R x R, spacing
    #                                 scaled per axis by (the patch without it) / R
    case_sampling: str = "uniform"  # "uniform" over cases (nnU-Net), or "slices" (in proportion to slice count)
    image_resampling: str = "linear"  # in the slice cache: "linear" (as the engine) or "cubic" (nnU-Net's order 3)
    normalization: dict | None = None  # default: CT -> nnU-Net CTNormalization from the training data
    val_cases: list | None = None
    val_fraction: float = 0.2
    fold: int | None = None  # nnU-Net cross-validation fold: KFold(5, shuffle, 12345) over sorted names, or `splits`
    splits: str | None = None  # an nnU-Net splits_final.json to take `fold` (default 0) from
    val_every: int | None = None  # steps; default one epoch
    val_tta: bool | str = False  # mirroring at validation: True, False, or "final" (the last validation only)
    export_weights: str = "best"  # model/ from the "best" validation, or the "final" weights (nnU-Net's default)
    seed: int = 0
    lr_decoder: float = 3e-4
    lr_backbone: float = 3e-5
    weight_decay: float = 0.05
    weight_decay_all: bool = False  # also decay biases, norms, tokens, LayerScale (the reference trainer does)
    lr_per_epoch: bool = False  # hold the learning rate for each epoch (nnU-Net steps its schedule per epoch)
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 12.0
    freeze_blocks: int = 0
    foreground_oversampling: float = 0.33
    loss_weights: list = field(default_factory=lambda: [1.0, 1.0])  # dice, ce
    checkpoint_every: int = 250
    log_every: int = 10
    augment: dict = field(default_factory=dict)  # AugmentConfig overrides
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; "bf16", "fp16", "none"
    prefetch: bool = True  # draw, pin and copy the next batches in a background thread while a step runs
    compile: bool = False  # torch.compile the forward + loss (dynamic=False; the first steps pay the compile time)
    device: str = "auto"
    cache_dir: str | None = None  # default: MEDDINOV3_HOME/cache/slices
    export_dtype: str = "float32"  # weights of the exported model package ("float16" halves its size)
    license: str = ""
    description: str = ""
    postprocessing: list = field(default_factory=list)  # the package's clean-up steps (see check_postprocessing)

    @property
    def total_steps(self) -> int:
        return int(self.steps) if self.steps else int(self.epochs) * int(self.steps_per_epoch)

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    def validate(self) -> None:
        for key in ("epochs", "steps_per_epoch") + (() if self.batch_size == "nnunet" else ("batch_size",)):
            self.require_number(key, 1)
        for key in ("steps", "micro_batch", "resolution"):
            self.require_number(key, 1, optional=True)
        self.require_number("drop_path", 0, whole=False, optional=True)
        self.require_number("fold", 0, optional=True)
        if self.val_tta not in (True, False, "final"):
            raise ValueError(f"val_tta must be true, false or \"final\", got {self.val_tta!r}")
        if self.export_weights not in ("best", "final"):
            raise ValueError(f"export_weights must be 'best' or 'final', got {self.export_weights!r}")
        if self.image_resampling not in ("linear", "cubic"):
            raise ValueError(f"image_resampling must be 'linear' or 'cubic', got {self.image_resampling!r}")
        if self.case_sampling not in ("uniform", "slices"):
            raise ValueError(f"case_sampling must be 'uniform' or 'slices', got {self.case_sampling!r}")
        if self.val_cases is not None and (self.fold is not None or self.splits):
            raise ValueError("val_cases and fold/splits both choose the validation cases: give one of them")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
            raise ValueError(f"val_fraction must be at least 0 (no validation) and below 1, got {vf!r}")
        if self.val_cases is not None and (not isinstance(self.val_cases, list)
                                           or not all(isinstance(n, str) for n in self.val_cases)):
            raise ValueError(f"val_cases must be a list of case names, got {self.val_cases!r}")
        self.augment_config  # noqa: B018 - parsing the augmentation options validates them



# ----------------------------------------------------------------------------------------------- set-up


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
    folder = build_cache(train_ds, root, spacing if cfg.resolution else cfg.spacing, cfg.normalization, cfg.seed, log,
                         cfg.image_resampling)
    batch = cfg.batch_size
    if batch == "nnunet":
        batch = nnunet_batch_size([c.image.shape for c in first.cases], len(ds.cases), patch)
        log(f"batch size {batch} (nnU-Net's 2D planner rule for patch {list(patch)})")
    return folder, int(batch)


def build_network(cfg: TrainConfig, n_classes: int, class_names: list[str], log) -> tuple[torch.nn.Module, dict]:
    """The network (from scratch, a backbone of any layout, or a previous package) and what was loaded."""
    from ..checkpoints import CheckpointError, load_backbone, read_model
    from ..checkpoints.convert import load_strict
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
        _, _, sds, _ = read_model(spec_path(cfg.base))
        dec = {k[len("decoder."):]: v for k, v in sds[0].items() if k.startswith("decoder.")}
        net.decoder.load_state_dict(dec)
        info["decoder"] = "kept"
    elif spec.kind == "segmentation":
        log(f"base model classes {[c.name for c in spec.classes]} differ from the dataset's {class_names}: "
            "new decoder")
    return net, info


def spec_path(ref):
    from ..checkpoints.package import is_package

    p = Path(os.fspath(ref)).expanduser()
    if p.is_dir() and not is_package(p):
        for sub in ("model", "backbone"):
            if is_package(p / sub):
                return p / sub
    return ref


def forward_loss(model, criterion, adt, device_type: str, compile: bool = False):
    """`(images, labels) -> loss`: the network under autocast, then the loss; `compile`: one torch.compile'd function
    (dynamic=False). The function is compiled, not the module, so state_dicts keep their keys (no `_orig_mod.`).
    On CUDA, cuDNN times its convolution algorithms once (every step has the same shapes; nnU-Net does the same)."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True

    def run(xs, ys):
        with torch.autocast(device_type, dtype=adt, enabled=adt is not None):
            logits = model(xs)
        return criterion(logits, ys)[0]

    return torch.compile(run, dynamic=False) if compile else run


def fit_micro_batch(model, net, optimizer, criterion, adt, patch, per_rank: int, cfg: TrainConfig,
                    device: torch.device, dist_info, log) -> MicroBatchChoice:
    """The micro-batch that fits this device (memory.size_micro_batch), measured on patches of the run's size
    through the uncompiled forward (a compiled one would compile for each probe size; it needs less memory)."""
    run = forward_loss(model, criterion, adt, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=adt == torch.float16)

    def forward_backward(k: int) -> None:
        x = torch.zeros(k, 1, *patch, device=device)
        y = torch.zeros(k, *patch, dtype=torch.long, device=device)
        scaler.scale(run(x, y)).backward()

    params = [p for p in net.parameters() if p.requires_grad]
    return fit_run_micro_batch(net, params, optimizer, forward_backward, per_rank, device, cfg.micro_batch,
                               cfg.batch_size, dist_info, 1 if dist_info.enabled else 0, TrainError, log)


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


# ----------------------------------------------------------------------------------------------- the run


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def validate(net, spec, ds: Dataset, names: list[str], device, tta: bool = False, save_to: Path | None = None) -> dict:
    """Whole-volume inference through the engine on each validation case, scored as nnU-Net does.

    Returns {"dice": {class name: mean Dice over cases, NaN where a class is in no prediction and no truth},
    "mean_dice": mean of the non-NaN class Dice, "cases": {case: {class name: Dice}}, "summary": nnU-Net's
    summary (`meddinov3.evaluation`)}. `save_to`: also write each prediction there as `<case>.nii.gz`.
    """
    import copy

    import SimpleITK as sitk

    from ..checkpoints import LoadedModel
    from ..engine import segment_image
    from ..evaluation import case_metrics, summarize

    net = copy.deepcopy(net).eval()  # the engine may cast / compile its networks: never touch the trained one
    loaded = LoadedModel(spec, [net], "package", Path(spec.name))
    values = [c.value for c in spec.classes if c.value != 0]
    per_case = []
    try:
        for case in ds.cases:
            if case.name not in names:
                continue
            image, label = read_case(case, ds.modality)
            with torch.no_grad():
                result = segment_image(image, loaded, device=device, tta=tta, source=str(case.image))
            prediction = None
            if save_to is not None:
                prediction = save_to / f"{case.name}.nii.gz"
                sitk.WriteImage(result.labels, str(prediction), True)
            metrics = case_metrics(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(result.labels), values)
            per_case.append({"reference_file": str(case.label),
                             "prediction_file": str(prediction) if prediction else None, "metrics": metrics,
                             "case": case.name})
    finally:
        del loaded, net
    names_by_value = {c.value: c.name for c in spec.classes}
    cases = {c.pop("case"): {names_by_value[v]: m["Dice"] for v, m in c["metrics"].items()} for c in per_case}
    summary = summarize(per_case, values)
    dice = {names_by_value[v]: summary["mean"][v]["Dice"] for v in values}
    scored = [d for d in dice.values() if not math.isnan(d)]
    return {"dice": dice, "mean_dice": float(np.mean(scored)) if scored else 0.0, "cases": cases, "summary": summary}


TRAIN_RUN = RunKind("train", TrainConfig, TrainError, (TrainError, DatasetError), output="model",
                    total=lambda cfg: cfg.total_steps, quiet_with_json=True,
                    longer="to train longer, start a new run with --base {run_dir} (it keeps the decoder)")


def train(cfg: TrainConfig, resume: bool = False, json_progress: bool = False, stream=None,
          explicit: dict | None = None) -> dict:
    """Run (or resume) training into `cfg.out`. Returns the final status dict. Raises TrainError/DatasetError.

    `explicit`: with `resume`, the options the user gave (refused when they differ from the saved ones).
    """
    with RunSession(TRAIN_RUN, cfg, resume, json_progress, stream, explicit) as run:
        if run.finished:
            return run.previous
        return _train(run.cfg, resume, run.dist_info, run.device, run.run_dir, run.run_dir / "checkpoints" / "latest.pt",
                      run.progress, run.status, run.log, run)
    return run.result()  # stopped during the start-up


def _train(cfg, resume, dist_info, device, run_dir, latest, progress, status, log, run) -> dict:
    main = dist_info.is_main
    if main:
        status.update(state="starting")
    # ---- data: checked and cached by rank 0, then opened by every rank; options and --base checked before that
    ds = load_dataset(cfg.data)
    postprocessing = package_postprocessing(cfg, ds)
    train_names, val_names = split_cases(ds, cfg)
    class_names = [n for _, n in ds.class_names()]
    log_fn = (lambda m: None) if not main else (lambda m: print(f"[meddinov3 train] {m}", file=sys.stderr))
    torch.manual_seed(cfg.seed)
    net, base_info = build_network(cfg, len(class_names), class_names, log_fn)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else None
    if cache_root is None:
        from ..resources import user_dir
        cache_root = user_dir() / "cache" / "slices"
    error, folder, batch_size = None, None, None
    if main:
        try:
            info = check_dataset(ds)
            absent = [f"{name!r} ({value})" for value, name in ds.class_names()
                      if value and not any(value in info[n]["values"] for n in train_names)]
            if absent:  # nnU-Net trains on such data too, but the class can only be learnt as absent
                print(f"[meddinov3 train] WARNING: label(s) {', '.join(absent)} have no voxels in any training case",
                      file=sys.stderr, flush=True)
            folder, batch_size = prepare_cache(ds, train_names, cache_root, cfg, net.config.patch_size, log)
        except (DatasetError, ValueError) as e:
            error = str(e)
    error, folder, batch_size = D.broadcast_object((error, str(folder) if folder else None, batch_size), dist_info)
    if error:
        raise DatasetError(error)
    cache = SliceCache(Path(folder))

    # ---- network, optimiser, schedule
    mcfg = net.config
    net.backbone.mask_token.requires_grad_(False)  # pretraining only
    n_frozen = freeze_blocks(net, cfg.freeze_blocks)
    net.to(device)
    patch = (cfg.resolution,) * 2 if cfg.resolution else \
        tuple(cfg.patch_size) if cfg.patch_size else default_patch(cache.slice_shapes, mcfg.patch_size)
    if any(p % mcfg.patch_size for p in patch):
        raise TrainError(f"patch_size {list(patch)} must be a multiple of the network's patch size {mcfg.patch_size}")
    optimizer = make_optimizer(net, cfg)
    total = cfg.total_steps
    scheduler = make_scheduler(optimizer, total, cfg.steps_per_epoch if cfg.lr_per_epoch else None)
    adt = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=adt == torch.float16)
    criterion = DiceCELoss(*cfg.loss_weights)
    aug_cfg = cfg.augment_config
    world = dist_info.world_size
    if batch_size % world:
        raise TrainError(f"batch_size {batch_size} is not divisible by the {world} processes")
    per_rank = batch_size // world
    micro = start_micro_batch(cfg.micro_batch, per_rank)
    sampler = PatchSampler(cache.cases, aug_cfg.sampled_patch(patch), per_rank, cfg.foreground_oversampling, cfg.seed,
                           dist_info.rank, world, cfg.case_sampling)
    pad_value = float(np.median([c.pad_value for c in cache.cases]))
    val_every = int(cfg.val_every or cfg.steps_per_epoch)

    step, best = 0, {"mean_dice": -1.0, "step": None, "dice": {}}
    if resume and latest.is_file():
        state = load_state(latest)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        step, best = int(state["step"]), state["best"]
        micro = start_micro_batch(micro, per_rank, state.get("micro_batch"))
        log(f"resumed from {latest} at step {step}")
    model = net
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(net, device_ids=[device] if device.type == "cuda" else None)
    fit = fit_micro_batch(model, net, optimizer, criterion, adt, patch, per_rank, cfg, device, dist_info, log)
    micro = min(micro, fit.micro_batch)
    metrics_path = run.metrics_path
    run.restart_metrics(step)
    if main:
        status.update(batch=fit.to_dict())
        full = {"train": cfg.to_dict(), "resolved": {
            "model": mcfg.to_dict(), "patch_size": list(patch), "spacing": list(cache.spacing),
            "normalization": cache.normalization, "statistics": cache.statistics, "cache": str(cache.folder),
            "total_steps": total, "batch_size": batch_size, "per_rank_batch": per_rank, "world_size": world,
            "device": str(device),
            "amp": amp_name(adt), "frozen_parameters": n_frozen,
            "augment": aug_cfg.to_dict(), "base": base_info, "batch": fit.to_dict(), "training_cases": train_names,
            "validation_cases": val_names}, "data": ds.summary(), "versions": versions()}
        if not resume:
            write_json(run_dir / "config.json", full)
            splits = cross_validation_splits(ds, cfg)
            if splits is not None:  # nnU-Net's format: the folds this run's fold came from
                write_json(run_dir / "splits_final.json", splits)
    spec = make_spec(cfg, mcfg, ds, cache, patch, postprocessing, {"base": base_info, "dataset": ds.source,
                                                    "training_cases": train_names, "validation_cases": val_names,
                                                    "seed": cfg.seed, "total_steps": total})

    run.stopper.install()
    step_fn = forward_loss(model, criterion, adt, device.type, cfg.compile)
    write_metrics = run.write_metrics

    def checkpoint(path: Path, kind: str) -> None:
        if main:
            save_state(path, model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                       epoch=step // cfg.steps_per_epoch, sampler=sampler.state_dict(), best=best,
                       config=cfg.to_dict(), extra={"micro_batch": micro})
            progress.event("checkpoint", step=step, path=str(path), kind=kind)
        D.barrier(dist_info)

    def export(weights: dict, dice: dict | None) -> None:
        from ..checkpoints import write_package
        prov = {**spec.provenance, "trained_steps": step, "validation_dice": dice}
        write_package(run_dir / "model", spec.replace(provenance=prov), [weights], overwrite=True,
                      dtype=torch.float16 if cfg.export_dtype == "float16" else None)

    def run_validation(final: bool = False) -> dict | None:
        """Validate on the validation cases; `final`: also keep the predictions in validation/ and nnU-Net's
        summary.json in the run folder (and export these weights with export_weights="final")."""
        nonlocal best
        result = None
        if main and val_names:
            t0 = time.perf_counter()
            save_to = None
            if final:
                save_to = run_dir / "validation"
                save_to.mkdir(exist_ok=True)
            tta = cfg.val_tta is True or (final and cfg.val_tta == "final")
            result = validate(net, spec, ds, val_names, device, tta, save_to)
            if final:
                from ..evaluation import to_json
                with atomic_path(run_dir / "summary.json", suffix=".json") as tmp:
                    tmp.write_text(to_json(result["summary"]))
            record = {"kind": "validation", "step": step, "epoch": step / cfg.steps_per_epoch,
                      "dice": result["dice"], "mean_dice": result["mean_dice"], "cases": result["cases"],
                      "seconds": round(time.perf_counter() - t0, 2)}
            write_metrics(record)
            progress.event("validation", step=step, dice=result["dice"], mean_dice=result["mean_dice"])
            log(f"step {step}: validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items()))
            if result["mean_dice"] > best["mean_dice"]:
                best = {"mean_dice": result["mean_dice"], "step": step, "dice": result["dice"]}
                save_state(run_dir / "checkpoints" / "best.pt", model=net, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, step=step, epoch=step // cfg.steps_per_epoch, sampler=sampler.state_dict(),
                           best=best, config=cfg.to_dict())
                if cfg.export_weights == "best":
                    export(net.state_dict(), result["dice"])
                progress.event("checkpoint", step=step, path=str(run_dir / "checkpoints" / "best.pt"), kind="best")
            if final and cfg.export_weights == "final":
                export(net.state_dict(), result["dice"])
            status.update(metrics={"validation_dice": result["dice"], "best": best})
        if main:
            plot_curves(metrics_path, run_dir / "curves.png")
        D.barrier(dist_info)
        return result

    if main:
        status.update(state="running", step=step)
        warning = None if val_names else ("no validation cases: the final weights are exported to model/ and no "
                                          "best checkpoint is kept")
        if warning:
            print(f"[meddinov3 train] WARNING: {warning}", file=sys.stderr, flush=True)
        progress.event("started", run_dir=str(run_dir), total_steps=total, step=step, resumed=bool(resume and step),
                       device=str(device), world_size=world, patch_size=list(patch), spacing=list(cache.spacing),
                       training_cases=len(train_names), validation_cases=len(val_names), warning=warning)
    model.train()
    t_last, n_img, loss_acc, loss_n = time.perf_counter(), 0, 0.0, 0
    images_per_s = None
    state_name = "finished"
    # the next batches are drawn while a step runs; the thread ends with the loop (finished, stopped or failed)
    with Prefetcher(sampler.sample, step, device, depth=2 if cfg.prefetch else 0) as batches:
        while step < total:
            x, y = batches.get(step)
            seed = np.random.default_rng([cfg.seed, step, dist_info.rank, 31]).integers(2 ** 62)
            gen = torch.Generator().manual_seed(int(seed))
            x, y = augment(x, y, gen, aug_cfg, pad_value, patch, len(class_names))
            while True:
                try:
                    optimizer.zero_grad(set_to_none=True)
                    parts = range(0, per_rank, micro)
                    step_loss = 0.0
                    for i, start in enumerate(parts):
                        xs, ys = x[start:start + micro], y[start:start + micro]
                        last = i == len(parts) - 1
                        ctx = model.no_sync() if (dist_info.enabled and not last) else contextlib.nullcontext()
                        with ctx:
                            loss = step_fn(xs, ys) * (len(xs) / per_rank)
                            scaler.scale(loss).backward()
                        step_loss += loss.detach()  # stays on the device: no sync per step
                    break
                except torch.cuda.OutOfMemoryError:
                    if micro <= 1:
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    loss = None
                    micro = halve_micro_batch(micro, device)
                    oom_event(progress, step, micro, per_rank)
                    log(f"CUDA out of memory: micro-batch halved to {micro} (gradient accumulation keeps the batch)")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            n_img += batch_size
            loss_acc += step_loss
            loss_n += 1
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                images_per_s = n_img / max(now - t_last, 1e-9)
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                record = {"kind": "step", "step": step, "epoch": step / cfg.steps_per_epoch,
                          "loss": float(loss_acc) / loss_n,
                          "lr_decoder": lrs.get("decoder", 0.0), "lr_backbone": lrs.get("backbone", 0.0),
                          "grad_norm": float(grad_norm), "images_per_s": round(images_per_s, 3), "micro_batch": micro,
                          "gpu_memory_gb": peak_gpu_memory_gb(device)}
                write_metrics(record)
                if main:
                    progress.event("step", step=step, total=total, loss=record["loss"], lr=record["lr_decoder"],
                                   lr_backbone=record["lr_backbone"], images_per_s=record["images_per_s"])
                    status.update(step=step, metrics={k: record[k] for k in ("loss", "images_per_s", "gpu_memory_gb")})
                    progress.update(step, total, stage="training", loss=round(record["loss"], 4))
                    if not progress._use_bar:
                        log(f"step {step}/{total} loss {record['loss']:.4f} lr {record['lr_decoder']:.2e} "
                            f"{record['images_per_s']:.1f} images/s")
                t_last, n_img, loss_acc, loss_n = now, 0, 0.0, 0
            stop = run.stop_requested()
            if step % cfg.checkpoint_every == 0 and step < total and not stop:
                checkpoint(latest, "latest")
            if step % cfg.steps_per_epoch == 0 and main:
                progress.event("epoch", epoch=step // cfg.steps_per_epoch, step=step)
            if step % val_every == 0 and step < total and not stop:
                run_validation()
            if stop:
                state_name = "stopped"
                run.mark_stopping(step)
                break
    run.stopper.restore()

    checkpoint(latest, "latest")
    if state_name == "finished":
        if val_names:
            if best["step"] != step:
                run_validation(final=True)
        elif main:
            export(net.state_dict(), None)
            plot_curves(metrics_path, run_dir / "curves.png")
    checksums = run.rank_checksums(net.parameters())  # every rank's weights, to show DDP kept them identical
    if main:
        if state_name == "finished" and best["step"] is not None and not (run_dir / "model").exists():
            export(load_state(run_dir / "checkpoints" / "best.pt")["model"], best["dice"])
        if state_name == "stopped" and not (run_dir / "model").exists():  # stopped before any validation: usable
            export(net.state_dict(), None)  # as --model / --base now (its provenance says how far it trained)
        plot_curves(metrics_path, run_dir / "curves.png")
    return run.finish(state_name == "stopped", step, latest, {"metrics": {"best": best}, "rank_checksums": checksums},
                      {"best": best, "model": str(run_dir / "model"), "rank_checksums": checksums,
                       "images_per_s": images_per_s})
