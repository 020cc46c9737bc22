"""Helpers of the MedDINOv3 Segment module (SlicerNNUNet-style `Lib/` split).

- `errors`: MedDINOv3SegmentError (one-line user messages), MedDINOv3SegmentCancelled.
- `worker`: the `meddinov3 segment` child process, read without blocking; process-tree kill.
- `nodes`: volume node -> .nrrd, ROI node -> voxel box, .seg.nrrd -> segmentation node (exact voxel grid).
- `models`: the models offered (manifest, imported, trained, nnU-Net folders), import and register.
- `logic`: MedDINOv3SegmentLogic and SegmentTask (needs `slicer`; imported lazily here).
- `dependencies`: Python packages the module needs in Slicer's Python, and installing them (Widget only).
"""

from .errors import MedDINOv3SegmentCancelled, MedDINOv3SegmentError

__all__ = ["MedDINOv3SegmentCancelled", "MedDINOv3SegmentError", "MedDINOv3SegmentLogic", "SegmentTask"]


def __getattr__(name):
    if name in ("MedDINOv3SegmentLogic", "SegmentTask"):
        from . import logic

        return getattr(logic, name)
    raise AttributeError(name)
