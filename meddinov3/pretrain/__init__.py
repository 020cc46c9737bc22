"""DINOv3-style pretraining of the MedDINOv3 backbone on CT slices.

Building blocks, each testable alone: projection head (``heads``), losses (``losses``),
multi-crop augmentation (``crops``), block masking (``masking``) and per-iteration
schedules (``schedules``). The meta-architecture (student, EMA teacher; ``meta_arch``), the slice
index (``data``), the options (``config``), the loop (``loop.pretrain``), FSDP sharding and full state dicts
(``parallel``), the dense probe (``probe``) and the backbone export (``export``) build on these; ``meddinov3
pretrain`` is the command line.
"""

from .crops import MultiCropAugmentation, collate_crops, normalize_hu
from .heads import DINOHead
from .losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
from .masking import MaskingGenerator, sample_masks
from .schedules import cosine_schedule



def __getattr__(name: str):
    # The loop pulls in training/IO modules: imported on first use only.
    if name in ("PretrainConfig", "PretrainError"):
        from . import config
        return getattr(config, name)
    if name == "pretrain":
        from . import loop
        return loop.pretrain
    if name in ("SSLMetaArch", "HeadConfig"):
        from . import meta_arch
        return getattr(meta_arch, name)
    raise AttributeError(name)


__all__ = [
    "PretrainConfig", "pretrain", "PretrainError", "SSLMetaArch", "HeadConfig",
    "DINOHead", "DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "GramLoss",
    "MultiCropAugmentation", "collate_crops", "normalize_hu",
    "MaskingGenerator", "sample_masks", "cosine_schedule",
]
