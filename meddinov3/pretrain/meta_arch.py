"""Student / EMA-teacher meta-architecture: backbones, DINO + iBOT heads, losses, Gram teacher.

``SSLMetaArch.forward_losses(global, local, masks, teacher_temp)`` returns the weighted total loss (to
backpropagate through the student) and detached statistics (per-loss values, teacher entropies, teacher
feature spread) that the loop logs and the collapse detector reads. ``update_teacher(m)`` is the EMA step.
The teacher and the Gram teacher never receive gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model.backbone import DINOv3Backbone
from .heads import DINOHead
from .losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
from .losses.dino import all_reduce_sum


@dataclass
class HeadConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_out_dim: int | None = None  # None: same as out_dim


def _to3(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) CT crops -> the 3-channel input the DINOv3 patch embedding expects."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class SSLMetaArch(nn.Module):
    def __init__(self, mcfg: ModelConfig, head: HeadConfig, centering: str = "sinkhorn",
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 loss_weights: dict | None = None, gram: bool = False) -> None:
        super().__init__()
        if centering not in ("sinkhorn", "centering", "none"):
            raise ValueError(f"centering must be 'sinkhorn', 'centering' or 'none', got {centering!r}")
        self.centering = centering
        ibot_dim = head.ibot_out_dim or head.out_dim
        self.student = nn.ModuleDict({
            "backbone": DINOv3Backbone(mcfg),
            "dino_head": DINOHead(mcfg.embed_dim, head.out_dim, head.hidden_dim, head.bottleneck_dim, head.nlayers),
            "ibot_head": DINOHead(mcfg.embed_dim, ibot_dim, head.hidden_dim, head.bottleneck_dim, head.nlayers),
        })
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(head.out_dim, student_temp, center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_dim, student_temp, center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss(apply_norm=True, img_level=True)
        self.weights = {"dino": 1.0, "ibot": 1.0, "koleo": 0.1, "gram": 1.0, **(loss_weights or {})}
        self.gram_teacher: DINOv3Backbone | None = None
        if gram:
            self.enable_gram()

    # ------------------------------------------------------------------------------------------ set-up
    def load_backbone_weights(self, sd: dict) -> None:
        """Same backbone weights into student and teacher (from --base)."""
        from ..checkpoints.convert import load_strict

        load_strict(self.student["backbone"], sd, "base backbone")
        self.teacher["backbone"].load_state_dict(self.student["backbone"].state_dict())

    def enable_gram(self, sd: dict | None = None) -> None:
        """Freeze a Gram teacher: a copy of the EMA teacher's backbone now, or the given backbone weights."""
        gt = copy.deepcopy(self.teacher["backbone"])
        if sd is not None:
            gt.load_state_dict(sd)
        gt.requires_grad_(False)
        gt.eval()
        self.gram_teacher = gt

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter. Under FSDP both are
        sharded alike (``parallel.shard``), so this runs on the local shards."""
        s = [p.detach() for p in self.student.parameters()]
        t = [p for p in self.teacher.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------ targets
    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor, temp: float):
        n_views = 2
        out = self.teacher["backbone"].forward_features(_to3(global_crops))
        cls = out["cls"]
        cls_logits = self.teacher["dino_head"](cls)
        masked_patch = out["patch"][masks]
        patch_logits = self.teacher["ibot_head"](masked_patch)
        if self.centering == "sinkhorn":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)
            n_total = all_reduce_sum(masks.sum().to(cls_logits.device, torch.float32).reshape(1))
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp, n_masked_patches=n_total)
        elif self.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, temp)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_loss.update_center(patch_logits)
        else:
            cls_probs = F.softmax(cls_logits.float() / temp, dim=-1)
            patch_probs = F.softmax(patch_logits.float() / temp, dim=-1)
        # monitoring: raw sharpened teacher distribution (before centring / balancing)
        raw = F.softmax(cls_logits.float() / temp, dim=-1)
        stats = teacher_stats(raw, cls_probs, cls)
        return cls_probs.chunk(n_views), patch_probs, stats

    # ------------------------------------------------------------------------------------------ losses
    def forward_losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                       teacher_temp: float) -> tuple[torch.Tensor, dict]:
        """global_crops (2B, 1, G, G) view-major, local_crops (nB, 1, L, L) or empty, masks (2B, h*w) bool."""
        t_cls_probs, t_patch_probs, stats = self._teacher_targets(global_crops, masks, teacher_temp)
        s_glob = self.student["backbone"].forward_features(_to3(global_crops), masks=masks)
        s_cls = [s_glob["cls"]]
        n_local = 0
        if local_crops.numel():
            s_loc = self.student["backbone"].forward_features(_to3(local_crops))
            s_cls.append(s_loc["cls"])
            n_local = local_crops.shape[0] // (global_crops.shape[0] // 2)
        cls_logits = self.student["dino_head"](torch.cat(s_cls))
        student_list = cls_logits.chunk(2 + n_local)
        dino = self.dino_loss(list(student_list), list(t_cls_probs))
        s_patch_logits = self.student["ibot_head"](s_glob["patch"][masks])
        ibot = self.ibot_loss.forward_masked(s_patch_logits, t_patch_probs, masks)
        koleo = sum(self.koleo_loss(c) for c in s_glob["cls"].chunk(2)) / 2
        losses = {"dino": dino, "ibot": ibot, "koleo": koleo}
        if self.gram_teacher is not None:
            with torch.no_grad():
                g_patch = self.gram_teacher.forward_features(_to3(global_crops))["patch"]
            losses["gram"] = self.gram_loss(s_glob["patch"], g_patch)
        total = sum(self.weights[k] * v for k, v in losses.items())
        stats.update({k: float(v.detach()) for k, v in losses.items()})
        return total, stats


@torch.no_grad()
def teacher_stats(raw_probs: torch.Tensor, target_probs: torch.Tensor, cls: torch.Tensor) -> dict:
    """Collapse indicators, all-rank: mean per-sample teacher entropy, entropy of the mean teacher distribution
    (prototype usage) as a fraction of log K, and the spread of L2-normalised teacher CLS features across the
    batch (mean per-dimension std x sqrt(D): about 1 for features spread over the sphere, 0 when collapsed)."""
    k = raw_probs.shape[-1]
    n = raw_probs.new_tensor([float(raw_probs.shape[0])])
    ent_sum = -(target_probs * target_probs.clamp_min(1e-12).log()).sum()
    mean_raw = all_reduce_sum(raw_probs.sum(0))
    z = F.normalize(cls.float(), dim=-1)
    n_all = all_reduce_sum(n.clone())
    mean_z = all_reduce_sum(z.sum(0)) / n_all  # two passes: identical rows give exactly 0
    s2 = all_reduce_sum(((z - mean_z) ** 2).sum(0))
    ent_all = all_reduce_sum(ent_sum.reshape(1))
    mean_raw = mean_raw / n_all
    usage = float(-(mean_raw * mean_raw.clamp_min(1e-12).log()).sum() / math.log(k))
    var = s2 / (n_all - 1).clamp_min(1)
    spread = float(var.sqrt().mean() * math.sqrt(z.shape[-1]))
    return {"teacher_entropy": float(ent_all / n_all), "prototype_usage": usage, "teacher_feature_std": spread}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
