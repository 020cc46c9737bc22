"""Parameter node <-> GUI binding shared by the MedDINOv3 modules' Widgets (no Qt import: works on any widget)."""


def connectGui(parameterNode, ui) -> int:
    """`parameterNode.connectGui(ui)` that returns the tag `disconnectGui` needs on every Slicer version.

    Slicer 5.8's `connectGui` returns None (fixed in 5.10 by "BUG: Fix not returning GUI tag after connection"), so
    `disconnectGui(None)` did nothing and every enter() left one more set of connectors attached to the widgets (a
    stale Choice connector resets its combo box to the first item when the next wrapper refills it).
    `connectParametersToGui` returns the tag in all versions; the widgets are found as `connectGui` finds them.
    """
    widgets = {w.property("SlicerParameterName"): w for w in vars(ui).values() if w.property("SlicerParameterName")}
    return parameterNode.connectParametersToGui(widgets)
