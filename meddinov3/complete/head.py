"""The light head fitted on the painted slices: a per-voxel MLP over image features (smoothed intensities and
gradients at a few scales, 3D so that neighbouring slices count), the shape prior and optional backbone features.

It is trained leave-one-out on the prior: a painted slice's prior input is the interpolation of the *other* painted
slices, so the head learns where the interpolation goes wrong on this image (and by how much to trust it) instead of
copying the truth it is given. Per-voxel (no convolutions) keeps a fit to a few seconds on two CPU cores.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRIOR_LOGIT = 4.0  # logit of a label where its prior input (tanh of the signed distance) is 1


class CompletionHead(nn.Module):
    """(N, in_features) -> (N, classes) logits: the shape prior's own vote plus a learnt correction.

    `prior_columns`: the input columns holding each label's prior (tanh of the signed distance, in class order 1..).
    The prior enters the logits directly (PRIOR_LOGIT * prior for each label, 0 for background) and the correction's
    last layer starts at zero: before any training step the head *is* the interpolation, so a short time budget
    can only move it from there, never start from noise.

    The correction is scaled by the slice's distance to its nearest painted slice (`distance_column`) over
    `reference` (same unit: the typical distance in the leave-one-out training): the interpolation's error grows with that
    distance, and a slice next to a painted one, closer than any training example, needs little correction.
    """

    def __init__(self, in_features: int, classes: int, prior_columns: slice, distance_column: int,
                 reference: float, hidden: int = 64):
        super().__init__()
        self.prior_columns, self.distance_column = prior_columns, distance_column
        self.reference = float(max(reference, 1e-4))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = PRIOR_LOGIT * x[:, self.prior_columns]
        scale = (x[:, self.distance_column:self.distance_column + 1] / self.reference).clamp(max=1.0)
        return scale * self.net(x) + F.pad(prior, (1, 0))


def balanced_weights(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Sampling weight per voxel: half of the draws uniform, half spread equally over the present classes (a small
    tumour is seen often enough, without the head forgetting how rare it is)."""
    counts = torch.bincount(targets, minlength=classes).float()
    present = int((counts > 0).sum())
    per_class = torch.where(counts > 0, 1.0 / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    return 0.5 / len(targets) + 0.5 * per_class[targets]


def fit_head(head: CompletionHead, inputs: torch.Tensor, targets: torch.Tensor, time_budget_s: float,
             max_steps: int, batch_size: int = 4096, lr: float = 3e-3, cancel=None, progress=None,
             seed: int = 0) -> dict:
    """Train `head` on painted voxels: `inputs` (N, F) float, `targets` (N,) class indices.

    Batches are class-balanced; stops after `max_steps` or `time_budget_s` seconds, whichever comes first (the
    learning rate follows a cosine over that). Returns {"steps", "seconds", "loss"} (mean of the last 20 steps).
    """
    gen = torch.Generator().manual_seed(seed)
    weights = balanced_weights(targets, head.net[-1].out_features)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    started = time.perf_counter()
    losses: list[float] = []
    step = 0
    while step < max_steps and time.perf_counter() - started < time_budget_s:
        if cancel is not None and cancel():
            from ..engine import Cancelled

            raise Cancelled("completion cancelled")
        done = max(step / max_steps, (time.perf_counter() - started) / max(time_budget_s, 1e-6))
        for group in opt.param_groups:  # warm-up, then cosine to 0 over whichever of steps / time runs out first
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        pick = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        loss = F.cross_entropy(head(inputs[pick]), targets[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if progress is not None and step % 50 == 0:
            progress.update(step, max_steps, stage="fitting")
    head.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - started, 2),
            "loss": round(float(np.mean(losses[-20:])), 4) if losses else None}


@torch.no_grad()
def predict(head: CompletionHead, inputs: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """(N, F) -> (N, classes) float32 probabilities, in chunks (bounded memory)."""
    head.eval()
    return torch.cat([head(inputs[i:i + chunk].float()).softmax(1) for i in range(0, len(inputs), chunk)])
