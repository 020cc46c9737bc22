"""Reading an image file or a folder's DICOM series, every header check made before the voxels load."""

from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from .dicom import check_slice_positions, dicom_series
from .errors import InputError, first_line, itk_warnings_off
from .find import image_suffix
from .headers import check_header, check_metaimage_data, check_nifti_data

_ITK_IMAGE_IO = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".mha": "MetaImageIO",
                 ".mhd": "MetaImageIO"}


def read_image(path: str | os.PathLike, num_classes: int = 2, probabilities: bool = False) -> sitk.Image:
    """Read an image file or the (largest) DICOM series of a folder; header checked before the voxels load."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        files = dicom_series(path)
        if not files:
            raise InputError(path, "folder holds no DICOM series")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice positions
        try:
            with itk_warnings_off():  # "Non uniform sampling or missing slices": check_slice_positions says it
                image = reader.Execute()
        except RuntimeError as e:
            raise InputError(path, f"unreadable DICOM series ({first_line(e)})") from None
        positions = [reader.GetMetaData(i, "0020|0032") if reader.HasMetaDataKey(i, "0020|0032") else None
                     for i in range(len(files))]
        check_slice_positions(path, positions, image.GetDirection(), spacing=image.GetSpacing())
        check_header(path, image.GetSize(), image.GetSpacing(), image.GetDimension(),
                     image.GetNumberOfComponentsPerPixel(), num_classes, probabilities)
        return image
    suffix = image_suffix(path)
    if suffix is None and path.suffix.lower() not in (".dcm", ""):
        raise InputError(path, "unsupported file type (use .nii, .nii.gz, .nrrd, .mha, .mhd or a DICOM folder)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if suffix and not path.name.endswith(suffix):  # ITK picks MetaImage by the lower-case suffix only (CT.MHA)
        reader.SetImageIO(_ITK_IMAGE_IO[suffix])
    try:
        with itk_warnings_off():  # e.g. NIfTI "unexpected scales in sform" before its own error: ours is one line
            reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"unreadable image file ({first_line(e)})") from None
    check_header(path, reader.GetSize(), reader.GetSpacing(), reader.GetDimension(),
                 reader.GetNumberOfComponents(), num_classes, probabilities)
    if suffix in (".nii", ".nii.gz"):
        check_nifti_data(path)  # ITK zero-fills truncated data and turns NaN/inf into 0
    elif suffix in (".mha", ".mhd"):
        check_metaimage_data(path)  # ITK prints its own lines on stderr, then gives a wrong reason
    try:
        with itk_warnings_off():
            return reader.Execute()
    except RuntimeError as e:
        raise InputError(path, f"unreadable or truncated image file ({first_line(e)})") from None
