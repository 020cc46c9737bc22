"""`curves.png`: training loss, learning rate and validation Dice per class, from `metrics.jsonl`."""

from __future__ import annotations

import os
from pathlib import Path

from ..runs.metrics import pyplot, read_metrics


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Draw `out_path` (PNG) from the fine-tuning records of `metrics_path`; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    from ..files import atomic_path

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("kind") == "step"]
    vals = [r for r in records if r.get("kind") == "validation"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    ax.set_xlabel("step"), ax.set_title("loss (Dice + CE)"), ax.grid(alpha=0.3)
    ax = axes[1]
    if steps:
        ax.plot([r["step"] for r in steps], [r["lr_decoder"] for r in steps], label="decoder")
        ax.plot([r["step"] for r in steps], [r["lr_backbone"] for r in steps], label="backbone")
        ax.legend()
    ax.set_xlabel("step"), ax.set_title("learning rate"), ax.grid(alpha=0.3)
    ax = axes[2]
    names = []
    for r in vals:
        for n in r.get("dice", {}):
            if n not in names:
                names.append(n)
    for n in names:
        pts = [(r["step"], r["dice"][n]) for r in vals if r.get("dice", {}).get(n) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=n)
    if names:
        ax.legend()
    ax.set_ylim(0, 1), ax.set_xlabel("step"), ax.set_title("validation Dice"), ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(out_path)
