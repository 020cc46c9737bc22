"""Test suite package.

`Testing` is a package so that pytest puts the repository root (not `Testing/`) on `sys.path`:
otherwise the folder `Testing/slicer/` would shadow, or be merged into, the real `slicer` package
of slicer-core (which extends its `__path__` with every `slicer/` folder on `sys.path`).
"""
