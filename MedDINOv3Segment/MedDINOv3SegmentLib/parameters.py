"""The Segment panel's parameter node, and the parameter node <-> GUI binding shared by the MedDINOv3 modules'
Widgets (no Qt import: works on any widget).

The parameter-node class lives here, in the Lib, so that the Logic (`getParameterNode`) never imports the module
file: imports point one way, module file -> Lib -> core.
"""

from __future__ import annotations

from typing import Annotated, Optional

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class MedDINOv3SegmentParameterNode:
    """Settings of the Segment panel, saved with the scene.

    model: the model selector's text (see MedDINOv3SegmentWidget.modelReference); device: the device selector's text.
    batchSize: 0 = automatic. uncertainty: also make an uncertainty map (overlay, Next unsure slice).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: str = "Auto"
    fast: bool = False
    tta: bool = False
    roi: Optional[vtkMRMLMarkupsROINode] = None
    outputSegmentation: Optional[vtkMRMLSegmentationNode] = None
    modelPostprocessing: bool = True
    keepLargest: bool = False
    fillHoles: bool = False
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    uncertainty: bool = False


def connectGui(parameterNode, ui) -> int:
    """`parameterNode.connectGui(ui)` that returns the tag `disconnectGui` needs on every Slicer version.

    Slicer 5.8's `connectGui` returns None (fixed in 5.10 by "BUG: Fix not returning GUI tag after connection"), so
    `disconnectGui(None)` did nothing and every enter() left one more set of connectors attached to the widgets (a
    stale Choice connector resets its combo box to the first item when the next wrapper refills it).
    `connectParametersToGui` returns the tag in all versions; the widgets are found as `connectGui` finds them.
    """
    widgets = {w.property("SlicerParameterName"): w for w in vars(ui).values() if w.property("SlicerParameterName")}
    return parameterNode.connectParametersToGui(widgets)
