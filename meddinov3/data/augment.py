"""nnU-Net's default 2D augmentations, batched on the training device (small torch code, no extra package).

Order and probabilities follow nnU-Net v2's default training transforms: spatial (rotation, scaling 0.7-1.4),
Gaussian noise, Gaussian blur, brightness (multiplicative), contrast, low-resolution simulation, inverted and
normal gamma, mirroring. Random parameters come from a CPU `torch.Generator` seeded per step (reproducible and
resumable); per-pixel noise from a device generator seeded from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    enabled: bool = True
    p_rotation: float = 0.2
    rotation_deg: float = 180.0  # nnU-Net 2D: any in-plane angle
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5  # per in-plane axis

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def spatial(img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, pad_value: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation + scaling (one affine resampling: bilinear image, nearest labels) and mirroring."""
    B = img.shape[0]
    rot, scl = _chance(gen, B, cfg.p_rotation), _chance(gen, B, cfg.p_scale)
    angle = torch.where(rot, _uniform(gen, B, -cfg.rotation_deg, cfg.rotation_deg), torch.zeros(B)) * math.pi / 180
    zoom = torch.where(scl, _uniform(gen, B, *cfg.scale), torch.ones(B))
    flip_y, flip_x = _chance(gen, B, cfg.p_mirror), _chance(gen, B, cfg.p_mirror)
    if rot.any() or scl.any():
        # zoom > 1 magnifies the content: sample a smaller region of the input
        c, s = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([c, -s, torch.zeros(B)], 1), torch.stack([s, c, torch.zeros(B)], 1)], 1)
        grid = F.affine_grid(theta.to(img.device, img.dtype), list(img.shape), align_corners=False)
        moved = (rot | scl).to(img.device)
        out = F.grid_sample(img - pad_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + pad_value
        out_lab = F.grid_sample(lab[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[:, 0].long()
        img = torch.where(moved.view(B, 1, 1, 1), out, img)
        lab = torch.where(moved.view(B, 1, 1), out_lab, lab)
    fy, fx = flip_y.to(img.device), flip_x.to(img.device)
    img = torch.where(fy.view(B, 1, 1, 1), img.flip(-2), img)
    lab = torch.where(fy.view(B, 1, 1), lab.flip(-2), lab)
    img = torch.where(fx.view(B, 1, 1, 1), img.flip(-1), img)
    lab = torch.where(fx.view(B, 1, 1), lab.flip(-1), lab)
    return img, lab


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, 1, H, W); `sigma` (B,) in pixels (0 = unchanged)."""
    B = img.shape[0]
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return img
    t = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    s = sigma.to(img.device, img.dtype).clamp_min(1e-3).view(B, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = torch.where((sigma.to(img.device) > 0).view(B, 1), k, (t == 0).to(img.dtype).view(1, -1))
    x = img.transpose(0, 1)  # (1, B, H, W): one group per sample
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect" if min(img.shape[-2:]) > radius else "replicate")
    x = F.conv2d(x, k.view(B, 1, 1, -1), groups=B)
    x = F.conv2d(x, k.view(B, 1, -1, 1), groups=B)
    return x.view(img.shape)  # (1, B, H, W) -> (B, 1, H, W) with the usual strides (a compiled step guards on them)


def intensity(img: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    B, _, H, W = img.shape
    dev, dt = img.device, img.dtype
    view = lambda t: t.to(dev, dt).view(B, 1, 1, 1)  # noqa: E731

    # Gaussian noise
    on = _chance(gen, B, cfg.p_noise)
    if on.any():
        std = torch.sqrt(_uniform(gen, B, *cfg.noise_variance)) * on
        dgen = torch.Generator(device=dev).manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
        img = img + torch.randn(img.shape, generator=dgen, device=dev, dtype=dt) * view(std)
    # Gaussian blur
    on = _chance(gen, B, cfg.p_blur)
    if on.any():
        img = gaussian_blur(img, _uniform(gen, B, *cfg.blur_sigma) * on)
    # brightness (multiplicative)
    on = _chance(gen, B, cfg.p_brightness)
    img = img * view(torch.where(on, _uniform(gen, B, *cfg.brightness), torch.ones(B)))
    # contrast (about the mean, clipped to the previous range)
    on = _chance(gen, B, cfg.p_contrast)
    if on.any():
        f = view(torch.where(on, _uniform(gen, B, *cfg.contrast), torch.ones(B)))
        mean = img.mean((1, 2, 3), keepdim=True)
        lo, hi = img.amin((1, 2, 3), keepdim=True), img.amax((1, 2, 3), keepdim=True)
        img = torch.minimum(torch.maximum((img - mean) * f + mean, lo), hi)
    # low-resolution simulation: nearest down, bilinear up (nnU-Net: nearest down, cubic up)
    on = _chance(gen, B, cfg.p_lowres)
    if on.any():
        zoom = _uniform(gen, B, *cfg.lowres_zoom)
        out = img.clone()
        for i in torch.nonzero(on).flatten().tolist():
            size = (max(1, round(H * float(zoom[i]))), max(1, round(W * float(zoom[i]))))
            small = F.interpolate(img[i:i + 1], size=size, mode="nearest")
            out[i:i + 1] = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
        img = out
    # gamma: inverted (p 0.1) then normal (p 0.3), range rescaled and mean/std retained
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        on = _chance(gen, B, p)
        if not on.any():
            continue
        g = torch.where(_chance(gen, B, 0.5), _uniform(gen, B, cfg.gamma[0], 1.0),
                        _uniform(gen, B, 1.0, cfg.gamma[1]))
        x = -img if invert else img
        mean, std = x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True)
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        rng = (hi - lo).clamp_min(1e-7)
        y = ((x - lo) / rng).clamp_min(0).pow(view(g)) * rng + lo
        y = (y - y.mean((1, 2, 3), keepdim=True)) / y.std((1, 2, 3), keepdim=True).clamp_min(1e-7) * std + mean
        y = -y if invert else y
        img = torch.where(view(on.float()) > 0, y, img)
    return img


def augment(img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig,
            pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on its device: (B, 1, H, W) float image, (B, H, W) int labels."""
    if not cfg.enabled:
        return img, lab
    img, lab = spatial(img, lab, gen, cfg, pad_value)
    return intensity(img, gen, cfg), lab
