"""Images in and out: find the inputs, read them (files or DICOM series) with their headers checked first, check
the voxels, and map any stored orientation to the engine's canonical (S, P, L) layout and back.

One concern a module:

- `find`: supported suffixes, expanding the command line's files and folders (`list_inputs`).
- `read`: `read_image` (a file, or a folder's DICOM series).
- `headers`: what a header announces (3D, scalar, spacing, field of view, memory) and, at byte level, NIfTI /
  MetaImage voxel data as long as announced and finite.
- `dicom`: the one series of a folder, evenly spaced and unsheared slices.
- `intensity`: an image in memory (`validate_image`): finite values, CT in Hounsfield units.
- `orientation`: `Orientation` (the canonical layout; lossless, no resampling), orientation codes, `reoriented`.
- `geometry`: same grid, array onto a grid, crop to a voxel box.
- `errors`: `InputError` ('<path>: <problem>'), ITK messages kept to one line.

The names below are re-exported: callers import them from `meddinov3.volumes`.
"""

from .dicom import dicom_series
from .errors import InputError, itk_warnings_off
from .find import IMAGE_SUFFIXES, image_suffix, list_inputs, strip_suffix
from .geometry import array_to_image, crop_box, same_geometry
from .headers import check_nifti_data
from .intensity import validate_image
from .orientation import Orientation, check_orientation_code, direction_of_code, reoriented
from .read import read_image

__all__ = [
    "IMAGE_SUFFIXES", "InputError", "Orientation", "array_to_image", "check_nifti_data", "check_orientation_code",
    "crop_box", "dicom_series", "direction_of_code", "image_suffix", "itk_warnings_off", "list_inputs", "read_image",
    "reoriented", "same_geometry", "strip_suffix", "validate_image",
]
