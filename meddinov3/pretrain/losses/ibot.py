"""iBOT masked-patch loss.

Some patches of the student's global crops are replaced by a mask token; the student must
predict, for each masked patch, the teacher's prototype distribution for the *unmasked*
patch at the same place. This is what teaches dense, per-patch features (the part that
matters for segmentation). Targets use the same centring / Sinkhorn options as DINO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dino import TeacherCentering, sinkhorn_knopp


class iBOTPatchLoss(TeacherCentering):  # noqa: N801  (the method's own spelling)
    """Cross-entropy on masked patch tokens, each image weighted equally."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(patch_out_dim, student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_patches: torch.Tensor | int | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Balanced targets for (M, K) masked-patch logits.

        ``n_masked_patches``: total masked patches over all ranks, when ranks hold different M.
        """
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations, n_rows_total=n_masked_patches)

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_patch_probs_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss on already-gathered masked tokens.

        ``student_patch_logits_masked`` and ``teacher_patch_probs_masked``: (M, K), the tokens
        at ``student_masks_flat`` (B, N) bool, in row-major order (``x[masks]``).
        Each masked token of image b is weighted 1 / (masked tokens in b), the sum is divided
        by B: every masked image counts equally however large its mask (images without a mask
        contribute 0, which keeps the per-image gradient scale independent of the batch mix).
        ``n_masked_patches``: use only the first rows (when the inputs are padded).
        ``masks_weight``: precomputed (M,) weights (e.g. from the collate step).
        """
        masks = student_masks_flat.bool()
        ce = (teacher_patch_probs_masked.float()
              * F.log_softmax(student_patch_logits_masked.float() / self.student_temp, dim=-1)).sum(dim=-1)
        if masks_weight is None:
            per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp_min(1).to(ce.dtype)
            masks_weight = per_image.expand_as(masks)[masks]
        if n_masked_patches is not None:
            ce = ce[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        return -(ce * masks_weight.to(ce.dtype)).sum() / masks.shape[0]

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        student_masks_flat: torch.Tensor,
    ) -> torch.Tensor:
        """Same loss from full (B, N, K) token grids; unmasked tokens are ignored."""
        masks = student_masks_flat.bool()
        return self.forward_masked(student_patch_logits[masks], teacher_patch_probs[masks], masks)
