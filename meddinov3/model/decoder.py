"""The light patch decoder: log2(patch) stages of 2x transposed convolution, channel LayerNorm, GELU."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchDecoder(nn.Module):
    """Upsample patch features back to pixels; no skip connections (the reference's Primus decoder)."""

    def __init__(self, channels: Sequence[int], num_classes: int, eps: float = 1e-6):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2),
                LayerNorm2d(c_out, eps=eps),
                nn.GELU(),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.head = nn.Conv2d(channels[-1], num_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init with leaky slope 1e-2, as nnU-Net initialises the reference decoder."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)
