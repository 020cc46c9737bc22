"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator).

Pushing each L2-normalised CLS feature away from its nearest neighbour in the batch spreads
the features uniformly over the sphere, which helps retrieval/k-NN quality and discourages
partial collapse (DINOv2, Sablayrolles et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean(log(nearest-neighbour distance + eps)) over a (B, D) batch; lower = more spread."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"KoLeoLoss expects (B, D) features, got {tuple(features.shape)}")
        if features.shape[0] < 2:  # no neighbour: nothing to spread
            return features.sum() * 0.0
        with torch.autocast(features.device.type, enabled=False):  # fp32 distances, as DINOv3
            return self._loss(features.float())

    def _loss(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features, dim=-1, eps=self.eps)
        with torch.no_grad():
            # On the unit sphere the nearest neighbour is the one with the largest dot product.
            dots = x @ x.t()
            dots.fill_diagonal_(-3.0)
            nn_idx = dots.argmax(dim=1)
        # pairwise_distance adds eps to the difference: duplicates give a small, finite
        # distance and a finite gradient instead of log(0) / 0-division.
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
        return -torch.log(dist + self.eps).mean()
