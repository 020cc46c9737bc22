"""Inference engine: volumes in, label maps (and probabilities) out. Slicer-free; the CLI and Slicer call it."""

from .inference import SlicePredictor, gaussian_weights, tile_starts
from .outputs import write_labels, write_probabilities
from .pipeline import Cancelled, SegmentationResult, SegmentOptions, resolve_device, segment_file, segment_image

__all__ = ["Cancelled", "SegmentOptions", "SegmentationResult", "SlicePredictor", "gaussian_weights",
           "resolve_device", "segment_file", "segment_image", "tile_starts", "write_labels", "write_probabilities"]
