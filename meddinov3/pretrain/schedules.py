"""Per-iteration schedules (lr, weight decay, teacher momentum, teacher temperature).

Precomputed arrays indexed by the global iteration make resuming exact: the loop only needs
the iteration number, not any scheduler state.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    warmup_shape: str = "linear",
) -> np.ndarray:
    """Warm-up ``start_warmup -> base`` over ``warmup_iters``, then cosine ``base -> final``.

    ``warmup_shape``: "linear", or "cosine" (a half cosine: DINOv3's high-resolution stage raises its lr this way,
    and its Gram stage lowers the local-crop weight from 1 to 0.5 this way; the ramp may go down).

    Returns ``total_iters`` float64 values: ``out[0] == start_warmup`` if there is a warm-up
    (else ``base``), ``out[warmup_iters] == base`` and ``out[-1] == final`` (given two or more
    post-warm-up iterations).
    A constant after a warm-up (teacher temperature 0.04 -> 0.07) is
    ``cosine_schedule(0.07, 0.07, total, warmup, start_warmup=0.04)``.
    """
    if total_iters < 0 or warmup_iters < 0:
        raise ValueError("total_iters and warmup_iters must be >= 0")
    if warmup_shape not in ("linear", "cosine"):
        raise ValueError(f"warmup_shape must be linear or cosine, got {warmup_shape!r}")
    ramp = np.arange(warmup_iters) / max(warmup_iters, 1)
    if warmup_shape == "cosine":
        ramp = 0.5 * (1.0 - np.cos(math.pi * ramp))
    warmup = start_warmup + (base - start_warmup) * ramp
    n = max(total_iters - warmup_iters, 0)
    t = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * t))
    # a run shorter than its warm-up stops in it
    return np.concatenate([warmup, cosine])[:total_iters].astype(np.float64)
