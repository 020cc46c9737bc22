"""AdamW with separate backbone / decoder learning rates, optional block freezing, linear decay to 0."""

from __future__ import annotations

import torch
from torch import nn


def freeze_blocks(model: nn.Module, n: int) -> int:
    """Freeze the patch embedding, tokens and the first `n` transformer blocks; returns frozen parameter count."""
    if n <= 0:
        return 0
    vit = model.backbone.vit
    frozen = [model.backbone.mask_token, *vit.patch_embed.parameters(), *list(vit.blocks[:n].parameters())]
    for name in ("cls_token", "reg_token"):
        if getattr(vit, name, None) is not None:
            frozen.append(getattr(vit, name))
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def param_groups(model: nn.Module, lr_backbone: float, lr_decoder: float, weight_decay: float,
                 decay_all: bool = False) -> list[dict]:
    """Four groups: backbone/decoder x decayed/not (biases, norms, tokens, LayerScale get no weight decay unless
    `decay_all`, as the reference trainer's two plain AdamW groups do)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "decoder"
        no_decay = not decay_all and (p.ndim <= 1 or name.endswith(("cls_token", "reg_token", "mask_token", "gamma")))
        key = (part, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr_backbone if part == "backbone" else lr_decoder,
                           "weight_decay": 0.0 if no_decay else weight_decay, "name": f"{part}{'_no_decay' if no_decay else ''}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr_backbone, cfg.lr_decoder, cfg.weight_decay,
                          cfg.weight_decay_all)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear decay from the base learning rates to 0 at `total_steps` (no warm-up, as the reference); with
    `steps_per_epoch`, in epoch steps as nnU-Net (the rate of epoch e, 1 - e / epochs, held for the whole epoch)."""
    total = max(1, int(total_steps))
    if steps_per_epoch:
        n = max(1, int(steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - (step // n) * n / total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
