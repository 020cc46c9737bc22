"""Images in and out: read (files or DICOM series), validate, reorient to slices, write.

Geometry convention: SimpleITK images, numpy arrays in SimpleITK order (z, y, x). The engine works on a
*canonical* array whose axes are patient (S, P, L) in LPS: axial slices along axis 0, rows anterior ->
posterior, columns right -> left (the usual radiological display). `Orientation` maps any file's axis order,
flips and (nearest-axis) oblique direction cosines to that layout and back exactly, by pure permutation and
flipping of voxels: no resampling, so the round trip is lossless.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_ITK_IMAGE_IO = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".mha": "MetaImageIO",
                 ".mhd": "MetaImageIO"}
MIN_SPACING_MM = 0.01  # below: spacing written in metres (or a broken header); the slices would be absurdly large
MAX_SPACING_MM = 50.0
MAX_EXTENT_MM = 2000.0  # field of view (size x spacing) along any axis: a whole-body CT is under 2 m


class InputError(Exception):
    """A problem with one input image: `str()` is '<path>: <problem>'."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


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


@contextlib.contextmanager
def itk_warnings_off():
    """Keep ITK's warnings off stderr: the caller checks (and reports) the case itself."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """File names of the largest DICOM series directly in `folder` (empty when there is none).

    A scout or a dose report beside the CT is smaller than it; two series of the same size (two kernels or phases)
    are refused, since picking one would be a guess.
    """
    reader = sitk.ImageSeriesReader
    with itk_warnings_off():  # GDCM warns "No Series were found" for other folders
        ids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    series = sorted(((reader.GetGDCMSeriesFileNames(str(folder), sid), sid) for sid in ids), key=lambda s: -len(s[0]))
    if len(series) > 1 and len(series[0][0]) == len(series[1][0]):
        tied = [sid for files, sid in series if len(files) == len(series[0][0])]
        raise InputError(folder, f"holds {len(series)} DICOM series, {len(tied)} of them with {len(series[0][0])} "
                                 f"files each (series UIDs {', '.join(tied)}): put the series to segment in a "
                                 "folder of its own")
    return list(series[0][0]) if series else []


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


# ---------------------------------------------------------------------------------------------- reading


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is normally present
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 1 << 40


def bytes_needed(size: tuple[int, ...], num_classes: int = 2, probabilities: bool = False) -> int:
    """Rough peak host memory to segment a volume: input + float copy + labels (+ float16 probabilities)."""
    n = int(np.prod(size, dtype=np.int64))
    return n * (4 + 4 + 2 + (2 * num_classes if probabilities else 0))


def check_header(path, size, spacing, dimension: int, components: int, num_classes: int = 2,
                 probabilities: bool = False, available: int | None = None) -> None:
    """Reject images that cannot be segmented before reading their voxels."""
    if components != 1:
        raise InputError(path, f"has {components} components per voxel (vector/colour image); a scalar CT/MR volume is needed")
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        raise InputError(path, f"is a 2D image (size {'x'.join(map(str, size))}); a 3D volume is needed")
    if dimension != 3:
        raise InputError(path, f"is a {dimension}D image (size {'x'.join(map(str, size))}); a 3D volume is needed")
    if 0 in size:
        raise InputError(path, "is empty (zero voxels)")
    shown = tuple(round(s, 4) for s in spacing)
    bad = [s for s in spacing if not (math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM)]
    if bad:
        raise InputError(path, f"has an invalid voxel spacing {shown} mm "
                               f"(each must be >= {MIN_SPACING_MM:g} and <= {MAX_SPACING_MM:g} mm)")
    extent = [n * s for n, s in zip(size, spacing)]
    if max(extent) > MAX_EXTENT_MM:
        raise InputError(path, f"has an absurd field of view {' x '.join(f'{e:.0f}' for e in extent)} mm (size "
                               f"{'x'.join(map(str, size))}, spacing {shown} mm; at most {MAX_EXTENT_MM:g} mm "
                               f"along each axis): wrong spacing in the header?")
    need = bytes_needed(size, num_classes, probabilities)
    avail = available_memory_bytes() if available is None else available
    if need > avail:
        raise InputError(path, f"volume of {'x'.join(map(str, size))} voxels needs about {need / 2**30:.1f} GiB of "
                               f"memory, only {avail / 2**30:.1f} GiB available")


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
            raise InputError(path, f"unreadable DICOM series ({_first_line(e)})") from None
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
        raise InputError(path, f"unreadable image file ({_first_line(e)})") from None
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
        raise InputError(path, f"unreadable or truncated image file ({_first_line(e)})") from None


def _truncated(path, have: int, need: int, what: str = "voxel data") -> InputError:
    return InputError(path, f"unreadable or truncated image file (the header announces {need} bytes of {what}, "
                            f"the file holds {max(have, 0)})")


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/NIfTI-2 header that locate and decode the voxel data."""

    dtype: np.dtype  # with the file's byte order
    shape: tuple[int, ...]
    vox_offset: int
    scl_slope: float
    scl_inter: float

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def scaled(self) -> bool:  # the standard: slope 0 (or NaN) means "no scaling"
        return self.scl_slope != 0 and not math.isnan(self.scl_slope)


# NIfTI datatype code -> numpy type (RGB/complex data: components are decoded as their scalar type)
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "f4", 64: "f8", 128: "u1", 256: "i1", 512: "u2",
                 768: "u4", 1024: "i8", 1280: "u8", 1792: "f8", 2304: "u1"}


def nifti_header(path: str | os.PathLike, head: bytes) -> NiftiHeader:
    """Parse the first 540 bytes of a NIfTI-1 or NIfTI-2 file (either byte order)."""
    for order in "<>":
        size = int(np.frombuffer(head[:4], order + "i4")[0]) if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            dim = np.frombuffer(head, order + "i2", 8, 40)
            code, bitpix = (int(v) for v in np.frombuffer(head, order + "i2", 2, 70))
            vox_offset = int(np.frombuffer(head, order + "f4", 1, 108)[0])
            slope, inter = (float(v) for v in np.frombuffer(head, order + "f4", 2, 112))
            break
        if size == 540 and len(head) >= 540:
            code, bitpix = (int(v) for v in np.frombuffer(head, order + "i2", 2, 12))
            dim = np.frombuffer(head, order + "i8", 8, 16)
            vox_offset = int(np.frombuffer(head, order + "i8", 1, 168)[0])
            slope, inter = (float(v) for v in np.frombuffer(head, order + "f8", 2, 176))
            break
    else:
        raise InputError(path, "unreadable image file (not a NIfTI-1 or NIfTI-2 header)")
    ndim = int(dim[0])
    if code not in _NIFTI_DTYPES or not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8:
        raise InputError(path, f"unreadable image file (unsupported NIfTI datatype {code} / {bitpix} bits)")
    dtype = np.dtype(order + _NIFTI_DTYPES[code])
    shape = tuple(int(d) for d in dim[1:ndim + 1]) + (bitpix // 8 // dtype.itemsize,)
    return NiftiHeader(dtype, shape, vox_offset, slope, inter)


def check_nifti_data(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header says, or holds NaN/inf (float data).

    Reads the data in chunks (through gzip for gzipped files, which also checks the stream), so memory stays bounded.
    """
    import gzip
    import zlib

    path = Path(path)
    gz = path.name.lower().endswith(".gz")  # until the first bytes say (the error message if it cannot be opened)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # ITK goes by the content too: a plain file named .nii.gz reads
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = nifti_header(path, f.read(540))
            need = header.data_bytes
            if not gz:
                have = path.stat().st_size - header.vox_offset
                if have < need:
                    raise _truncated(path, have, need)
            f.seek(header.vox_offset)
            step = max(header.dtype.itemsize, chunk_bytes // header.dtype.itemsize * header.dtype.itemsize)
            have = bad = 0
            while have < need and (gz or header.dtype.kind == "f"):  # plain integer files: the size is enough
                block = f.read(min(step, need - have))
                if not block:
                    raise _truncated(path, have, need)
                have += len(block)
                if header.dtype.kind == "f":
                    values = np.frombuffer(block, header.dtype)
                    if header.scaled:
                        with np.errstate(over="ignore", invalid="ignore"):
                            values = values * header.dtype.type(header.scl_slope) + header.dtype.type(header.scl_inter)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            if gz:
                while f.read(chunk_bytes):  # the rest of the stream: a damaged tail is an error too
                    pass
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(path, f"unreadable or truncated image file ({'gzip: ' if gz else ''}{e})") from None
    if header.scaled and not (math.isfinite(header.scl_slope) and math.isfinite(header.scl_inter)):
        bad = int(np.prod(header.shape, dtype=np.int64))
    if bad:
        raise InputError(path, f"contains {bad} NaN or infinite voxel value(s)")


_META_TYPE_BYTES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4, "ULONG": 4,
                    "LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}


def check_metaimage_data(path: str | os.PathLike) -> None:
    """Refuse a MetaImage (.mha, or .mhd + one raw file) whose data is shorter than its header says (for
    compressed data: its CompressedDataSize)."""
    path = Path(path)
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        while len(fields) < 64:
            line = f.readline(4096)
            if b"=" not in line:
                return  # not a header ITK reads either: it gives the error
            key, value = (part.strip() for part in line.decode("latin-1").split("=", 1))
            fields[key.lower()] = value
            if key.lower() == "elementdatafile":
                break
        data_start = f.tell()
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        itemsize = _META_TYPE_BYTES[fields["elementtype"].upper().removeprefix("MET_").removesuffix("_ARRAY")]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
        data_file = fields["elementdatafile"]
    except (KeyError, ValueError):
        return
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if data_file.upper() == "LIST" or " " in data_file or "%" in data_file:
        return  # multi-file data: ITK checks it
    if data_file.upper() != "LOCAL":
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise InputError(path, f"unreadable image file (its data file {data_file} does not exist)")
        size = data_path.stat().st_size
    else:
        size = path.stat().st_size
    if header_size == -1:
        return  # data at the end of the file: any length fits
    if data_file.upper() != "LOCAL":
        data_start = max(header_size, 0)
    if not compressed:
        need = int(np.prod(dims, dtype=np.int64)) * channels * itemsize
    elif fields.get("compresseddatasize", "").isdigit():
        need = int(fields["compresseddatasize"])
    else:
        return
    if size - data_start < need:
        raise _truncated(path, size - data_start, need, "compressed voxel data" if compressed else "voxel data")


def check_slice_positions(path, positions: list[str | None], direction, tolerance: float = 0.1,
                          spacing=None) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced (missing or duplicate slices): ITK would average
    the spacing and put every slice after a gap in the wrong place. Refuse a sheared series too (gantry tilt:
    slices stepping sideways, not along their normal): ITK stacks them along the normal, so the image and its
    label map would be off by up to the shear.

    `positions`: ImagePositionPatient ("x\\y\\z") of each file in series order; `direction`: the image's
    direction cosines (third column: the slice normal). Steps may differ by `tolerance` x the median step; the
    slices may drift sideways by half a pixel (`spacing`: x, y pixel spacing; else 0.5 mm) in all.
    """
    try:
        points = np.array([[float(v) for v in p.split("\\")] for p in positions], dtype=float)
    except (AttributeError, ValueError):
        return  # no (or unparsable) positions: nothing to check against
    if len(points) < 2 or points.ndim != 2 or points.shape[1] != 3:
        return
    normal = np.asarray(direction, float).reshape(3, 3)[:, 2]
    rel = points - points[0]
    drift = float(np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1).max())
    if drift > 0.5 * (min(spacing[:2]) if spacing is not None else 1.0):
        raise InputError(path, f"DICOM series is sheared (gantry tilt?): its slices drift {drift:.3g} mm sideways "
                               f"from the slice normal over {len(points)} slices, so no grid holds them as they "
                               "are; resample it to a regular grid first (e.g. Slicer's DICOM import with "
                               "acquisition geometry regularization)")
    if len(points) < 3:
        return
    steps = np.diff(points @ normal)
    median = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - median) > tolerance * abs(median))
    if abs(median) < 1e-6 or len(off):
        i = int(off[0]) if len(off) else 0
        raise InputError(path, f"DICOM slices are unevenly spaced: {abs(steps[i]):.3g} mm between slices {i + 1} and "
                               f"{i + 2} of {len(points)}, {abs(median):.3g} mm elsewhere (missing or duplicate "
                               "slices?)")


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages start with the source location; the description is the most useful line
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(e).__name__


def validate_image(image: sitk.Image, path: str | os.PathLike = "<image>", modality: str | None = "CT",
                   num_classes: int = 2, probabilities: bool = False) -> np.ndarray:
    """Check an in-memory image (shape, spacing, values); returns its voxels as a numpy view (z, y, x)."""
    check_header(path, image.GetSize(), image.GetSpacing(), image.GetDimension(),
                 image.GetNumberOfComponentsPerPixel(), num_classes, probabilities, available=1 << 62)
    direction = np.array(image.GetDirection(), float)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction.reshape(3, 3))) < 1e-3:
        raise InputError(path, "has a degenerate direction matrix")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            n = int(finite.size - finite.sum())
            raise InputError(path, f"contains {n} NaN or infinite voxel value(s)")
    if modality and modality.upper() == "CT":
        check_hounsfield(array, path)
    return array


def check_hounsfield(array: np.ndarray, path) -> None:
    """Reject volumes that are clearly not in Hounsfield units (normalised, MR, unsigned raw CT)."""
    sample = array[:: max(1, array.shape[0] // 64)]
    lo, hi = float(sample.min()), float(sample.max())
    lo, hi = min(lo, float(array.min())), max(hi, float(array.max()))
    if hi < 0:
        why = "all values are negative"
    elif hi - lo < 100:
        why = "the range is far too narrow (normalised or non-CT image?)"
    elif lo >= 0:
        why = "there are no negative values (no air or fat: not HU; MR image or raw unsigned CT without rescaling?)"
    else:
        return
    raise InputError(path, f"intensities [{lo:g}, {hi:g}] are not CT Hounsfield units: {why}")


# ---------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Orientation:
    """How an image's voxel axes map to the canonical (S, P, L) array, and back.

    `perm[a]` is the SimpleITK index axis (0=i/x, 1=j/y, 2=k/z) that runs along patient axis a (0=L, 1=P, 2=S),
    `flip[a]` whether it runs the opposite way (towards R, A or I).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def of(cls, image_or_direction) -> "Orientation":
        d = image_or_direction.GetDirection() if hasattr(image_or_direction, "GetDirection") else image_or_direction
        m = np.asarray(d, float).reshape(3, 3)  # column i = direction of index axis i in LPS
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(m[a, p[a]]) for a in range(3)))
        return cls(tuple(int(p) for p in best), tuple(bool(m[a, best[a]] < 0) for a in range(3)))

    def _np_axes(self) -> list[int]:
        # canonical numpy axis n is patient axis 2-n, held by sitk axis perm[2-n] = numpy axis 2-perm[2-n]
        return [2 - self.perm[2 - n] for n in range(3)]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(…, z, y, x) array of the image -> (…, S, P, L) view (leading axes, e.g. classes, kept)."""
        lead = array.ndim - 3
        out = np.transpose(array, list(range(lead)) + [lead + a for a in self._np_axes()])
        flips = [lead + n for n in range(3) if self.flip[2 - n]]
        return np.flip(out, flips) if flips else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of `to_canonical`."""
        lead = array.ndim - 3
        flips = [lead + n for n in range(3) if self.flip[2 - n]]
        out = np.flip(array, flips) if flips else array
        inv = np.argsort(self._np_axes())
        return np.transpose(out, list(range(lead)) + [lead + int(a) for a in inv])

    def canonical_spacing(self, spacing) -> tuple[float, float, float]:
        """(slice, row, column) spacing of the canonical array: (S, P, L) = sitk spacing of perm[2], perm[1], perm[0]."""
        return tuple(float(spacing[self.perm[a]]) for a in (2, 1, 0))

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)


# where an index axis points, in LPS: L/P/S along +x/+y/+z, R/A/I the opposite way (DICOMOrient's letters)
_AXIS_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def check_orientation_code(code: str) -> str:
    """An orientation code such as 'RAS' or 'LPS' (upper-cased): letter i says where index axis i (x, y, z) points,
    as in ITK's DICOMOrient; one letter per patient axis. ValueError otherwise."""
    text = str(code).strip().upper()
    if len(text) != 3 or any(c not in _AXIS_LETTERS for c in text) or len({_AXIS_LETTERS[c][0] for c in text}) != 3:
        raise ValueError(f"orientation code {code!r} must be three letters, one of L/R, one of P/A and one of S/I, "
                         "each saying where an index axis (x, y, z) points: e.g. RAS (NIfTI files) or LPS (DICOM)")
    return text


def direction_of_code(code: str) -> tuple[float, ...]:
    """SimpleITK direction (9 numbers, LPS) of an image stored in orientation `code`."""
    m = np.zeros((3, 3))
    for axis, letter in enumerate(check_orientation_code(code)):
        patient, sign = _AXIS_LETTERS[letter]
        m[patient, axis] = sign
    return tuple(float(v) for v in m.ravel())


def reoriented(image: sitk.Image, perm: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> sitk.Image:
    """Same voxels in the same physical place, stored with another axis order/flips (for tests and tools).

    New index axis i is old axis perm[i], reversed where flip[i].
    """
    out = sitk.PermuteAxes(image, [int(p) for p in perm])
    if any(flip):
        out = sitk.Flip(out, [bool(f) for f in flip])
    return out


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Voxels (z, y, x) on `reference`'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def crop_box(image: sitk.Image, roi) -> tuple[sitk.Image, tuple[int, int, int], tuple[int, int, int]]:
    """Crop to a voxel box (x0, y0, z0, x1, y1, z1): inclusive start, exclusive end, clipped to the image.

    Returns the cropped image (same physical placement) and the clipped start / end indices (x, y, z).
    """
    if len(roi) != 6:
        raise ValueError(f"ROI needs 6 numbers x0,y0,z0,x1,y1,z1, got {len(roi)}")
    x0, y0, z0, x1, y1, z1 = (int(v) for v in roi)
    size = image.GetSize()
    lo = tuple(max(0, v) for v in (x0, y0, z0))
    hi = tuple(min(s, v) for s, v in zip(size, (x1, y1, z1)))
    if any(b <= a for a, b in ((x0, x1), (y0, y1), (z0, z1))):
        raise ValueError(f"ROI {tuple(roi)} is empty: each end (x1, y1, z1) must be larger than its start "
                         "(x0, y0, z0; the end is exclusive)")
    if any(h <= l for l, h in zip(lo, hi)):
        raise ValueError(f"ROI {tuple(roi)} does not overlap the image (size {size})")
    return sitk.RegionOfInterest(image, [h - l for l, h in zip(lo, hi)], list(lo)), lo, hi
