"""Shared pytest configuration.

- Puts the repository root and the Slicer module folders (`MedDINOv3Segment/`, `MedDINOv3Train/`)
  on `sys.path`, so tests can `import meddinov3`, `import MedDINOv3Segment`, `import MedDINOv3TrainLib`.
- Fixtures for a headless Slicer (PyPI slicer-core, see `Testing/slicer_headless.py`), set up lazily:
  tests that do not ask for them never import slicer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIRS = [REPO_ROOT / "MedDINOv3Segment", REPO_ROOT / "MedDINOv3Train"]

for _path in [REPO_ROOT, *MODULE_DIRS]:
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="session")
def headless_slicer():
    """The `slicer` module with `mrmlScene`, `app`, `modules` and the stand-ins set up (once per session)."""
    from Testing.slicer_headless import setup_headless_slicer

    return setup_headless_slicer()


@pytest.fixture
def slicer_scene(headless_slicer):
    """`slicer.mrmlScene`, cleared before and after the test (colour tables and other singletons stay)."""
    scene = headless_slicer.mrmlScene
    scene.Clear(0)
    yield scene
    scene.Clear(0)
