"""DINO self-distillation loss on image-level (CLS) prototype scores.

The student sees every crop; the teacher sees only the two global crops. Each student crop
is pushed towards the teacher's distribution for every *other* global view, which forces
the representation to be invariant to crop, scale and intensity jitter.

Two ways to turn teacher logits into targets, both here because both are used:
  * centring + sharpening (DINO): subtract an EMA of the batch mean, then a low-temperature
    softmax. The centre stops one prototype from dominating, the low temperature stops the
    output from becoming uniform.
  * Sinkhorn-Knopp (SwAV / DINOv2): find the soft assignment with equal total mass per
    prototype, which rules out collapse without any running state.

``sinkhorn_knopp`` and ``all_reduce_sum`` are module-level so the iBOT loss can share them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` in place over all ranks when torch.distributed is running; no-op otherwise."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    n_rows_total: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Balanced soft assignment of ``logits`` (M, K) rows to K prototypes.

    Alternately rescales so that every prototype gets total mass M_total / K (M_total counted
    over all ranks) and every row sums to 1. Returns (M, K) probabilities, rows summing to 1.

    ``n_rows_total``: the number of rows over all ranks, when it is not ``M * world_size``
    (e.g. a different number of masked patches per rank). Computed in float32.
    """
    logits = logits.float()
    n_rows, n_protos = logits.shape
    # Subtracting the global max changes nothing after normalisation but avoids exp overflow.
    gmax = logits.max().detach().clone() if n_rows > 0 else logits.new_zeros(())
    if _distributed():
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - gmax) / temp).t()  # (K, M)
    if n_rows_total is None:
        total = float(n_rows * world_size())
    else:
        total = float(n_rows_total.item() if torch.is_tensor(n_rows_total) else n_rows_total)
    q /= all_reduce_sum(q.sum().reshape(1)).clamp_min(1e-30)
    for _ in range(n_iterations):
        # Each prototype (row of q) gets mass 1/K ...
        row_sum = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= row_sum.clamp_min(1e-30)
        q /= n_protos
        # ... and each sample (column) mass 1/M_total.
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= total
    q *= total  # columns now sum to 1
    return q.t()


class TeacherCentering(nn.Module):
    """Teacher-side target sharpening shared by the DINO and iBOT losses: an EMA centre of teacher logits.

    Centring (subtracting the running mean logit before a low-temperature softmax) keeps one prototype from
    winning every sample; the sharpening keeps the targets from going uniform.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher probabilities, same shape as ``teacher_logits`` (..., K).

        Call ``update_center(teacher_logits)`` afterwards (once per step) to move the centre.
        """
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the (global, all-rank) mean teacher logit over every sample or token given."""
        flat = teacher_logits.detach().float().reshape(-1, self.out_dim)
        stats = all_reduce_sum(torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])]))
        if stats[-1] <= 0:
            return
        batch_center = (stats[:-1] / stats[-1]).reshape(1, -1)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class DINOLoss(TeacherCentering):
    """Cross-entropy between student crops and teacher global crops (DINO multi-crop pairing)."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Balanced teacher targets for (M, K) logits (distributed-aware); rows sum to 1."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(
        self,
        student_logits_list: Sequence[torch.Tensor],
        teacher_probs_list: Sequence[torch.Tensor],
        local_weight: float = 1.0,
    ) -> torch.Tensor:
        """Mean cross-entropy over all (student crop, teacher global crop) pairs of different views.

        ``student_logits_list``: one (B, K) tensor per student crop; its first entries must be the
        global crops, in the same order as ``teacher_probs_list`` (one (B, K) tensor per teacher
        global crop). A student crop ``i`` is not paired with teacher crop ``i`` (same view).
        ``local_weight``: the pairs of local student crops count this much (DINOv3's
        ``local_loss_weight``, 0.5 in its Gram and high-resolution stages); the sum is still divided
        by the number of pairs, as DINOv3 scales its global and local terms.
        """
        total = student_logits_list[0].new_zeros((), dtype=torch.float32)
        n_pairs = 0
        for i, s in enumerate(student_logits_list):
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            weight = 1.0 if i < len(teacher_probs_list) else local_weight
            for j, t in enumerate(teacher_probs_list):
                if i == j:
                    continue
                total = total - weight * (t.float() * log_p).sum(dim=-1).mean()
                n_pairs += 1
        if n_pairs == 0:
            raise ValueError("DINOLoss needs at least one (student crop, other teacher view) pair")
        return total / n_pairs
