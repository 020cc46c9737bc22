"""Self-supervised losses for pretraining, one per file: DINO, iBOT, KoLeo, Gram anchoring."""

from .dino import DINOLoss, sinkhorn_knopp
from .gram import GramLoss
from .ibot import iBOTPatchLoss
from .koleo import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "GramLoss", "sinkhorn_knopp"]
