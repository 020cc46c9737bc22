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
) -> np.ndarray:
    """Linear warm-up ``start_warmup -> base`` over ``warmup_iters``, then cosine ``base -> final``.

    Returns ``total_iters`` float64 values: ``out[0] == start_warmup`` if there is a warm-up
    (else ``base``), ``out[warmup_iters] == base`` and ``out[-1] == final`` (given two or more
    post-warm-up iterations).
    A constant after a warm-up (teacher temperature 0.04 -> 0.07) is
    ``cosine_schedule(0.07, 0.07, total, warmup, start_warmup=0.04)``.
    """
    if total_iters < 0 or warmup_iters < 0:
        raise ValueError("total_iters and warmup_iters must be >= 0")
    warmup_iters = min(warmup_iters, total_iters)
    warmup = start_warmup + (base - start_warmup) * np.arange(warmup_iters) / max(warmup_iters, 1)
    n = total_iters - warmup_iters
    t = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)
