"""nnU-Net's inference semantics, for models in its convention (`model.json` "slicing": "stored": nnU-Net result
folders and packages converted from them), written with numpy/scipy/torch (nnunetv2 is only the tests' oracle).

What `nnUNetv2_predict` does with a 2d configuration, in its order: read the array as the file stores it (SimpleITK
order z, y, x; spacing reversed), apply the plans' `transpose_forward`, crop to the bounding box of the non-zero
voxels, normalise, resample each slice to the plans' spacing with the plans' image resampling (spline order 3,
`resampling_fn_data_kwargs`), slide the patch over every slice along axis 0 (steps of half a patch, Gaussian weights
peaking at n // 2, mirroring on the checkpoint's axes), average the logits over folds, resample the LOGITS back
(order 1, `resampling_fn_probabilities_kwargs`), argmax (softmax for probabilities), put the crop back, transpose
back. No reorientation: the network sees slices as its training files stored them. `training_orientation` (e.g.
"RAS") reorients inputs stored otherwise to that layout first, and the labels back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from ..options import SegmentOptions
from ..volumes import Orientation, direction_of_code
from .inference import SlicePredictor
from .preprocess import make_normalizer, resampled_shape, spline_resize, target_spacing
from .stages import Cancelled, background_probabilities, check_model_slice, is_cancelled

ANISO_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: spacing ratio above which z is resampled separately


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StoredLayout:
    """The array nnU-Net slices: the input's voxels (z, y, x) as stored, or as a file in `training_orientation`
    would store them, then transposed by `transpose_forward`. Views both ways, no copy, exact inverses."""

    input_orientation: Orientation
    training: Orientation | None
    transpose_forward: tuple[int, int, int]
    spacing: tuple[float, float, float]  # of the layout's axes

    @classmethod
    def of(cls, image: sitk.Image, transpose_forward, training_orientation: str | None = None) -> "StoredLayout":
        source = Orientation.of(image)
        spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
        training = None
        if training_orientation:
            training = Orientation.of(direction_of_code(training_orientation))
            canonical = source.canonical_spacing(image.GetSpacing())  # (S, P, L)
            sitk_spacing = [0.0, 0.0, 0.0]
            for patient_axis in range(3):  # training index axis perm[a] runs along patient axis a
                sitk_spacing[training.perm[patient_axis]] = canonical[2 - patient_axis]
            spacing_zyx = tuple(reversed(sitk_spacing))
        tf = tuple(int(a) for a in transpose_forward)
        return cls(source, training, tf, tuple(spacing_zyx[a] for a in tf))

    def to_layout(self, array: np.ndarray) -> np.ndarray:
        """(..., z, y, x) array of the input -> (..., axes nnU-Net slices) view."""
        if self.training is not None:
            array = self.training.from_canonical(self.input_orientation.to_canonical(array))
        lead = array.ndim - 3
        return np.transpose(array, list(range(lead)) + [lead + a for a in self.transpose_forward])

    def from_layout(self, array: np.ndarray) -> np.ndarray:
        """Inverse of `to_layout`."""
        lead = array.ndim - 3
        back = np.argsort(self.transpose_forward)
        array = np.transpose(array, list(range(lead)) + [lead + int(a) for a in back])
        if self.training is not None:
            array = self.input_orientation.from_canonical(self.training.to_canonical(array))
        return array


def nonzero_box(volume: np.ndarray) -> tuple[slice, ...]:
    """nnU-Net's `crop_to_nonzero` box: the bounding box of the non-zero voxels (filling holes cannot widen it);
    the whole volume when every voxel is zero."""
    nonzero = volume != 0
    box = []
    for axis in range(volume.ndim):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(volume.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if len(hit) else slice(0, volume.shape[axis]))
    return tuple(box)


def normalize_volume(volume: np.ndarray, norm: dict) -> np.ndarray:
    """(z, y, x) float32 cropped volume -> normalised in place, with nnU-Net's per-volume statistics (z-score over the
    whole crop, or over its filled non-zero mask with `use_mask`; rescale01 over the crop)."""
    scheme = (norm or {}).get("scheme", "ct")
    if scheme == "zscore":
        if norm.get("use_mask"):
            mask = ndimage.binary_fill_holes(volume != 0)
            mean, std = volume[mask].mean(), volume[mask].std()
            volume[mask] = (volume[mask] - mean) / max(std, 1e-8)
            return volume
        mean, std = volume.mean(), volume.std()
        volume -= mean
        volume /= max(std, 1e-8)
        return volume
    if scheme == "rescale01":
        volume -= volume.min()
        volume /= max(volume.max(), 1e-8)
        return volume
    return make_normalizer(norm, volume)(torch.from_numpy(volume)).numpy()


# ---------------------------------------------------------------------------------------------- resampling


def separate_axis(current_spacing, new_spacing, force_separate_z: bool | None = None,
                  threshold: float = ANISO_THRESHOLD) -> int | None:
    """nnU-Net's `determine_do_sep_z_and_axis`: the one low-resolution axis resampled on its own, or None."""
    def lowres(spacing):
        spacing = np.asarray(spacing, float)
        return np.flatnonzero(spacing.max() / spacing == 1)

    if force_separate_z is not None:
        axes = lowres(current_spacing) if force_separate_z else None
    elif max(current_spacing) / min(current_spacing) > threshold:
        axes = lowres(current_spacing)
    elif max(new_spacing) / min(new_spacing) > threshold:
        axes = lowres(new_spacing)
    else:
        axes = None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def resample(data: np.ndarray, new_shape, current_spacing, new_spacing, order: int = 3, order_z: int = 0,
             force_separate_z: bool | None = None) -> np.ndarray:
    """nnU-Net's `resample_data_or_seg_to_shape` for images and logits: (c, z, y, x) -> (c, *new_shape) float32.

    Anisotropic spacing (ratio > 3): the low-resolution axis is left out of the spline (`order`) and resampled
    with `order_z` (nearest by default). Slices along axis 0 are independent when axis 0 keeps its size (2d
    configurations), so chunks of slices resample as the whole volume does (up to the clipping range for order > 1).
    """
    shape, new_shape = np.array(data.shape[1:]), np.array(new_shape, dtype=int)
    if np.all(shape == new_shape):
        return np.asarray(data, dtype=np.float32)
    axis = separate_axis(current_spacing, new_spacing, force_separate_z)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = spline_resize(data[c], new_shape, order)
            continue
        planes_shape = new_shape.copy()
        planes_shape[axis] = shape[axis]
        planes = np.empty(planes_shape)
        for i in range(shape[axis]):
            index = tuple(i if a == axis else slice(None) for a in range(3))
            planes[index] = spline_resize(data[c][index], np.delete(new_shape, axis), order)
        if shape[axis] != new_shape[axis]:
            grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(float)
            for a in range(3):
                grid[a] = planes.shape[a] / new_shape[a] * (grid[a] + 0.5) - 0.5
            planes = ndimage.map_coordinates(planes, grid, order=order_z, mode="nearest")
        out[c] = planes
    return out


# ---------------------------------------------------------------------------------------------- prediction


def predict_stored(image: sitk.Image, networks, spec, device: torch.device, out: np.ndarray,
                   options: SegmentOptions, bg_index: int = 0, return_probabilities: bool = False, progress=None,
                   cancel=None, source="<image>") -> tuple[np.ndarray | None, dict]:
    """Class indices of `image` written into `out` ((z, y, x) of the image, its dtype) the way nnUNetv2_predict
    computes them. Returns (float16 probabilities (classes, z, y, x) or None, stats).

    `options.training_orientation` overrides the package's (`spec.nnunet["training_orientation"]`);
    `options.fast` runs at the model's fast in-plane spacing; `options.tta`, `batch_size` and `compile` go to the
    `SlicePredictor`. `cancel()` True between batches raises `stages.Cancelled`; `source` names the image in errors.
    """
    t0 = time.perf_counter()
    plans = spec.nnunet
    layout = StoredLayout.of(image, plans["transpose_forward"],
                             options.training_orientation or plans.get("training_orientation"))
    data = layout.to_layout(sitk.GetArrayViewFromImage(image))
    box = nonzero_box(data)
    cropped = normalize_volume(np.array(data[box], dtype=np.float32), spec.normalization)
    spacing = layout.spacing
    target = (spacing[0],) + tuple(target_spacing(spec, spacing[1:], options.fast))
    model_hw = resampled_shape(cropped.shape[1:], spacing[1:], target[1:])
    check_model_slice(source, cropped.shape[1:], spacing[1:], model_hw, target[1:])
    model_in = resample(cropped[None], (cropped.shape[0], *model_hw), spacing, target, **plans["resampling_data"])[0]
    del cropped
    t_setup = time.perf_counter() - t0
    out_layout = layout.to_layout(out)  # a view: the indices land in `out` directly
    out_layout[...] = bg_index  # outside the crop: background, as nnU-Net
    labels = out_layout[box]
    crop_hw = labels.shape[1:]
    probs = probs_view = None
    if return_probabilities:
        probs = background_probabilities(spec.config.num_classes, out.shape, bg_index)
        probs_view = layout.to_layout(probs)[(slice(None),) + box]

    predictor = SlicePredictor(networks, spec, device, tta=options.tta, batch_size=options.batch_size,
                               compile=options.compile, return_logits=True)
    per_batch = predictor.slices_per_batch(model_hw)
    Z = model_in.shape[0]
    t_model = 0.0
    for start in range(0, Z, per_batch):
        if is_cancelled(cancel):
            raise Cancelled("segmentation cancelled")
        zs = slice(start, min(Z, start + per_batch))
        t1 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(model_in[zs]))[:, None].to(device)
        logits = predictor.predict(x).cpu().numpy().transpose(1, 0, 2, 3)  # (C, b, h, w)
        t_model += time.perf_counter() - t1
        back = resample(logits, (logits.shape[1], *crop_hw), target, spacing, **plans["resampling_probabilities"])
        labels[zs] = back.argmax(0)
        if probs_view is not None:
            probs_view[:, zs] = torch.softmax(torch.from_numpy(back), dim=0).numpy()
        if progress is not None:
            progress.update(zs.stop, Z, stage="segmenting")
    stats = {"device": str(device), "batch_size": predictor.batch_size, "slices": int(Z), "predicted_slices": int(Z),
             "slice_step": 1, "skipped_slices": 0, "model_shape": list(model_hw), "spacing": list(target[1:]),
             "tiles_per_slice": predictor.tiles_per_slice(model_hw), "oom_backoffs": list(predictor.oom_events),
             "model_time_s": round(t_model, 3), "slicing": "stored", "crop": [[s.start, s.stop] for s in box],
             "setup_s": round(t_setup, 3)}
    return probs, stats
