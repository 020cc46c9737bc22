"""Block-wise patch masking for the iBOT loss (BEiT / iBOT scheme).

Masking contiguous rectangles rather than scattered patches makes the task harder than
interpolating from direct neighbours, so the student must use context.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class MaskingGenerator:
    """Random rectangles of patches on an (h, w) grid until a requested count is masked.

    Each rectangle covers between ``min_num_patches`` and ``max_num_patches`` patches with an
    aspect ratio log-uniform in [min_aspect, max_aspect] and never exceeds the requested
    count. When no further rectangle fits (10 tries), ``fill_remaining`` tops the mask up with
    single random patches so the masked count is exactly the one requested.
    """

    def __init__(
        self,
        input_size: tuple[int, int] | int,
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        fill_remaining: bool = True,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.max_num_patches = int(max_num_patches) if max_num_patches is not None else self.num_patches // 2
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.fill_remaining = fill_remaining

    def __repr__(self) -> str:
        return (f"MaskingGenerator(({self.height}, {self.width}), max_num_patches={self.max_num_patches}, "
                f"min_num_patches={self.min_num_patches}, log_aspect={self.log_aspect_ratio})")

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try to mask one rectangle adding 1..max_new new patches; return how many were added."""
        for _ in range(10):
            target_area = rng.uniform(min(self.min_num_patches, max_new), max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h <= self.height and 0 < w <= self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_new:
                    window[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Bool (h, w) mask with ``num_masking_patches`` True (exactly, if ``fill_remaining``)."""
        rng = rng if rng is not None else np.random.default_rng()
        num_masking_patches = int(min(max(num_masking_patches, 0), self.num_patches))
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if self.fill_remaining and count < num_masking_patches:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, size=num_masking_patches - count, replace=False)] = True
        return mask


def _numpy_rng(generator: torch.Generator | np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    return np.random.default_rng(generator)


def sample_masks(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | np.random.Generator | int | None = None,
    masking_generator: MaskingGenerator | None = None,
) -> torch.Tensor:
    """Bool (B, h*w) masks for one batch of global crops (iBOT's scheme).

    ``int(B * mask_probability)`` images are masked; their ratios are stratified over
    ``mask_ratio_min_max`` (image i draws uniformly from the i-th of equal sub-intervals), so
    every batch covers the whole range. The other images get no mask. Rows are shuffled.
    Deterministic for a given ``generator`` (torch/numpy generator or int seed).
    """
    rng = _numpy_rng(generator)
    h, w = grid_hw
    n_tokens = h * w
    lo, hi = mask_ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if masking_generator is None:
        masking_generator = MaskingGenerator((h, w), max_num_patches=max(1, int(hi * n_tokens)))
    n_masked = int(batch_size * mask_probability)
    edges = np.linspace(lo, hi, n_masked + 1)
    masks = np.zeros((batch_size, n_tokens), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[i] = masking_generator(int(n_tokens * ratio), rng).reshape(-1)
    masks = masks[rng.permutation(batch_size)]
    return torch.from_numpy(masks)
