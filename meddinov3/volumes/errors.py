"""The error every image check raises, and keeping ITK's own messages to one line of ours."""

from __future__ import annotations

import contextlib
import os

import SimpleITK as sitk


class InputError(Exception):
    """A problem with one input image: `str()` is '<path>: <problem>'."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@contextlib.contextmanager
def itk_warnings_off():
    """Keep ITK's warnings off stderr: the caller checks (and reports) the case itself."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def first_line(e: Exception) -> str:
    """The telling line of an ITK exception (its "Description:"), else its last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages start with the source location; the description is the most useful line
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(e).__name__
