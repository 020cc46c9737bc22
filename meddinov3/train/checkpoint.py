"""Full training state, written atomically: model, optimiser, scheduler, scaler, RNG states, sampler position."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path

FORMAT = "meddinov3-train-state"


def rng_states() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def load_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Our own checkpoint (trusted, written by this code): full unpickling for optimiser / RNG states."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a MedDINOv3 training checkpoint")
    return state
