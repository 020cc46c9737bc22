"""The DINOv3 ViT backbone, built from timm's EVA implementation and configured like the reference.

timm's defaults differ from the reference network in two places that change outputs: LayerNorm eps
(timm 1e-5, reference 1e-6) and the RoPE periods (timm recomputes them in fp32, checkpoints carry bf16-rounded
values the reference uses). Both are fixed here; the periods and the live key bias of qkv-bias variants are made
persistent so they travel with our own checkpoints.

`reference_precision` (off by default) computes RoPE as the reference does: coordinates, angles, sin/cos and the
q/k rotation in bf16 (queries and keys are rounded to bf16 around the rotation), for fidelity checks against it.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import math

import timm
import torch
from timm.layers import LayerNorm
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig


class SubsetDropPath(nn.Module):
    """DINOv3's stochastic depth (`SelfAttentionBlock`, `sample_drop_ratio`): in training, a random subset of exactly
    max(int(B * (1 - rate)), 1) samples of the batch keeps the residual branch, scaled by B / subset size; the others
    get nothing. (DINOv3 computes the branch on the subset only; the result is the same.) At B = 12 and rate 0.2 that
    keeps 9 of 12, at B = 2 one of 2: not timm's independent per-sample draw."""

    def __init__(self, rate: float):
        super().__init__()
        self.drop_prob = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob <= 0:
            return x
        b = x.shape[0]
        keep = max(int(b * (1 - self.drop_prob)), 1)
        scale = torch.zeros(b, device=x.device, dtype=x.dtype)
        scale[torch.randperm(b, device=x.device)[:keep]] = b / keep
        return x * scale.view(b, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth `rate` on both residual branches of every block, as DINOv3's ViT (and so the MedDINOv3
    reference trainer, `vit_base(drop_path_rate=0.2)`) does; timm's `drop_path_rate` would ramp from 0 to it."""
    for blk in vit.blocks:
        blk.drop_path1 = SubsetDropPath(rate) if rate > 0 else nn.Identity()
        blk.drop_path2 = SubsetDropPath(rate) if rate > 0 else nn.Identity()


class DINOv3Backbone(nn.Module):
    """ViT with CLS + register tokens and RoPE; returns final-normed token maps of chosen blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vit = timm.create_model(
            "vit_base_patch16_dinov3",
            pretrained=False,
            num_classes=0,
            img_size=224,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            num_reg_tokens=cfg.num_reg_tokens,
            init_values=cfg.layer_scale_init,
            rope_temperature=cfg.rope_base,
            norm_layer=partial(LayerNorm, eps=cfg.norm_eps),
            drop_path_rate=0.0,  # timm ramps it linearly over the blocks; DINOv3 uses one rate: set_drop_path
        )
        set_drop_path(self.vit, cfg.drop_path_rate)
        # Only used by masked-image (iBOT) pretraining; DINOv3 checkpoints carry it.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        # From scratch, timm draws the CLS and register tokens with std 0.02 while layer scale (1e-5) keeps what
        # the blocks add ~1e-5: the final LayerNorm then outputs the same CLS for every image, self-distillation
        # targets start uniform and the heads settle in that uniform fixed point. Tokens near zero (DINOv2's
        # 1e-6) let the LayerNorm see the image-dependent part from the first step. Loaded weights replace them.
        nn.init.normal_(self.vit.cls_token, std=1e-6)
        if getattr(self.vit, "reg_token", None) is not None:
            nn.init.normal_(self.vit.reg_token, std=1e-6)
        rope = self.vit.rope
        if hasattr(rope, "periods"):
            rope.register_buffer("periods", rope.periods, persistent=True)
        if cfg.qkv_bias:
            for blk in self.vit.blocks:
                if getattr(blk.attn, "k_bias", None) is not None:
                    blk.attn.register_buffer("k_bias", blk.attn.k_bias, persistent=True)
        self.grad_checkpointing = False
        self.reference_precision = False

    def set_reference_precision(self, enabled: bool) -> None:
        """RoPE in bf16 as the reference computes it (True) or in fp32 (False, the default)."""
        self.reference_precision = bool(enabled)
        for blk in self.vit.blocks:  # q_norm/k_norm are identities in DINOv3: the hook where q and k are rounded
            blk.attn.q_norm = _RoundToBF16() if enabled else nn.Identity()
            blk.attn.k_norm = _RoundToBF16() if enabled else nn.Identity()

    def _reference_rope(self, h: int, w: int, device) -> torch.Tensor:
        """(h*w, 2*head_dim) [sin, cos] computed in bf16 step by step like the reference's RoPE module:
        0.5-centred coordinates / size -> [-1, 1], angles 2*pi*coord/period, rotate-half layout."""
        dd = {"device": device, "dtype": torch.bfloat16}
        coords_h = torch.arange(0.5, h, **dd) / h
        coords_w = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        periods = self.vit.rope.periods.to(**dd)
        angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_reg_tokens

    def forward_blocks(self, x: torch.Tensor, blocks: Sequence[int], masks: torch.Tensor | None = None,
                       norm: bool = True) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Token sequences (B, prefix + h*w, C) after each of `blocks`, and the patch grid (h, w).

        `masks` (B, h*w) bool replaces those patch embeddings by the mask token (iBOT).
        """
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, C): dynamic_img_size keeps the grid
        B, h, w, C = x.shape
        if masks is not None:
            x = torch.where(masks.view(B, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, C), x)
        x, rope = vit._pos_embed(x)
        if self.reference_precision:
            rope = self._reference_rope(h, w, x.device)
        x = vit.norm_pre(x)
        last = max(blocks)
        taken = {}
        for i, blk in enumerate(vit.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, rope=rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
            if i in blocks:
                taken[i] = vit.norm(x) if norm else x
            if i == last:
                break
        return [taken[i] for i in blocks], (h, w)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Final-normed CLS, register and patch tokens of the last block (what pretraining heads consume)."""
        (tokens,), _ = self.forward_blocks(x, [self.config.depth - 1], masks=masks)
        p = self.num_prefix_tokens
        return {"cls": tokens[:, 0], "registers": tokens[:, 1:p], "patch": tokens[:, p:]}

    def feature_maps(self, x: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens of `blocks` as (B, C, h, w) maps, prefix tokens dropped."""
        outputs, (h, w) = self.forward_blocks(x, blocks)
        p = self.num_prefix_tokens
        return [t[:, p:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in outputs]


class _RoundToBF16(nn.Module):
    """Queries/keys to bf16: the rotation then runs in bf16 and timm casts the result back to the value dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)
