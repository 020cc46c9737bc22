"""Helpers of the MedDINOv3 Train module (one concern per file).

- `export`: (volume, segmentation) node pairs -> nnU-Net dataset folder; class matching and preview.
- `jobs`: detached `meddinov3 train|pretrain` processes and their run folders (no Slicer, no Qt).
- `logic`: MedDINOv3TrainLogic (export, start/stop/resume/list jobs, model registration, chart nodes).
"""

from .jobs import TrainJob, TrainJobError

__all__ = ["MedDINOv3TrainLogic", "TrainJob", "TrainJobError"]


def __getattr__(name):
    if name == "MedDINOv3TrainLogic":
        from .logic import MedDINOv3TrainLogic

        return MedDINOv3TrainLogic
    raise AttributeError(name)
