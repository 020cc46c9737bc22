"""Soft Dice (foreground classes, batch Dice, smooth 1e-5) + cross-entropy, weight 1 each (nnU-Net's DC_and_CE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5, batch_dice: bool = True,
              include_background: bool = False) -> torch.Tensor:
    """Per-class soft Dice (C',) of softmax(logits) (B, C, H, W) against integer `target` (B, H, W)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3) if batch_dice else (2, 3)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    return dice if batch_dice else dice.mean(0)


class DiceCELoss(nn.Module):
    """`weight_dice * (1 - mean foreground soft Dice) + weight_ce * CE`; returns (loss, parts dict)."""

    def __init__(self, weight_dice: float = 1.0, weight_ce: float = 1.0, smooth: float = 1e-5, batch_dice: bool = True):
        super().__init__()
        self.weight_dice, self.weight_ce, self.smooth, self.batch_dice = weight_dice, weight_ce, smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits.float(), target.long())
        dice = soft_dice(logits, target, self.smooth, self.batch_dice).mean() if logits.shape[1] > 1 else ce * 0 + 1
        loss = self.weight_dice * (1 - dice) + self.weight_ce * ce
        return loss, {"ce": ce.detach(), "dice": dice.detach()}


def dice_per_class(pred, target, labels) -> dict:
    """Hard Dice per label value of two integer arrays (numpy); NaN-free: 1.0 when both are empty."""
    import numpy as np

    out = {}
    for v in labels:
        p, t = pred == v, target == v
        denom = int(p.sum()) + int(t.sum())
        out[v] = 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)
    return out
