"""Export the EMA teacher backbone of a pretraining run as a model package (kind "backbone").

``RUN_DIR/backbone/`` is what ``meddinov3 train --base RUN_DIR`` (``checkpoints.load_backbone``) reads:
weights keyed ``backbone.*``, HU normalisation, the architecture, and provenance (stage, step).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoints.package import ModelSpec, provenance_now, write_package
from ..config import ModelConfig


def export_backbone(out_dir: str | os.PathLike, backbone_sd: dict[str, torch.Tensor], mcfg: ModelConfig, name: str,
                    **provenance) -> Path:
    """``backbone_sd``: the full (unsharded) state dict of the teacher's ``DINOv3Backbone``."""
    sd = {f"backbone.{k}": v.detach().float().cpu() for k, v in backbone_sd.items()}
    spec = ModelSpec(name=name, config=mcfg, classes=[], kind="backbone", normalization={"scheme": "ct_hu"},
                     description=f"Backbone pretrained with `meddinov3 pretrain` (stage {provenance.get('stage')})",
                     provenance=provenance_now(**provenance))
    return write_package(out_dir, spec, [sd], overwrite=True)
