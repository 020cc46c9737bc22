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
    """nnU-Net v2's 2D defaults (`nnUNetTrainer.get_training_transforms`); probabilities are per sample, already
    multiplied by nnU-Net's per-channel probability (blur 0.2 x 0.5, low resolution 0.25 x 0.5: one channel)."""

    enabled: bool = True
    p_rotation: float = 0.2
    rotation_deg: float | None = None  # None: nnU-Net's rule, 180 unless the patch's aspect ratio is above 1.5 (15)
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)  # factor on the sampled region: > 1 shrinks the content (nnU-Net's sense)
    enlarged_patch: bool = True  # rotate/scale a larger patch, then crop the centre (no padded corners)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)  # nnU-Net's name; the value drawn is the noise's std
    p_blur: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # drawn per axis
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.125
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

    def rotation_for(self, patch: tuple[int, int]) -> float:
        """Largest rotation angle (degrees) for `patch`: the configured one, or nnU-Net's rule."""
        if self.rotation_deg is not None:
            return float(self.rotation_deg)
        return 15.0 if max(patch) / min(patch) > 1.5 else 180.0

    def sampled_patch(self, patch: tuple[int, int]) -> tuple[int, int]:
        """Patch the sampler draws for a final `patch`: nnU-Net's `get_patch_size` (room for rotation up to 90
        degrees and zooming out to 0.85; nnU-Net keeps that old range here), plus one pixel where needed so the
        border to crop is even; `patch` itself when the spatial transforms act on the final patch."""
        if not (self.enabled and self.enlarged_patch):
            return tuple(patch)
        angle = math.radians(min(90.0, self.rotation_for(patch)))
        h, w = patch
        rotated = (abs(h * math.cos(angle) + w * math.sin(angle)), abs(-h * math.sin(angle) + w * math.cos(angle)))
        size = [int(max(r, p) / 0.85) for r, p in zip(rotated, patch)]
        return tuple(s + (s - p) % 2 for s, p in zip(size, patch))


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    H, W = x.shape[-2:]
    y0, x0 = (H - size[0]) // 2, (W - size[1]) // 2
    return x[..., y0:y0 + size[0], x0:x0 + size[1]]


def affine_warp(img: torch.Tensor, lab: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, pad_value: float,
                out_size: tuple[int, int], num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by `angle` (B,) radians and scale the sampled region by `zoom` (B,) about the centre of (B, 1, H, W)
    `img` / (B, H, W) `lab`, sampling an `out_size` patch: output pixel offset p (x, y) from its centre reads the
    input at zoom * R(angle) p (pixel units, so a true rotation on non-square patches). Bilinear image (outside the
    input: `pad_value`); labels as nnU-Net (`bg_style_seg_sampling=False`): each label's one-hot map interpolated
    bilinearly, then the argmax (outside: background)."""
    B, _, H, W = img.shape
    oh, ow = out_size
    c, s = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    # affine_grid works in [-1, 1] units of each image: scale by the output and input half sizes
    row0 = torch.stack([c * ow / W, -s * oh / W, torch.zeros(B)], 1)
    row1 = torch.stack([s * ow / H, c * oh / H, torch.zeros(B)], 1)
    theta = torch.stack([row0, row1], 1).to(img.device, img.dtype)
    grid = F.affine_grid(theta, [B, 1, oh, ow], align_corners=False)
    warped = F.grid_sample(img - pad_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    onehot = F.one_hot(lab.long(), int(num_classes or int(lab.max()) + 1)).permute(0, 3, 1, 2).to(img.dtype)
    warped_lab = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=False).argmax(1)
    return warped + pad_value, warped_lab.to(lab.dtype)


def spatial(img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, pad_value: float,
            out_size: tuple[int, int] | None = None, num_classes: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation + scaling (`affine_warp`) to `out_size` (default: the input size), then mirroring; samples left
    unmoved are cropped from the centre, not resampled."""
    B, _, H, W = img.shape
    out_size = tuple(out_size or (H, W))
    rot, scl = _chance(gen, B, cfg.p_rotation), _chance(gen, B, cfg.p_scale)
    limit = cfg.rotation_for(out_size)
    angle = torch.where(rot, _uniform(gen, B, -limit, limit), torch.zeros(B)) * math.pi / 180
    zoom = torch.where(scl, _uniform(gen, B, *cfg.scale), torch.ones(B))
    flip_y, flip_x = _chance(gen, B, cfg.p_mirror), _chance(gen, B, cfg.p_mirror)
    out_img, out_lab = _centre_crop(img, out_size), _centre_crop(lab, out_size)
    if rot.any() or scl.any():
        moved = (rot | scl).to(img.device)
        warped, warped_lab = affine_warp(img, lab, angle, zoom, pad_value, out_size, num_classes)
        out_img = torch.where(moved.view(B, 1, 1, 1), warped, out_img)
        out_lab = torch.where(moved.view(B, 1, 1), warped_lab, out_lab)
    img, lab = out_img.contiguous(), out_lab.contiguous()
    fy, fx = flip_y.to(img.device), flip_x.to(img.device)
    img = torch.where(fy.view(B, 1, 1, 1), img.flip(-2), img)
    lab = torch.where(fy.view(B, 1, 1), lab.flip(-2), lab)
    img = torch.where(fx.view(B, 1, 1, 1), img.flip(-1), img)
    lab = torch.where(fx.view(B, 1, 1), lab.flip(-1), lab)
    return img, lab


def _kernels(sigma: torch.Tensor, radius: int, dtype, device) -> torch.Tensor:
    """(B, 2 * radius + 1) normalised Gaussian kernels for `sigma` (B,) in pixels; sigma 0 gives the identity."""
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    s = sigma.to(device, dtype).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    return torch.where((sigma.to(device) > 0).view(-1, 1), k, (t == 0).to(dtype).view(1, -1))


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, 1, H, W); `sigma` in pixels, (B,) for both axes or (B, 2) per
    axis (rows, columns); 0 = unchanged."""
    B = img.shape[0]
    sigma = sigma.view(B, -1).expand(B, 2)
    radius = int(math.ceil(3 * float(sigma.max()))) if B else 0
    if radius == 0:
        return img
    x = img.transpose(0, 1)  # (1, B, H, W): one group per sample
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect" if min(img.shape[-2:]) > radius else "replicate")
    x = F.conv2d(x, _kernels(sigma[:, 1], radius, img.dtype, img.device).view(B, 1, 1, -1), groups=B)
    x = F.conv2d(x, _kernels(sigma[:, 0], radius, img.dtype, img.device).view(B, 1, -1, 1), groups=B)
    return x.view(img.shape)  # (1, B, H, W) -> (B, 1, H, W) with the usual strides (a compiled step guards on them)


def intensity(img: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    B, _, H, W = img.shape
    dev, dt = img.device, img.dtype
    view = lambda t: t.to(dev, dt).view(B, 1, 1, 1)  # noqa: E731

    # Gaussian noise
    on = _chance(gen, B, cfg.p_noise)
    if on.any():
        std = _uniform(gen, B, *cfg.noise_variance) * on  # nnU-Net uses the drawn value as the std
        dgen = torch.Generator(device=dev).manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
        img = img + torch.randn(img.shape, generator=dgen, device=dev, dtype=dt) * view(std)
    # Gaussian blur
    on = _chance(gen, B, cfg.p_blur)
    if on.any():
        sigma = torch.stack([_uniform(gen, B, *cfg.blur_sigma), _uniform(gen, B, *cfg.blur_sigma)], 1)
        img = gaussian_blur(img, sigma * on.view(B, 1))  # nnU-Net draws sigma per axis
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
    # low-resolution simulation: nearest down, bilinear up (nnU-Net v2 / batchgeneratorsv2)
    on = _chance(gen, B, cfg.p_lowres)
    if on.any():
        zoom = _uniform(gen, B, *cfg.lowres_zoom)
        out = img.clone()
        for i in torch.nonzero(on).flatten().tolist():
            size = (max(1, round(H * float(zoom[i]))), max(1, round(W * float(zoom[i]))))
            small = F.interpolate(img[i:i + 1], size=size, mode="nearest-exact")
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
            pad_value: float = 0.0, out_size: tuple[int, int] | None = None, num_classes: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on its device: (B, 1, H, W) float image, (B, H, W) int labels -> the same at `out_size`
    (default (H, W); a smaller size is cropped from the centre: see `AugmentConfig.sampled_patch`)."""
    if not cfg.enabled:
        return (img, lab) if out_size is None else (_centre_crop(img, out_size), _centre_crop(lab, out_size))
    img, lab = spatial(img, lab, gen, cfg, pad_value, out_size, num_classes)
    return intensity(img, gen, cfg), lab
