"""The light patch decoder: log2(patch) stages of 2x transposed convolution, channel LayerNorm, GELU.

On CPU, inference runs the same maps as matrix products on rows of pixels (`PatchDecoder._forward_rows`): a
kernel-2, stride-2 transposed convolution maps each input pixel to its own 2x2 output pixels, so every stage is a
GEMM per pixel followed by per-pixel LayerNorm and GELU, and pixels need to be put in place only once, at the end.
"""

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
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._forward_rows(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    # Pixels per chunk of the depth-first CPU path (~1 MB of float32 output rows stays in cache) and the largest
    # stage weight (elements) worth re-reading once per chunk.
    ROW_CHUNK = 2**18
    ROW_CHUNK_MAX_WEIGHT = 1_500_000

    def _row_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stage (and head) a (out, in) matrix whose output rows are ordered (dy, dx, channel), with its bias;
        rebuilt when a parameter changes (training step, load_state_dict, .to())."""
        key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self.parameters())
        cached = getattr(self, "_rows_cache", None)
        if cached is None or cached[0] != key:
            mats = []
            for stage in self.stages:
                conv = stage[0]
                c_in, c_out = conv.weight.shape[:2]
                w = conv.weight.detach().permute(2, 3, 1, 0).reshape(4 * c_out, c_in).contiguous()
                mats.append((w, conv.bias.detach().repeat(4)))
            mats.append((self.head.weight.detach()[:, :, 0, 0].contiguous(), self.head.bias.detach()))
            cached = self._rows_cache = (key, mats)
        return cached[1]

    def _rows_from(self, i: int, x: torch.Tensor, mats) -> torch.Tensor:
        """Stages i.. and the head on pixel rows `x` (N, C); large outputs of small stages go chunk by chunk
        (depth first keeps the rows in order: input row j becomes output rows 4j..4j+3)."""
        while i < len(self.stages):
            w, b = mats[i]
            if x.shape[0] > 1 and x.shape[0] * w.shape[0] > self.ROW_CHUNK and w.numel() <= self.ROW_CHUNK_MAX_WEIGHT:
                rows = max(1, self.ROW_CHUNK // w.shape[0])
                return torch.cat([self._rows_from(i, x[j:j + rows], mats) for j in range(0, x.shape[0], rows)])
            norm = self.stages[i][1]
            x = F.linear(x, w, b).view(-1, norm.normalized_shape[0])
            x = F.gelu(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
            i += 1
        return F.linear(x, *mats[-1])

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on CPU (~1.5x faster than the convolutions there); returns channels-last logits."""
        B, C, h, w = x.shape
        n = len(self.stages)
        rows = self._rows_from(0, x.permute(0, 2, 3, 1).reshape(-1, C), self._row_weights())
        # rows are ordered (b, y, x, dy1, dx1, ..., dyn, dxn): gather to (b, y, dy1..dyn, x, dx1..dxn, class)
        rows = rows.view(B, h, w, *([2, 2] * n), -1)
        order = [0, 1, *range(3, 3 + 2 * n, 2), 2, *range(4, 4 + 2 * n, 2), 3 + 2 * n]
        out = rows.permute(order).reshape(B, h * 2**n, w * 2**n, -1)
        return out.permute(0, 3, 1, 2)
