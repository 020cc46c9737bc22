"""Student / EMA-teacher meta-architecture: backbones, DINO + iBOT heads, losses, Gram teacher.

``SSLMetaArch.forward_losses(global, local, masks, teacher_temp)`` returns the weighted total loss (to
backpropagate through the student) and detached statistics (per-loss values, teacher entropies, teacher
feature spread) that the loop logs and the collapse detector reads. It is the two halves a micro-batched step
(``step.MicroBatchStep``) runs apart: ``teacher_targets`` (``teacher_logits`` + ``targets_from_logits``) once over
the whole step, then ``student_losses`` per micro-batch on its slice (``StepTargets.images``), with KoLeo's
whole-step gradient from ``koleo_gradient``. ``update_teacher(m)`` is the EMA step, ``refresh_gram`` the Gram
teacher's refresh. The teacher and the Gram teacher never receive gradients.
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

# DINOv3 scales KoLeo by the number of global crops (``koleo_scale = n_global_crops``): its weight 0.1 acts as 0.2 on
# the mean of the two crops' terms
KOLEO_CROPS = 2


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
                 loss_weights: dict | None = None, gram: bool = False, local_weight: float = 1.0) -> None:
        super().__init__()
        self.local_weight = local_weight  # DINO pairs of a local student crop count this much (DINOv3: 0.5 later)
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
        self.weights = {"dino": 1.0, "ibot": 1.0, "koleo": 0.1, "gram": 2.0, **(loss_weights or {})}
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
    def teacher_logits(self, global_crops: torch.Tensor, masks: torch.Tensor, chunk: int | None = None):
        """Teacher prototype logits of every global crop's CLS (2B, K) and of the student-masked patches (M, K, in
        ``x[masks]`` order), and the teacher CLS features (2B, D); ``chunk``: images per forward (bounds the
        activation memory, changes nothing else). Local to this process (no collective unless sharded)."""
        rows = global_crops.shape[0]
        step = rows if not chunk else 2 * chunk
        cls, patch = [], []
        for r0 in range(0, rows, step):
            out = self.teacher["backbone"].forward_features(_to3(global_crops[r0:r0 + step]))
            cls.append(out["cls"])
            patch.append(self.teacher["ibot_head"](out["patch"][masks[r0:r0 + step]]))
        cls = torch.cat(cls)
        return self.teacher["dino_head"](cls), torch.cat(patch), cls

    @torch.no_grad()
    def targets_from_logits(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor, cls: torch.Tensor,
                            masks: torch.Tensor, temp: float) -> StepTargets:
        """Targets balanced (Sinkhorn) or centred over every image of the step and of every process (a
        collective under torch.distributed), and the collapse statistics of the step."""
        if self.centering == "sinkhorn":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)
            n_total = all_reduce_sum(masks.sum().to(cls_logits.device, torch.float32).reshape(1))
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp, n_masked_patches=n_total)
        elif self.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, temp)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
            self.dino_loss.update_center(cls_logits)  # once per step, from the whole step's logits
            self.ibot_loss.update_center(patch_logits)
        else:
            cls_probs = F.softmax(cls_logits.float() / temp, dim=-1)
            patch_probs = F.softmax(patch_logits.float() / temp, dim=-1)
        # monitoring: raw sharpened teacher distribution (before centring / balancing)
        raw = F.softmax(cls_logits.float() / temp, dim=-1)
        return StepTargets(cls_probs, patch_probs, masks.sum(dim=1), teacher_stats(raw, cls_probs, cls))

    def teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor, temp: float) -> StepTargets:
        """The teacher side of one step over its whole batch (``global_crops`` (2B, 1, G, G) view-major, ``masks``
        (2B, h*w) bool), whatever micro-batches the student then uses."""
        return self.targets_from_logits(*self.teacher_logits(global_crops, masks), masks, temp)

    def koleo_value(self, cls: torch.Tensor) -> torch.Tensor:
        """KoLeo of the student's global-crop CLS features (2B, D), view-major: the mean of the two views' terms,
        each over the B images of this process's step (DINOv3's non-distributed KoLeo, per GPU batch)."""
        return sum(self.koleo_loss(c) for c in cls.chunk(2)) / 2

    def koleo_gradient(self, global_crops: torch.Tensor, masks: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
        """(KoLeo over the whole step, its gradient with respect to each image's CLS feature (2B, D)) for a
        micro-batched step.

        KoLeo couples every image of the step to its nearest neighbour, so a micro-batch alone cannot compute it.
        The student's masked global crops are run once more without gradients (in chunks of ``chunk`` images) and
        the loss is differentiated with respect to those features; each micro-batch then backpropagates
        ``(features * gradient).sum()`` (``StepTargets.koleo_grad``), whose parameter gradient is exactly the
        whole-step KoLeo's. Exact as long as the student forward is deterministic (stochastic depth draws other
        blocks to drop in the two passes: then an unbiased stand-in). Costs one extra no-grad student forward of
        the global crops, only when the step is split.
        """
        rows, step = global_crops.shape[0], 2 * chunk
        with torch.no_grad():
            cls = torch.cat([self.student["backbone"].forward_features(_to3(global_crops[r0:r0 + step]),
                                                                      masks=masks[r0:r0 + step])["cls"]
                             for r0 in range(0, rows, step)])
        leaf = cls.detach().float().requires_grad_(True)
        with torch.enable_grad():
            value = self.koleo_value(leaf)
            (grad,) = torch.autograd.grad(value, leaf)
        return float(value.detach()), grad

    # ------------------------------------------------------------------------------------------ losses
    def student_losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                       targets: StepTargets, share: float = 1.0,
                       gram_crops: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, detached per-loss values) of the student on some images of the step.

        ``targets``: the teacher side of the same images (``StepTargets.images``). ``share``: their fraction of the
        step: per-image losses (DINO, iBOT, Gram) are scaled by it, so the micro-batches' gradients sum to the
        whole step's. KoLeo comes whole from ``targets`` when the step is split (``koleo_grad``), else from these
        images. Loss weights as DINOv3: KoLeo counts once per global crop (x2). ``gram_crops`` (2B, 1, S, S): the
        Gram teacher's clean crops of the same regions (None: it sees the global crops).
        """
        s_glob = self.student["backbone"].forward_features(_to3(global_crops), masks=masks)
        s_cls = [s_glob["cls"]]
        n_local = 0
        if local_crops.numel():
            s_loc = self.student["backbone"].forward_features(_to3(local_crops))
            s_cls.append(s_loc["cls"])
            n_local = local_crops.shape[0] // (global_crops.shape[0] // 2)
        cls_logits = self.student["dino_head"](torch.cat(s_cls))
        losses = {"dino": self.dino_loss(list(cls_logits.chunk(2 + n_local)), list(targets.cls.chunk(2)),
                                         local_weight=self.local_weight)}
        s_patch_logits = self.student["ibot_head"](s_glob["patch"][masks])
        losses["ibot"] = self.ibot_loss.forward_masked(s_patch_logits, targets.patch, masks)
        if self.gram_teacher is not None:
            g_patch = self.gram_patches(global_crops if gram_crops is None else gram_crops, s_glob["patch"].shape[1])
            losses["gram"] = self.gram_loss(s_glob["patch"], g_patch)
        total = share * sum(self.weights[k] * v for k, v in losses.items())
        stats = {k: float(v.detach()) for k, v in losses.items()}
        koleo_w = self.weights["koleo"] * KOLEO_CROPS
        if targets.koleo_grad is None:
            koleo = self.koleo_value(s_glob["cls"])
            total = total + share * koleo_w * koleo
            stats["koleo"] = float(koleo.detach())
        else:
            total = total + koleo_w * (s_glob["cls"].float() * targets.koleo_grad).sum()
        return total, stats

    @torch.no_grad()
    def gram_patches(self, crops: torch.Tensor, n_patches: int) -> torch.Tensor:
        """Gram teacher patch features of ``crops`` (R, 1, S, S), resampled (bicubic, as DINOv3) to the student's
        ``n_patches`` (a square grid) when its crops are larger: (R, n_patches, D)."""
        patch = self.gram_teacher.forward_features(_to3(crops))["patch"]
        if patch.shape[1] == n_patches:
            return patch
        side, side_s = math.isqrt(patch.shape[1]), math.isqrt(n_patches)
        grid = patch.transpose(1, 2).reshape(patch.shape[0], -1, side, side)
        grid = F.interpolate(grid.float(), size=(side_s, side_s), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def refresh_gram(self) -> None:
        """Gram teacher <- the EMA teacher's backbone now (DINOv3's periodic refresh); local shards under FSDP."""
        for pg, pt in zip(self.gram_teacher.parameters(), self.teacher["backbone"].parameters()):
            pg.copy_(pt)

    def forward_losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                       teacher_temp: float, gram_crops: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The whole step in one pass. global_crops (2B, 1, G, G) view-major, local_crops (nB, 1, L, L) or empty,
        masks (2B, h*w) bool, gram_crops as ``student_losses``; (weighted total loss, statistics)."""
        targets = self.teacher_targets(global_crops, masks, teacher_temp)
        total, stats = self.student_losses(global_crops, local_crops, masks, targets, gram_crops=gram_crops)
        return total, {**targets.stats, **stats}


@dataclass
class StepTargets:
    """Teacher targets of one step for its B images (both global views), and KoLeo when the step is split.

    cls (2B, K) view-major; patch (M, K) for the masked patches in ``x[masks]`` order; counts (2B,) masked patches
    per row; koleo / koleo_grad (2B, D): see ``SSLMetaArch.koleo_gradient``.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    counts: torch.Tensor
    stats: dict
    koleo: float | None = None
    koleo_grad: torch.Tensor | None = None

    def images(self, b: int, j0: int, j1: int) -> StepTargets:
        """The targets of images j0:j1 (of b), in the layout of their own view-major micro-batch."""
        offsets = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)]).tolist()
        rows = [torch.arange(v * b + j0, v * b + j1) for v in range(2)]
        patch = torch.cat([self.patch[offsets[v * b + j0]:offsets[v * b + j1]] for v in range(2)])
        rows = torch.cat(rows).to(self.cls.device)
        grad = None if self.koleo_grad is None else self.koleo_grad[rows]
        return StepTargets(self.cls[rows], patch, self.counts[rows], self.stats, self.koleo, grad)


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
