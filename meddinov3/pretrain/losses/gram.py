"""Gram anchoring (DINOv3).

Long self-distillation makes dense features drift and become noisy even while the global
(CLS) quality keeps improving. Gram anchoring holds the *pairwise similarity structure* of the
student's patch features close to that of an earlier "Gram teacher", without constraining the
features themselves: MSE between patch-feature Gram matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GramLoss(nn.Module):
    """MSE between student and (frozen) Gram-teacher patch-similarity matrices.

    ``apply_norm``: L2-normalise tokens first (cosine similarities; invariant to token scale).
    ``img_level``: one N x N Gram per image (inputs (B, N, D)); otherwise a single
    (B*N) x (B*N) Gram over every token of the batch.
    ``remove_neg``: clamp negative similarities to 0 in both matrices.
    ``remove_only_teacher_neg``: where the teacher similarity is negative, set the teacher to 0
    and the student to 0 too if it is also negative (only positive structure is anchored).
    """

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("choose at most one of remove_neg / remove_only_teacher_neg")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.eps = eps

    def _prep(self, feats: torch.Tensor, img_level: bool) -> torch.Tensor:
        feats = feats.float()
        if img_level:
            if feats.dim() != 3:
                raise ValueError(f"img_level Gram needs (B, N, D) features, got {tuple(feats.shape)}")
        else:
            feats = feats.reshape(1, -1, feats.shape[-1])
        if self.apply_norm:
            feats = F.normalize(feats, dim=-1, eps=self.eps)
        return feats

    def forward(
        self,
        student_feats: torch.Tensor,
        teacher_feats: torch.Tensor,
        img_level: bool | None = None,
    ) -> torch.Tensor:
        """Student / teacher patch features (B, N, D) -> scalar MSE; the teacher is detached.

        The Gram products run in fp32 even under autocast (as DINOv3's, outside its bf16 policy): similarities
        of nearby patches differ in the third decimal, below bf16's resolution near 1.
        """
        img_level = self.img_level if img_level is None else img_level
        with torch.autocast(student_feats.device.type, enabled=False):
            s = self._prep(student_feats, img_level)
            with torch.no_grad():
                t = self._prep(teacher_feats.detach(), img_level)
                gram_t = t @ t.transpose(-1, -2)
            gram_s = s @ s.transpose(-1, -2)
        if self.remove_neg:
            gram_s = gram_s.clamp_min(0.0)
            gram_t = gram_t.clamp_min(0.0)
        elif self.remove_only_teacher_neg:
            teacher_neg = gram_t < 0
            gram_t = gram_t.masked_fill(teacher_neg, 0.0)
            gram_s = gram_s.masked_fill(teacher_neg & (gram_s < 0), 0.0)
        return F.mse_loss(gram_s, gram_t)
