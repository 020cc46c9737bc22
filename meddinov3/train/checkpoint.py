"""Full training state, written atomically: model, optimiser, scheduler, scaler, RNG states, sampler position.

Plain data only (tensors, containers, numbers, strings), read back with restricted unpickling: a run folder
given to --resume or `pretrain --base` may come from anyone, and a crafted checkpoint must not run code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.safe_load import CheckpointError, safe_torch_load
from ..files import atomic_path
from .config import TrainError

FORMAT = "meddinov3-train-state"


def rng_states() -> dict:
    """numpy's state as a list (its key an array would need numpy's reconstructor allowed when loading)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Also from checkpoints written before `rng_states` saved numpy's state as a list (a tuple with an array)."""
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | os.PathLike, *, model, optimizer, scheduler, scaler, step: int, epoch: int,
               sampler: dict, best: dict, config: dict, extra: dict | None = None) -> Path:
    state = {
        "format": FORMAT, "step": int(step), "epoch": int(epoch),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states(), "sampler": {**sampler, "position": int(step)}, "best": best, "config": config,
        **(extra or {}),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_state(path: str | os.PathLike) -> dict:
    """A training checkpoint, on the CPU; TrainError (one line naming the file) for a refused or foreign file."""
    try:
        state = safe_torch_load(path, numpy_arrays=True)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path}: not a MedDINOv3 training checkpoint")
    return state
