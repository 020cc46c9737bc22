"""MedDINOv3: DINOv3 backbone -> multi-scale token aggregation -> patch decoder, for one 2D slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .backbone import DINOv3Backbone
from .decoder import PatchDecoder


class MedDINOv3(nn.Module):
    """Segmentation network. Input (B, 1, H, W) normalised slices of any size; output (B, classes, H, W) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = DINOv3Backbone(cfg)
        self.decoder = PatchDecoder(cfg.decoder_channels, cfg.num_classes, eps=cfg.norm_eps)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated final-normed patch maps of the feature blocks: (B, C * len(blocks), H/16, W/16)."""
        maps = self.backbone.feature_maps(x, self.config.feature_blocks)
        return torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) slices, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.config.patch_size
        pad_h, pad_w = -H % p, -W % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = x.expand(-1, self.config.in_chans, -1, -1)
        logits = self.decoder(self.features(x))
        return logits[..., :H, :W]


def build_model(cfg: ModelConfig) -> MedDINOv3:
    """The one way to build the network from its configuration."""
    return MedDINOv3(cfg)
