"""An independent implementation of the documented reference network, for numerical-fidelity tests.

Written from the architecture description (shared/reference/meddinov3.md), not from any code: DINOv3 ViT with
CLS + register tokens, RoPE (base 100, coordinates normalised to [-1, 1] per axis, rotate-half layout, patch
tokens only), LayerScale, LayerNorm eps 1e-6; blocks' outputs passed through the final norm; Primus patch
decoder (ConvTranspose 2x2 -> channel LayerNorm -> GELU per stage, 1x1 conv head). It consumes weights in the
upstream naming (`blocks.{i}.attn.qkv.weight`, `storage_tokens`, `up_projection.decode.{i}.{0,1}`...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_dinov3_state_dict(embed_dim=96, depth=4, num_heads=2, n_reg=4, qkv_bias=False, mask_k_bias=False,
                           patch=16, in_chans=3, seed=0, mlp_ratio=4.0) -> dict[str, torch.Tensor]:
    """Random weights with exactly the upstream DINOv3 key names, shapes and dtypes (periods in bf16)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    head_dim = embed_dim // num_heads
    hidden = int(embed_dim * mlp_ratio)
    sd = {
        "cls_token": rnd(1, 1, embed_dim, scale=0.5),
        "mask_token": rnd(1, embed_dim),
        "patch_embed.proj.weight": rnd(embed_dim, in_chans, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rnd(embed_dim, scale=0.1),
        "rope_embed.periods": (100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))).to(torch.bfloat16),
        "norm.weight": 1 + rnd(embed_dim, scale=0.1),
        "norm.bias": rnd(embed_dim, scale=0.1),
    }
    if n_reg:
        sd["storage_tokens"] = rnd(1, n_reg, embed_dim, scale=0.5)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + rnd(embed_dim, scale=0.1), p + "norm1.bias": rnd(embed_dim, scale=0.1),
            p + "attn.qkv.weight": rnd(3 * embed_dim, embed_dim, scale=0.1),
            p + "attn.proj.weight": rnd(embed_dim, embed_dim, scale=0.1), p + "attn.proj.bias": rnd(embed_dim),
            p + "ls1.gamma": 0.5 + rnd(embed_dim, scale=0.1),
            p + "norm2.weight": 1 + rnd(embed_dim, scale=0.1), p + "norm2.bias": rnd(embed_dim, scale=0.1),
            p + "mlp.fc1.weight": rnd(hidden, embed_dim, scale=0.1), p + "mlp.fc1.bias": rnd(hidden),
            p + "mlp.fc2.weight": rnd(embed_dim, hidden, scale=0.1), p + "mlp.fc2.bias": rnd(embed_dim),
            p + "ls2.gamma": 0.5 + rnd(embed_dim, scale=0.1),
        })
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = rnd(3 * embed_dim, scale=0.5)
            if mask_k_bias:
                mask = torch.ones(3 * embed_dim)
                mask[embed_dim:2 * embed_dim] = 0.0
                sd[p + "attn.qkv.bias_mask"] = mask
    return sd


def make_primus_decoder_state_dict(in_channels: int, num_classes: int, stages=4, seed=1) -> dict[str, torch.Tensor]:
    """Upstream `up_projection.decode.*` naming (without the `up_projection.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd, c = {}, in_channels
    for i in range(stages):
        sd[f"decode.{i}.0.weight"] = torch.randn(c, c // 2, 2, 2, generator=g) * (1 / math.sqrt(c))
        sd[f"decode.{i}.0.bias"] = torch.randn(c // 2, generator=g) * 0.1
        sd[f"decode.{i}.1.weight"] = 1 + torch.randn(c // 2, generator=g) * 0.1
        sd[f"decode.{i}.1.bias"] = torch.randn(c // 2, generator=g) * 0.1
        c //= 2
    sd[f"decode.{stages}.weight"] = torch.randn(num_classes, c, 1, 1, generator=g) * (1 / math.sqrt(c))
    sd[f"decode.{stages}.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return sd


def _rope_bf16(h: int, w: int, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's own RoPE numerics (its default dtype): every step in bf16."""
    ch = torch.arange(0.5, h, dtype=torch.bfloat16) / h
    cw = torch.arange(0.5, w, dtype=torch.bfloat16) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2) * 2.0 - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods.to(torch.bfloat16)[None, None, :]
    angles = angles.reshape(h * w, -1).repeat(1, 2)
    return angles.sin(), angles.cos()


def _rope(h: int, w: int, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ch = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    cw = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2)  # (hw, 2) as (row, col)
    angles = 2 * math.pi * coords[:, :, None] / periods.double()[None, None, :]  # (hw, 2, D/4)
    angles = angles.reshape(h * w, -1).repeat(1, 2)  # [rows..., cols..., rows..., cols...]
    return angles.sin().float(), angles.cos().float()


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_backbone(sd, x, blocks, num_heads, eps=1e-6, bf16_rope=False) -> list[torch.Tensor]:
    """Final-normed patch maps (B, C, h, w) after each of `blocks`. `bf16_rope`: RoPE as the reference computes it
    by default (tables in bf16; q and k rounded to bf16, rotated in bf16, then back to fp32)."""
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=sd["patch_embed.proj.weight"].shape[-1])
    _, C, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    prefix = [sd["cls_token"].expand(B, -1, -1)]
    if "storage_tokens" in sd:
        prefix.append(sd["storage_tokens"].expand(B, -1, -1))
    n_prefix = sum(p.shape[1] for p in prefix)
    z = torch.cat(prefix + [t], dim=1)
    sin, cos = (_rope_bf16 if bf16_rope else _rope)(h, w, sd["rope_embed.periods"].float())
    dh = C // num_heads
    outs = []
    for i in range(max(blocks) + 1):
        p = f"blocks.{i}."
        y = F.layer_norm(z, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        bias = sd.get(p + "attn.qkv.bias")
        if bias is not None and p + "attn.qkv.bias_mask" in sd:
            bias = bias * sd[p + "attn.qkv.bias_mask"]
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(B, -1, 3, num_heads, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if bf16_rope:
            q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
        q = torch.cat([q[:, :, :n_prefix], q[:, :, n_prefix:] * cos + _rotate_half(q[:, :, n_prefix:]) * sin], dim=2)
        k = torch.cat([k[:, :, :n_prefix], k[:, :, n_prefix:] * cos + _rotate_half(k[:, :, n_prefix:]) * sin], dim=2)
        q, k = q.to(v.dtype), k.to(v.dtype)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(B, -1, C)
        z = z + sd[p + "ls1.gamma"] * F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(z, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        z = z + sd[p + "ls2.gamma"] * y
        if i in blocks:
            n = F.layer_norm(z, (C,), sd["norm.weight"], sd["norm.bias"], eps)[:, n_prefix:]
            outs.append(n.transpose(1, 2).reshape(B, C, h, w))
    return outs


def reference_decoder(sd, x, eps=1e-6) -> torch.Tensor:
    i = 0
    while f"decode.{i}.0.weight" in sd:
        x = F.conv_transpose2d(x, sd[f"decode.{i}.0.weight"], sd[f"decode.{i}.0.bias"], stride=2)
        mean = x.mean(1, keepdim=True)
        var = ((x - mean) ** 2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + eps)
        x = x * sd[f"decode.{i}.1.weight"][None, :, None, None] + sd[f"decode.{i}.1.bias"][None, :, None, None]
        x = F.gelu(x)
        i += 1
    return F.conv2d(x, sd[f"decode.{i}.weight"], sd[f"decode.{i}.bias"])


def reference_forward(encoder_sd, decoder_sd, x, blocks, num_heads, bf16_rope=False) -> torch.Tensor:
    """(B, 1, H, W) with H, W multiples of 16 -> logits, as the reference Primus networks compute them."""
    x = x.repeat(1, 3, 1, 1)
    feats = reference_backbone(encoder_sd, x, blocks, num_heads, bf16_rope=bf16_rope)
    return reference_decoder(decoder_sd, torch.cat(feats, dim=1))
