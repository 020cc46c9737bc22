"""Checks on what an image's header announces, before its voxels are read: a 3D scalar volume with sane spacing
and field of view that fits in memory, and (NIfTI, MetaImage, byte level) voxel data as long as the header says,
without NaN or inf: ITK would zero-fill a truncated file or turn NaN into 0 without a word."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

MIN_SPACING_MM = 0.01  # below: spacing written in metres (or a broken header); the slices would be absurdly large
MAX_SPACING_MM = 50.0
MAX_EXTENT_MM = 2000.0  # field of view (size x spacing) along any axis: a whole-body CT is under 2 m


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
