"""Multi-crop augmentation for single-channel CT slices (DINO-style, no colour operations).

Two large "global" crops (seen by teacher and student) and several small "local" crops
(student only): matching local to global views teaches local-to-global correspondence.
CT intensities carry meaning (HU), so the photometric jitter is small brightness/contrast
and blur only; colour jitter, grey-scale and solarisation from natural-image recipes are
left out. Every random draw comes from a caller-supplied ``torch.Generator`` so a worker
seeded from (epoch, index) reproduces its crops exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

HU_MIN, HU_MAX = -1000.0, 1000.0
HU_MEAN, HU_STD = 65.1084, 178.0166


def normalize_hu(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Pretraining normalisation: clamp HU to [-1000, 1000], subtract 65.1084, divide by 178.0166.

    The single place these constants live (the MedDINOv3 reference demo's values).
    Returns float32 of the input's kind (tensor or ndarray).
    """
    if isinstance(x, np.ndarray):
        return ((np.clip(x.astype(np.float32), HU_MIN, HU_MAX) - HU_MEAN) / HU_STD).astype(np.float32)
    return (x.float().clamp(HU_MIN, HU_MAX) - HU_MEAN) / HU_STD


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator | None, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def _randint(g: torch.Generator | None, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (), generator=g))


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``, resize to (size, size).

    (C, H, W) -> (C, size, size), bilinear with antialiasing. Falls back to the largest
    central crop within ``ratio`` after 10 failed draws (as torchvision does).
    """
    _, height, width = img.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = _randint(generator, height - h + 1), _randint(generator, width - w + 1)
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    crop = img[:, top:top + h, left:left + w]
    return F.interpolate(crop[None].float(), size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), bilinear with antialiasing; the tensor itself when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) tensor, reflect padding, kernel radius ceil(3 sigma)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    radius = min(radius, img.shape[-1] - 1, img.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


class MultiCropAugmentation:
    """(1, H, W) normalised slice -> 2 global + ``n_local`` local crops.

    Each crop: random resized crop, horizontal flip (p=0.5), then with probability
    ``jitter_p`` a contrast factor in [1-contrast, 1+contrast] about the crop mean and an
    additive shift in [-brightness, +brightness] (normalised units; 0.1 = 18 HU), then a
    Gaussian blur with the per-view probabilities ``blur_p`` = (global 0, global 1, local),
    following DINO's asymmetric choice (one global view mostly blurred, the other mostly sharp).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.1,
        contrast: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        patch_size: int = 16,
        gram_size: int | None = None,
    ) -> None:
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size <= 0 or size % patch_size:
                raise ValueError(f"{name}={size} must be a positive multiple of the patch size {patch_size}")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.ratio = global_scale, local_scale, ratio
        self.flip_p, self.jitter_p = flip_p, jitter_p
        self.brightness, self.contrast = brightness, contrast
        self.blur_p, self.blur_sigma = blur_p, blur_sigma
        self.gram_size = gram_size

    def _view(self, img: torch.Tensor, size: int, scale: tuple[float, float], blur_p: float,
              g: torch.Generator | None, clean: list | None = None) -> torch.Tensor:
        """One crop; with ``clean`` (a list) the same region and flip at ``gram_size`` without intensity jitter or
        blur is appended to it (DINOv3's Gram-teacher crop: cropped once at the larger size, resized to each)."""
        if clean is None:
            x = random_resized_crop(img, size, scale, self.ratio, g)
        else:
            big = random_resized_crop(img, max(size, self.gram_size), scale, self.ratio, g)
            x = _resize(big, size)
        flip = _coin(g, self.flip_p)
        if flip:
            x = x.flip(-1)
        if clean is not None:
            gram = _resize(big, self.gram_size)
            clean.append((gram.flip(-1) if flip else gram).contiguous())
        if _coin(g, self.jitter_p):
            c = _uniform(g, 1.0 - self.contrast, 1.0 + self.contrast)
            b = _uniform(g, -self.brightness, self.brightness)
            mean = x.mean()
            x = (x - mean) * c + mean + b
        if _coin(g, blur_p):
            x = gaussian_blur(x, _uniform(g, *self.blur_sigma))
        return x.contiguous()

    def __call__(self, slice_tensor: torch.Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, list[torch.Tensor]]:
        if slice_tensor.dim() == 2:
            slice_tensor = slice_tensor[None]
        if slice_tensor.dim() != 3:
            raise ValueError(f"expected a (1, H, W) slice, got {tuple(slice_tensor.shape)}")
        img = slice_tensor.float()
        g = generator
        clean = [] if self.gram_size else None
        global_crops = [self._view(img, self.global_size, self.global_scale, self.blur_p[i], g, clean)
                        for i in range(2)]
        local_crops = [self._view(img, self.local_size, self.local_scale, self.blur_p[2], g)
                       for _ in range(self.n_local)]
        out = {"global_crops": global_crops, "local_crops": local_crops}
        if clean is not None:
            out["gram_crops"] = clean
        return out


def collate_crops(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack per-image crops view-major: ``global`` (2B, C, G, G) = [view 0 of every image,
    then view 1], ``local`` (nB, C, L, L) likewise (so chunk(2) / chunk(n) gives one view), and ``gram``
    (2B, C, S, S) like ``global`` when the samples carry Gram-teacher crops.
    With no local crops, ``local`` is an empty (0, C, 0, 0) tensor."""
    if not samples:
        raise ValueError("collate_crops needs at least one sample")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    glob = torch.stack([s["global_crops"][v] for v in range(n_global) for s in samples])
    if n_local:
        loc = torch.stack([s["local_crops"][v] for v in range(n_local) for s in samples])
    else:
        loc = glob.new_empty((0, glob.shape[1], 0, 0))
    out = {"global": glob, "local": loc}
    if "gram_crops" in samples[0]:
        out["gram"] = torch.stack([s["gram_crops"][v] for v in range(n_global) for s in samples])
    return out
