"""Key conversion between upstream layouts and this project's network.

Upstream DINOv3 naming (Meta's checkpoints, the MedDINOv3 `model.pth` teacher, nnU-Net's `dino_encoder.*`)
-> timm EVA naming inside `backbone.vit.*`; the reference Primus decoder `up_projection.decode.*` ->
`decoder.*`. Conversions are strict: anything not understood is reported, never silently dropped.
"""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig, quartile_blocks
from .safe_load import CheckpointError

# Keys of DINOv3 checkpoints that only matter for pretraining heads or other model families.
DROPPED_PREFIXES = ("dino_head.", "ibot_head.")


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def unwrap_module_prefixes(state_dict: dict) -> dict:
    """Remove wrappers added by DDP (`module.`) and torch.compile (`_orig_mod.`)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def is_dinov3_backbone(state_dict: dict) -> bool:
    return "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict


def infer_backbone_config(sd: dict, source: str, **fields) -> ModelConfig:
    """Architecture of a DINOv3-naming backbone state dict (head count from the RoPE periods)."""
    if not is_dinov3_backbone(sd):
        raise CheckpointError(f"{source}: no DINOv3 backbone keys (cls_token, patch_embed, blocks.*) found")
    embed_dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "rope_embed.periods" in sd:
        head_dim = 4 * sd["rope_embed.periods"].numel()
    else:  # the standard head width of every released DINOv3 ViT
        head_dim = 64
    patch = sd["patch_embed.proj.weight"]
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    reg = sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0
    if "blocks.0.mlp.w1.weight" in sd or "blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError(f"{source}: SwiGLU-FFN DINOv3 variants are not supported")
    if "cls_norm.weight" in sd:
        raise CheckpointError(f"{source}: DINOv3 variants with untied CLS norms are not supported")
    size = {768: "base", 384: "small", 1024: "large", 96: "tiny"}.get(embed_dim, "custom")
    params = dict(
        size=size, embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
        patch_size=patch.shape[-1], in_chans=patch.shape[1], mlp_ratio=mlp_hidden / embed_dim,
        num_reg_tokens=reg, qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in sd else 0.0,
        feature_blocks=quartile_blocks(depth),
    )
    params.update(fields)
    return ModelConfig(**params)


def dinov3_to_backbone(sd: dict, source: str) -> dict:
    """DINOv3 naming -> `backbone.*` keys of `MedDINOv3` / `DINOv3Backbone` (without the `backbone.` prefix)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k.startswith(DROPPED_PREFIXES) or k.endswith(".bias_mask"):
            continue
        if k == "mask_token":
            out["mask_token"] = v.reshape(1, -1)
            continue
        if k == "rope_embed.periods":
            out["vit.rope.periods"] = v.float()
            continue
        if k == "storage_tokens":
            out["vit.reg_token"] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            if rest == "attn.qkv.bias":
                q, kb, vb = v.chunk(3)
                mask = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
                if mask is not None:  # masked key bias (Meta's checkpoints): the key bias is effectively zero
                    kb = kb * mask.chunk(3)[1].nan_to_num(0.0).to(kb.dtype)
                out[f"vit.blocks.{i}.attn.q_bias"] = q
                out[f"vit.blocks.{i}.attn.k_bias"] = kb
                out[f"vit.blocks.{i}.attn.v_bias"] = vb
                continue
            rest = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)
            if rest.split(".")[0] in ("norm1", "norm2", "attn", "mlp", "gamma_1", "gamma_2"):
                out[f"vit.blocks.{i}.{rest}"] = v
                continue
        if k in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
            out[f"vit.{k}"] = v
            continue
        unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: unexpected backbone keys: {', '.join(sorted(unknown)[:20])}"
                              + (" ..." if len(unknown) > 20 else ""))
    return out


def primus_decoder_to_decoder(sd: dict, num_stages: int, source: str) -> dict:
    """Reference `up_projection.decode.{i}.{0,1}` / `decode.{n}` -> `decoder.stages.{i}.{0,1}` / `decoder.head`."""
    out = {}
    unknown = []
    for k, v in sd.items():
        m = re.match(r"decode\.(\d+)\.(?:(\d+)\.)?(weight|bias)$", k)
        if not m:
            unknown.append(k)
            continue
        stage, layer, kind = int(m.group(1)), m.group(2), m.group(3)
        if stage == num_stages and layer is None:
            out[f"head.{kind}"] = v
        elif stage < num_stages and layer in ("0", "1"):
            out[f"stages.{stage}.{layer}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: unexpected decoder keys: {', '.join(sorted(unknown))}")
    return out


def load_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load weights; missing or unexpected keys (or shape mismatches) raise an error listing them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
        problems.append("shape mismatches: " + ", ".join(
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:10]))
    if problems:
        raise CheckpointError(f"{source}: weights do not match the network: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
