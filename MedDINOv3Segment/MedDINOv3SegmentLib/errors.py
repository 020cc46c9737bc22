"""The one exception type the Segment module's Logic raises: its message is one line meant for the user."""


class MedDINOv3SegmentError(RuntimeError):
    """A segmentation problem with a clear one-line message (shown as is by the Widget)."""


class MedDINOv3SegmentCancelled(MedDINOv3SegmentError):
    """The user cancelled the segmentation; nothing in the scene changed."""
