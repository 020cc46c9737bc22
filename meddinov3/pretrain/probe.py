"""Cheap dense-feature probe: closed-form ridge regression of frozen patch features onto foreground.

Default labelled set: the LiTS liver CT (``meddinov3.phantom.load_liver_ct``). Only axial slices where the liver
covers at least a tenth of the slice take part (elsewhere hardly a patch is mostly liver, and a probe fitted on
background alone reports Dice 0 whatever the features): fit on the upper part of that range, score on the lower
part, with a gap between them so neighbouring slices do not leak. Foreground = liver + tumour, judged per patch
(a patch is foreground when at least half its pixels are). Reports patch accuracy and foreground Dice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .crops import normalize_hu


class DenseProbe:
    def __init__(self, images: np.ndarray, labels: np.ndarray, fit_idx, eval_idx, size: int = 64,
                 ridge: float = 1e-4) -> None:
        """images (N, H, W) HU, labels (N, H, W) int (>0 = foreground)."""
        x = torch.from_numpy(normalize_hu(images.astype(np.float32)))[:, None]
        self.x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        fg = torch.from_numpy((labels > 0).astype(np.float32))[:, None]
        self.fg = F.interpolate(fg, size=(size, size), mode="area")
        self.fit_idx, self.eval_idx, self.size, self.ridge = list(fit_idx), list(eval_idx), size, ridge

    @classmethod
    def liver(cls, size: int = 128, n_fit: int = 8, n_eval: int = 8, min_fraction: float = 0.1,
              gap: int = 4) -> "DenseProbe":
        import SimpleITK as sitk

        from ..phantom import load_liver_ct

        image, labels = load_liver_ct()
        img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
        z = np.flatnonzero((lab > 0).reshape(lab.shape[0], -1).mean(axis=1) >= min_fraction)
        cut = len(z) // 2
        fit_z, eval_z = z[:max(cut - gap // 2, 1)], z[cut + gap - gap // 2:]
        fit = np.unique(fit_z[np.linspace(0, len(fit_z) - 1, n_fit).astype(int)])
        ev = np.unique(eval_z[np.linspace(0, len(eval_z) - 1, n_eval).astype(int)])
        keep = np.concatenate([fit, ev])
        return cls(img[keep], lab[keep], range(len(fit)), range(len(fit), len(keep)), size)

    @torch.no_grad()
    def features(self, backbone, device) -> tuple[torch.Tensor, torch.Tensor]:
        was = backbone.training
        backbone.eval()
        try:
            out = backbone.forward_features(self.x.to(device).expand(-1, 3, -1, -1))["patch"].float().cpu()
        finally:
            backbone.train(was)
        p = backbone.config.patch_size
        target = F.avg_pool2d(self.fg, p).flatten(1)  # (N, h*w) foreground fraction per patch
        return out, target

    def __call__(self, backbone, device="cpu") -> dict:
        feats, target = self.features(backbone, device)
        feats = F.normalize(feats, dim=-1)
        fit_x = feats[self.fit_idx].reshape(-1, feats.shape[-1]).double()
        fit_y = (target[self.fit_idx].reshape(-1) >= 0.5).double()
        xb = torch.cat([fit_x, torch.ones(len(fit_x), 1, dtype=fit_x.dtype)], dim=1)
        a = xb.T @ xb + self.ridge * len(xb) * torch.eye(xb.shape[1], dtype=xb.dtype)
        w = torch.linalg.solve(a, xb.T @ (2 * fit_y - 1))
        ev_x = feats[self.eval_idx].reshape(-1, feats.shape[-1]).double()
        ev_y = target[self.eval_idx].reshape(-1) >= 0.5
        pred = (torch.cat([ev_x, torch.ones(len(ev_x), 1, dtype=ev_x.dtype)], dim=1) @ w) > 0
        inter = float((pred & ev_y).sum())
        denom = float(pred.sum() + ev_y.sum())
        return {"probe_dice": 2 * inter / denom if denom else 1.0,
                "probe_accuracy": float((pred == ev_y).double().mean()),
                "probe_patches": int(len(ev_y))}
