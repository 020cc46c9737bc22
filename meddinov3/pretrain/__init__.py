"""DINOv3-style pretraining of the MedDINOv3 backbone on CT slices.

Building blocks, each testable alone: projection head (``heads``), losses (``losses``),
multi-crop augmentation (``crops``), block masking (``masking``) and per-iteration
schedules (``schedules``). The meta-architecture (student, EMA teacher) and the loop
build on these.
"""

from .crops import MultiCropAugmentation, collate_crops, normalize_hu
from .heads import DINOHead
from .losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
from .masking import MaskingGenerator, sample_masks
from .schedules import cosine_schedule

__all__ = [
    "DINOHead", "DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "GramLoss",
    "MultiCropAugmentation", "collate_crops", "normalize_hu",
    "MaskingGenerator", "sample_masks", "cosine_schedule",
]
