"""Helpers of the MedDINOv3 Segment module (SlicerNNUNet-style `Lib/` split).

- `errors`: MedDINOv3SegmentError (one-line user messages), MedDINOv3SegmentCancelled.
- `worker`: the `meddinov3 segment` child process, read without blocking; process-tree kill.
- `nodes`: volume node -> .nrrd, ROI node -> voxel box, .seg.nrrd -> segmentation node (exact voxel grid).
- `models`: the models offered (manifest, imported, trained, nnU-Net folders; listed without torch), import and
  register.
- `logic`: MedDINOv3SegmentLogic and SegmentTask (needs `slicer`; imported lazily here).
- `complete`: *Complete from painted slices* (chosen segments -> `meddinov3 complete` child -> segments replaced in one
  undo step); `completeSection`: its panel section (Qt).
- `dependencies`: Python packages both modules need in Slicer's Python (Resources/slicer-requirements.txt), what is
  missing or too old, installing it, and the panel section with the Install button (no torch import).
"""

import os
import sys

# Run from a checkout (Slicer's "Additional module paths" name MedDINOv3Segment/ and MedDINOv3Train/), the core
# package `meddinov3` is in the repository root, two folders up; an installed extension has it beside the modules.
_checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.isfile(os.path.join(_checkout, "meddinov3", "__init__.py")) and _checkout not in sys.path:
    sys.path.insert(0, _checkout)

from .errors import MedDINOv3SegmentCancelled, MedDINOv3SegmentError  # noqa: E402

__all__ = ["MedDINOv3SegmentCancelled", "MedDINOv3SegmentError", "MedDINOv3SegmentLogic", "SegmentTask"]


def __getattr__(name):
    if name in ("MedDINOv3SegmentLogic", "SegmentTask"):
        from . import logic

        return getattr(logic, name)
    raise AttributeError(name)
