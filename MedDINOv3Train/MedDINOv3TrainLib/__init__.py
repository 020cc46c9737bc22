"""Helpers of the MedDINOv3 Train module (one concern per file).

- `export`: (volume, segmentation) node pairs -> nnU-Net dataset folder; class matching and preview.
- `jobs`: detached `meddinov3 train|pretrain` processes and their run folders (no Slicer, no Qt).
- `parameters`: the panel's parameter node (its defaults are the module's only training defaults).
- `logic`: MedDINOv3TrainLogic (export, start/stop/resume/list jobs, model registration, chart nodes).
"""

import os
import sys

# Run from a checkout, the core package `meddinov3` is in the repository root, two folders up (as in
# MedDINOv3SegmentLib, which this module must not need); an installed extension has it beside the modules.
_checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.isfile(os.path.join(_checkout, "meddinov3", "__init__.py")) and _checkout not in sys.path:
    sys.path.insert(0, _checkout)

from .jobs import TrainJob, TrainJobError  # noqa: E402

__all__ = ["MedDINOv3TrainLogic", "TrainJob", "TrainJobError"]


def __getattr__(name):
    if name == "MedDINOv3TrainLogic":
        from .logic import MedDINOv3TrainLogic

        return MedDINOv3TrainLogic
    raise AttributeError(name)
