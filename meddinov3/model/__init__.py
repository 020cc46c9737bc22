"""The network: DINOv3 ViT backbone (timm) and the light patch decoder."""

from .backbone import DINOv3Backbone
from .decoder import PatchDecoder
from .network import MedDINOv3, build_model

__all__ = ["DINOv3Backbone", "PatchDecoder", "MedDINOv3", "build_model"]
