"""Tests that run Slicer code headless, on PyPI slicer-core (see `Testing/slicer_headless.py`).

Importing this package sets up the headless Slicer (scene, module logics, stand-ins for `qt`,
`ctk`, `slicer.ScriptedLoadableModule`...), so test modules here may import the Slicer modules
(`import MedDINOv3Segment`) at the top of the file.
"""

from Testing.slicer_headless import setup_headless_slicer

setup_headless_slicer()
