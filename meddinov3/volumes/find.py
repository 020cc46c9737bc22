"""Finding the inputs: supported image files by suffix, DICOM series folders, folders of either."""

from __future__ import annotations

import os
from pathlib import Path

from .dicom import dicom_series
from .errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def image_suffix(path: str | os.PathLike) -> str | None:
    """The supported image suffix of `path` ('.nii.gz', '.seg.nrrd' counts as '.nrrd'), or None."""
    name = Path(path).name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def strip_suffix(path: str | os.PathLike) -> str:
    """File name without its image suffix (`ct.nii.gz` -> `ct`); folders keep their name."""
    name = Path(path).name
    for s in (".seg.nrrd",) + IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def list_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand the command line's inputs: files, DICOM series folders, and folders of images/series."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not dicom_series(p):
            found = sorted(c for c in p.iterdir() if c.is_file() and image_suffix(c) and not c.name.startswith(".")
                           and not c.name.lower().endswith(".seg.nrrd"))  # earlier results, not scans
            found += sorted(c for c in p.iterdir() if c.is_dir() and dicom_series(c))
            if not found:
                raise InputError(p, "folder holds no images (.nii/.nii.gz/.nrrd/.mha/.mhd) and no DICOM series")
            out += found
        else:
            out.append(p)
    return out
