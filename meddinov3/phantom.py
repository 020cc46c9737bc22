"""Synthetic abdominal CT with labels, and the real LiTS liver CT that installs from PyPI.

Both return SimpleITK images in LPS with the usual axial layout (array (z, y, x): z inferior -> superior,
y anterior -> posterior, x right -> left) so tests, the demo, training and benchmarks see the same geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Label values of the phantom.
PHANTOM_LABELS = {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spine": 4, "tumour": 5}
ORGANS = ("liver", "kidney_right", "kidney_left", "spine")
_HU = {"body": 40.0, "liver": 60.0, "kidney_right": 150.0, "kidney_left": 150.0, "spine": 700.0, "tumour": 20.0,
       "fat": -100.0}


def make_phantom_ct(shape: tuple[int, int, int] = (48, 96, 96), spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
                    seed: int = 0, organs: tuple[str, ...] = ORGANS, noise: float = 15.0, tumour: bool = True,
                    dtype=np.int16) -> tuple[sitk.Image, sitk.Image]:
    """(CT in HU, uint8 labels) of an ellipsoidal abdomen. `shape` is (z, y, x), `spacing` (sx, sy, sz) in mm.

    Organs sit at fixed anatomical positions (liver on the patient's right = low x, spine posterior) with a
    small seeded jitter, so the phantom is not left-right or anterior-posterior symmetric.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sx, sy, sz = spacing
    # physical coordinates (mm) relative to the volume centre
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    half_x, half_y = nx * sx / 2, ny * sy / 2
    j = lambda s: 1.0 + rng.uniform(-s, s)

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2 <= 1.0

    ct = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    body = ((X / (0.85 * half_x)) ** 2 + ((Y - 0.05 * half_y) / (0.7 * half_y)) ** 2) <= 1.0
    ct[body] = _HU["body"]
    fat = body & ~(((X / (0.78 * half_x)) ** 2 + ((Y - 0.05 * half_y) / (0.62 * half_y)) ** 2) <= 1.0)
    ct[fat] = _HU["fat"]
    depth = nz * sz
    masks = {
        "liver": ellipsoid(-0.35 * half_x * j(0.05), -0.1 * half_y, 0.15 * depth * j(0.1), 0.38 * half_x * j(0.08),
                           0.4 * half_y * j(0.08), 0.3 * depth),
        "kidney_right": ellipsoid(-0.35 * half_x, 0.3 * half_y, -0.2 * depth * j(0.1), 0.13 * half_x, 0.15 * half_y,
                                  0.18 * depth),
        "kidney_left": ellipsoid(0.35 * half_x, 0.3 * half_y, -0.15 * depth * j(0.1), 0.13 * half_x, 0.15 * half_y,
                                 0.18 * depth),
        "spine": (((X / (0.1 * half_x)) ** 2 + ((Y - 0.45 * half_y) / (0.1 * half_y)) ** 2) <= 1.0),
    }
    for name in organs:
        m = masks[name] & body
        ct[m] = _HU[name]
        labels[m] = PHANTOM_LABELS[name]
    if tumour and "liver" in organs:
        t = ellipsoid(-0.4 * half_x, -0.15 * half_y, 0.15 * depth, 0.1 * half_x, 0.1 * half_y, 0.1 * depth) & (labels == 1)
        ct[t] = _HU["tumour"]
        labels[t] = PHANTOM_LABELS["tumour"]
    ct += rng.normal(0.0, noise, shape).astype(np.float32)
    image = sitk.GetImageFromArray(ct.astype(dtype) if np.dtype(dtype).kind == "i" else ct.astype(dtype))
    label_image = sitk.GetImageFromArray(labels)
    for im in (image, label_image):
        im.SetSpacing(tuple(float(s) for s in spacing))
        im.SetOrigin((-half_x, -half_y, -depth / 2))
    return image, label_image


def oblique_direction(angle_deg: float = 10.0, axis: str = "z") -> tuple[float, ...]:
    """Row-major 3x3 direction of a rotation by `angle_deg` about one axis (a mildly oblique acquisition)."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    r = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}[axis]
    return tuple(float(v) for v in np.asarray(r).ravel())


# ------------------------------------------------------------------------------------------- real CT

LIVER_CT_SPACING_MM = 1.0
"""Assumed isotropic spacing of the LiTS case-117 crop: its files carry none. Judged from anatomy in the
volume: the lumbar vertebral body is ~40 voxels wide (adult ~40 mm), the aorta ~25 voxels (~25 mm), and a
vertebra + disc repeats every ~32 voxels along the body axis (~30-35 mm)."""


def liver_ct_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("liver_ct_segmentation_package")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("liver-ct-segmentation-package is not installed "
                                "(pip install --no-deps liver-ct-segmentation-package)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_mrc(path: Path, dtype) -> np.ndarray:
    data = np.fromfile(path, dtype=dtype, offset=1024)
    if data.size != 128 ** 3:
        raise ValueError(f"{path}: expected 128^3 voxels after the 1024-byte header, found {data.size}")
    return data.reshape(128, 128, 128)


def load_liver_ct() -> tuple[sitk.Image, sitk.Image]:
    """(CT float32 HU, uint8 labels 0 background / 1 liver / 2 tumour) of LiTS case 117, 128^3 at 1 mm.

    The MRC array's axes are (L-R, A-P, I-S) - looking at it, axis 2 (not axis 0) is the body axis: axial slices
    are `mrc[:, :, k]`, with the liver at low axis-0 (patient right), the spine at high axis-1 (posterior) and
    lung at high axis-2 (superior). It is transposed to the usual (z=S, y=P, x=L) array with identity direction.
    """
    folder = liver_ct_dir()
    ct = _read_mrc(folder / "img_117.mrc", np.float32).transpose(2, 1, 0)
    lab = _read_mrc(folder / "lab_117.mrc", np.uint16).transpose(2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(ct))
    labels = sitk.GetImageFromArray(np.ascontiguousarray(lab.astype(np.uint8)))
    for im in (image, labels):
        im.SetSpacing((LIVER_CT_SPACING_MM,) * 3)
        im.SetOrigin((-64.0, -64.0, -64.0))
    return image, labels
