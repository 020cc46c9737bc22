"""DINOv3's pretraining recipe per stage: defaults, learning-rate scaling, optimiser groups, prototype count.

Sources (facebookresearch/dinov3, ``dinov3/configs``): stage 1 takes ``ssl_default_config.yaml`` (DINOv2-style
self-distillation, the values DINOv3 gives for ViT-B/L training); stage 2 takes ``train/dinov3_vit7b16_gram_anchor
.yaml`` and stage 3 ``train/dinov3_vit7b16_high_res_adapt.yaml`` at the point where those stages start (DINOv3 runs
its Gram stage as a continuation of the 1M-iteration run: its warm-ups are over, the last layer is no longer frozen).
Epoch counts there become fractions of ``steps`` here, except the prototypes' freeze: one DINOv3 epoch, 1250 steps,
however short the run (early targets are near uniform, and trainable prototypes would settle in that fixed point:
``benchmarks/RESULTS.md`` shows it from scratch).

| option                     | stage 1                  | stage 2 (Gram anchoring) | stage 3 (high resolution)     |
|----------------------------|--------------------------|--------------------------|-------------------------------|
| lr (base, before scaling)  | 1e-3, cosine to 1e-6     | 3e-5 constant            | 0 -> 1.25e-5, then constant   |
| warmup_steps               | 10 % of steps            | 0                        | 1/3 of steps                  |
| warmup_shape               | linear                   | linear                   | half cosine                   |
| teacher temperature        | 0.04 -> 0.07 over 30 %   | 0.07                     | 0.07                          |
| teacher momentum           | 0.992 -> 1 (cosine)      | 0.999                    | 0.999                         |
| weight decay               | 0.04 -> 0.4 (cosine)     | 0.04                     | 0.04                          |
| last layer frozen          | 1250 steps (one epoch)   | 0                        | 0                             |
| DINO local-crop weight     | 1                        | 1 -> 0.5 (*)             | 0.5                           |
| Gram loss weight           | -                        | 2.0                      | 1.5                           |
| Gram teacher refresh       | -                        | every 10k steps, 3 times | never                         |
| Gram teacher crops         | -                        | 2x the global size       | 1.5x (768/1152 for 512/768)   |

(*) along a half cosine over the stage's first 1000 steps (``local_weight_steps``), as DINOv3's Gram stage
(``dino.local_loss_weight_schedule``); stage 3's lr rises the same way over its first third (DINOv3: 10 of 30 epochs,
``schedules.lr`` with peak 0 and ``cosine_epochs`` 10).

Every stage: lr scaled with the global batch by DINOv3's ``sqrt_wrt_1024`` rule (lr x 4 sqrt(batch / 1024): x1 at
batch 64), layer-wise lr decay 0.9 and patch-embedding lr x0.2 (``optim.layerwise_decay``, ``patch_embed_lr_mult``),
stochastic depth 0.3 in the student (``student.drop_path_rate``, the same rate in every block), KoLeo weight 0.1 per
global crop (``koleo_loss_weight`` x ``n_global_crops``).
"""

from __future__ import annotations

import math

import torch

# stage -> option -> value; "steps x f" values are given as ("fraction", f)
STAGE_DEFAULTS = {
    1: {"lr": 1e-3, "min_lr": 1e-6, "warmup_steps": ("fraction", 0.1), "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup_steps": ("fraction", 0.3), "momentum": 0.992, "momentum_end": 1.0,
        "weight_decay": 0.04, "weight_decay_end": 0.4, "freeze_last_layer_steps": 1250, "local_loss_weight": 1.0,
        "local_weight_steps": 0, "warmup_shape": "linear"},
    2: {"lr": 3e-5, "min_lr": 3e-5, "warmup_steps": 0, "warmup_teacher_temp": 0.07, "teacher_temp_warmup_steps": 0,
        "momentum": 0.999, "momentum_end": 0.999, "weight_decay": 0.04, "weight_decay_end": 0.04,
        "freeze_last_layer_steps": 0, "local_loss_weight": 0.5, "local_weight_steps": 1000, "warmup_shape": "linear",
        "gram_weight": 2.0, "gram_scale": 2.0, "gram_refresh_every": 10000, "gram_max_refreshes": 3},
    3: {"lr": 1.25e-5, "min_lr": 1.25e-5, "warmup_steps": ("fraction", 1 / 3), "warmup_teacher_temp": 0.07,
        "teacher_temp_warmup_steps": 0, "momentum": 0.999, "momentum_end": 0.999, "weight_decay": 0.04,
        "weight_decay_end": 0.04, "freeze_last_layer_steps": 0, "local_loss_weight": 0.5, "local_weight_steps": 0,
        "warmup_shape": "cosine", "gram_weight": 1.5, "gram_scale": 1.5, "gram_refresh_every": 0,
        "gram_max_refreshes": 0},
}

# stage 3, DINOv3's high_res_adapt crops.{global_crops_size, local_crops_size, global_local_crop_pairs_ratios}: one
# pair per step; its Gram crops (768 / 1152) are 1.5x the global size (``gram_scale`` 1.5)
HIGHRES_CROPS = ((512, 112, 0.3), (768, 112, 0.3), (768, 168, 0.3), (768, 224, 0.05), (768, 336, 0.05))

# DINOv3 keeps 32 prototypes per Sinkhorn row: 65,536 for its 2 x 1,024 global crops (ssl_default_config), 262,144 for
# the 7B's 2 x 4,096. More per row puts a floor of log(K / rows) under every target's entropy (each prototype's mass
# is rows / K, so no target can be sharper), and the targets of a small batch cannot tell images apart.
PROTOTYPES_PER_ROW = 32
MAX_PROTOTYPES = 65536
MIN_PROTOTYPES = 256


def stage_value(stage: int, key: str, steps: int):
    """The DINOv3 default of option `key` in `stage` for a run of `steps` steps (None: not stage-dependent)."""
    value = STAGE_DEFAULTS[stage].get(key)
    if isinstance(value, tuple):
        return int(round(steps * value[1]))
    return value


def lr_scale(rule: str, batch_size: int) -> float:
    """DINOv3's scaling of the configured lr with the global batch: "sqrt_wrt_1024" (4 sqrt(batch / 1024), its
    default), "linear_wrt_256" (batch / 256) or "none"."""
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return batch_size / 256.0
    if rule == "none":
        return 1.0
    raise ValueError(f"lr_scaling must be sqrt_wrt_1024, linear_wrt_256 or none, got {rule!r}")


def prototypes_for_batch(batch_size: int) -> int:
    """Prototype count for a global batch: 32 per Sinkhorn row (2 global crops per image), as a power of two,
    between 256 and 65,536 (DINOv3's default)."""
    k = PROTOTYPES_PER_ROW * 2 * batch_size
    return int(min(MAX_PROTOTYPES, max(MIN_PROTOTYPES, 2 ** int(math.floor(math.log2(k))))))


def entropy_floor(n_prototypes: int, batch_size: int) -> float:
    """The least per-target entropy Sinkhorn's equal mass per prototype allows: log(K / rows), rows = 2 x batch."""
    return math.log(max(1.0, n_prototypes / (2 * batch_size)))


def prototype_warning(n_prototypes: int, batch_size: int) -> str | None:
    """A warning when `n_prototypes` is more than 32 per Sinkhorn row of a `batch_size` step, else None."""
    if n_prototypes <= PROTOTYPES_PER_ROW * 2 * batch_size:
        return None
    floor = entropy_floor(n_prototypes, batch_size)
    return (f"{n_prototypes} prototypes for a batch of {batch_size} images: Sinkhorn-Knopp's equal mass per prototype "
            f"keeps every target's entropy above log(K / 2B) = {floor:.2f} ({floor / math.log(n_prototypes):.0%} of "
            f"log K), so targets barely differ between images; DINOv3 uses 32 per row: "
            f"head out_dim={prototypes_for_batch(batch_size)} (or a larger batch_size)")


def _layer_id(name: str, depth: int) -> int:
    """DINOv3's layer index of a student parameter: 0 for the patch embedding and the tokens, block i -> i + 1,
    everything after the blocks (final norm, heads) depth + 1."""
    if not name.startswith("backbone."):
        return depth + 1
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    if "patch_embed" in name or "token" in name:
        return 0
    return depth + 1


def optimizer_groups(student: torch.nn.Module, depth: int, layer_decay: float, patch_embed_lr: float) -> list[dict]:
    """AdamW parameter groups with DINOv3's lr multipliers: ``layer_decay ** (depth + 1 - layer)`` (the earlier a
    layer, the smaller its lr), times ``patch_embed_lr`` on the patch embedding; no weight decay on biases, norms,
    layer scales and tokens (``weight_decay`` is then 0 in the group named "no_decay")."""
    groups: dict[tuple, dict] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        mult = layer_decay ** (depth + 1 - _layer_id(name, depth))
        if "patch_embed" in name:
            mult *= patch_embed_lr
        decay = not (p.ndim <= 1 or name.endswith(".bias") or "token" in name)
        key = (decay, round(mult, 12))
        if key not in groups:
            groups[key] = {"params": [], "name": "decay" if decay else "no_decay", "lr_multiplier": mult}
            if not decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(p)
    return list(groups.values())


def step_schedules(cfg) -> dict:
    """Per-step arrays (``cfg.steps`` values each) of a run whose stage defaults are resolved
    (``PretrainConfig.with_stage_defaults``): lr (scaled with the batch), weight_decay, momentum, teacher_temp and
    local_weight (the DINO local-crop pairs' weight). Indexed by the step number alone, so a resumed run needs no
    scheduler state."""
    from .schedules import cosine_schedule

    total = int(cfg.steps)
    scale = lr_scale(cfg.lr_scaling, cfg.batch_size)
    return {"lr": cosine_schedule(cfg.lr * scale, cfg.min_lr * scale, total, cfg.warmup_steps,
                                  warmup_shape=cfg.warmup_shape),
            "weight_decay": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total),
            "momentum": cosine_schedule(cfg.momentum, cfg.momentum_end, total),
            "teacher_temp": cosine_schedule(cfg.teacher_temp, cfg.teacher_temp, total, cfg.teacher_temp_warmup_steps,
                                            start_warmup=cfg.warmup_teacher_temp),
            "local_weight": cosine_schedule(cfg.local_loss_weight, cfg.local_loss_weight, total,
                                            cfg.local_weight_steps, start_warmup=1.0, warmup_shape="cosine")}
