"""Few-shot completion (`meddinov3 complete`): a structure painted on a few slices -> the whole structure.

Slicer-free; the CLI and the MedDINOv3Segment module call it.
"""

from .pipeline import CompletionResult, complete_image
from .sparse import read_sparse

__all__ = ["CompletionResult", "complete_image", "read_sparse"]
