"""Resumable, shardable patch sampling with nnU-Net-style foreground oversampling.

Every batch is a pure function of (seed, step, rank): resuming at step N gives exactly the batches an
uninterrupted run would have drawn (the sampler's position is the step), and each rank of a distributed job
draws a different shard of samples without any communication.
"""

from __future__ import annotations

import numpy as np

from .cache import CachedCase


class PatchSampler:
    """Draws (image, label) patches of `patch_size` from a slice cache's cases.

    Cases are chosen uniformly (`case_sampling="uniform"`, nnU-Net's rule) or in proportion to their slice count
    (`"slices"`: every slice equally likely); in each batch the samples from index `round(B * (1 - fg_fraction))`
    on are centred on a random voxel of a random foreground class present in the case (nnU-Net's rule), the
    others on a random position of a random slice.
    """

    def __init__(self, cases: list[CachedCase], patch_size: tuple[int, int], batch_size: int,
                 fg_fraction: float = 0.33, seed: int = 0, rank: int = 0, world_size: int = 1,
                 case_sampling: str = "uniform"):
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.fg_fraction = float(fg_fraction)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if case_sampling not in ("uniform", "slices"):
            raise ValueError(f"case_sampling must be 'uniform' or 'slices', got {case_sampling!r}")
        counts = np.array([c.image.shape[0] if case_sampling == "slices" else 1 for c in cases], float)
        self.case_p = counts / counts.sum()

    def state_dict(self) -> dict:
        return {"kind": "stateless", "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), self.rank, 7919])

    def _crop(self, case: CachedCase, z: int, cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
        ph, pw = self.patch
        H, W = case.image.shape[1:]
        y0, x0 = cy - ph // 2, cx - pw // 2
        img = np.full((ph, pw), case.pad_value, np.float32)
        lab = np.zeros((ph, pw), np.int64)
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + ph, H), min(x0 + pw, W)
        if sy1 > sy0 and sx1 > sx0:
            img[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = case.image[z, sy0:sy1, sx0:sx1]
            lab[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = case.label[z, sy0:sy1, sx0:sx1]
        return img, lab

    def _centre(self, rng, size: int, patch: int) -> int:
        """Random patch centre along one axis: patch inside the slice when it fits, else the slice centred-ish."""
        if size >= patch:
            return int(rng.integers(patch // 2, size - patch + patch // 2 + 1))
        return int(rng.integers(size - patch + patch // 2, patch // 2 + 1)) if patch - size > 1 else size // 2

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, 1, ph, pw) float32, labels (B, ph, pw) int64) of this rank at `step`."""
        rng = self.rng(step)
        B = self.batch_size
        n_fg = B - int(round(B * (1 - self.fg_fraction)))  # nnU-Net's _oversample_last_XX_percent
        imgs = np.empty((B, 1, *self.patch), np.float32)
        labs = np.empty((B, *self.patch), np.int64)
        for i in range(B):
            case = self.cases[int(rng.choice(len(self.cases), p=self.case_p))]
            S, H, W = case.image.shape
            present = [c for c, locs in case.locations.items() if len(locs)]
            if i >= B - n_fg and present:
                locs = case.locations[present[int(rng.integers(len(present)))]]
                z, cy, cx = (int(v) for v in locs[int(rng.integers(len(locs)))])
            else:
                z = int(rng.integers(S))
                cy, cx = self._centre(rng, H, self.patch[0]), self._centre(rng, W, self.patch[1])
            imgs[i, 0], labs[i] = self._crop(case, z, cy, cx)
        return imgs, labs
