"""The stages of `segment_image` for the engine's canonical slicing: plan -> slice stream -> finish.

- `plan_slices` decides everything before a voxel goes through the network: the canonical (axial) view, the
  model's in-plane grid, which slices are segmented (air skipped) and which predicted (fast mode), the batches.
- `SliceStream` runs the plan. Three threads overlap the work: a reader prepares the next batch (copy, normalise,
  resample on CPU; pinned memory for CUDA), the caller's thread runs the model and resamples probabilities back to
  the input grid on the device, and a writer copies class indices (and float16 probabilities) into the outputs.
  Only per-batch probabilities exist at full precision.
- `LabelOutput` is the label map being written (through views, in the input's own axis order) and `finish`es it:
  post-processing, class index -> label value, ROI re-embedding. Models in nnU-Net's convention
  (`engine.nnunet_mode`) write into the same `LabelOutput`.

As nnU-Net's predictor and segment-anything's `SamPredictor` separate preprocessing, prediction and
postprocessing, each stage here is a unit with its own tests (Testing/engine/test_pipeline_stages.py).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..options import SegmentOptions
from ..volumes import InputError, Orientation
from .inference import SlicePredictor
from .postprocess import apply_postprocessing, fill_holes, keep_largest_component
from .preprocess import fast_slice_step, make_normalizer, resampled_shape, resize, target_spacing

AIR_HU = -600.0  # a slice whose maximum is below this is "all air"
MAX_MODEL_SLICE_SIDE = 4096  # pixels per side of a slice resampled to the model's spacing


class Cancelled(Exception):
    """Raised by `segment_image` when its `cancel` callable / event says stop."""


def is_cancelled(cancel) -> bool:
    """`cancel`: None, a threading.Event or a callable returning True to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_model_slice(source, hw, spacing, model_hw, target) -> None:
    """InputError when a slice resampled to the model's spacing would be absurdly large (a wrong spacing)."""
    if max(model_hw) > MAX_MODEL_SLICE_SIDE:
        raise InputError(source, f"slices of {hw[0]}x{hw[1]} voxels at {spacing[0]:g} x {spacing[1]:g} mm would be "
                                 f"{model_hw[0]}x{model_hw[1]} pixels at the model's spacing {target[0]:g} x "
                                 f"{target[1]:g} mm (at most {MAX_MODEL_SLICE_SIDE} per side): wrong spacing?")


def background_index(classes) -> int:
    """Channel of label value 0 (the first channel when no class has value 0)."""
    return next((i for i, c in enumerate(classes) if c.value == 0), 0)


def predicted_slices(todo: np.ndarray, step: int) -> np.ndarray:
    """Every `step`-th slice of each run of consecutive slices in `todo`, plus each run's last slice."""
    if step <= 1 or len(todo) == 0:
        return todo
    runs = np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1)
    return np.concatenate([np.union1d(run[::step], run[-1:]) for run in runs])


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class SlicePlan:
    """What the slice stream does, decided before any voxel goes through the network.

    `volume` is a view (S, P, L) of the input in the canonical axial order (`orient.to_canonical`), `spacing` its
    (slice, row, column) spacing in mm. Slices are resampled from (H, W) to `model_hw` at the model's in-plane
    spacing `target`. `todo` lists the slices segmented (not all air), `run_z` those that go through the network
    (every `step`-th in fast mode; the others are interpolated), grouped into `batches` of `predictor`'s size.
    """

    volume: np.ndarray
    orient: Orientation
    spacing: tuple[float, float, float]
    target: tuple[float, float]
    model_hw: tuple[int, int]
    normalize: Callable
    todo: np.ndarray
    step: int
    run_z: np.ndarray
    predictor: SlicePredictor
    tiles_per_slice: int
    batches: list

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, H, W) of the canonical view."""
        return self.volume.shape

    def stats(self) -> dict:
        """The plan's part of `SegmentationResult.stats`."""
        return {"batch_size": self.predictor.batch_size, "slices": int(len(self.todo)),
                "predicted_slices": int(len(self.run_z)), "slice_step": self.step,
                "skipped_slices": int(self.shape[0] - len(self.todo)), "model_shape": list(self.model_hw),
                "tiles_per_slice": self.tiles_per_slice, "spacing": list(self.target)}


def plan_slices(image: sitk.Image, networks, spec, device: torch.device, options: SegmentOptions,
                source="<image>") -> SlicePlan:
    """Plan the canonical slicing of `image` (the ROI when there is one) for `networks` (one per fold) of `spec`.

    Raises InputError (naming `source`) when a slice at the model's spacing would be absurdly large. Builds the
    `SlicePredictor` (`options.tta`, `batch_size`, `compile`) and sizes its batch for the model's slice shape.
    """
    orient = Orientation.of(image)
    volume = orient.to_canonical(sitk.GetArrayViewFromImage(image))  # (S, P, L) view
    _, H, W = volume.shape
    slice_sp, row_sp, col_sp = orient.canonical_spacing(image.GetSpacing())
    target = target_spacing(spec, (row_sp, col_sp), options.fast)
    model_hw = resampled_shape((H, W), (row_sp, col_sp), target)
    check_model_slice(source, (H, W), (row_sp, col_sp), model_hw, target)
    todo = np.arange(volume.shape[0])
    if spec.skip_empty_slices:
        todo = np.array([z for z in todo if float(volume[z].max()) >= AIR_HU], dtype=int)
    step = fast_slice_step(spec, slice_sp, target) if options.fast else 1
    run_z = predicted_slices(todo, step)
    predictor = SlicePredictor(networks, spec, device, tta=options.tta, batch_size=options.batch_size,
                               compile=options.compile)
    per_slice = predictor.tiles_per_slice(model_hw)
    slices_per_batch = predictor.slices_per_batch(model_hw)
    batches = [run_z[i:i + slices_per_batch] for i in range(0, len(run_z), slices_per_batch)]
    return SlicePlan(volume, orient, (slice_sp, row_sp, col_sp), tuple(target), tuple(model_hw),
                     make_normalizer(spec.normalization, volume), todo, step, run_z, predictor, per_slice, batches)


# ---------------------------------------------------------------------------------------------- slice stream


class _Worker(threading.Thread):
    """A daemon thread whose exception is re-raised by `check()` in the caller."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(daemon=True, name=name)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self):
        try:
            self._target_fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            self.error = e

    def check(self):
        if self.error is not None:
            raise self.error


class _SliceInterpolator:
    """Fast mode: the slices between two predicted neighbours of the same run get the linear interpolation of
    their probabilities on the model grid. The last predicted slice carries over to the next batch."""

    def __init__(self, todo: np.ndarray):
        self.wanted = set(todo.tolist())
        self.last: tuple[int, torch.Tensor] | None = None

    def fill(self, zs: np.ndarray, p: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        out_z, out_p = [], []
        for z, pz in zip(zs.tolist(), p):
            if self.last is not None:
                z0, p0 = self.last
                between = range(z0 + 1, z)
                if all(g in self.wanted for g in between):
                    for g in between:
                        out_z.append(g)
                        out_p.append(torch.lerp(p0, pz, (g - z0) / (z - z0)))
            out_z.append(z)
            out_p.append(pz)
            self.last = (z, pz)
        channels_last = p.is_contiguous(memory_format=torch.channels_last)  # keep it (torch.stack would not)
        out = torch.empty((len(out_p), *p.shape[1:]), dtype=p.dtype, device=p.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for i, q in enumerate(out_p):
            out[i] = q
        return np.array(out_z), out


class SliceStream:
    """Runs a `SlicePlan`: reader thread -> model (caller's thread) -> writer thread.

    `index` (S, H, W) receives class indices (a view of the label map in canonical order); `probs` (classes, S, H,
    W) float16 receives probabilities when not None. `run()` returns the seconds spent in the model.
    """

    def __init__(self, plan: SlicePlan, device: torch.device, index: np.ndarray, probs: np.ndarray | None = None):
        self.plan, self.device, self.index, self.probs = plan, device, index, probs
        self.resize_on_cpu = device.type == "cpu"
        self.interpolator = _SliceInterpolator(plan.todo) if plan.step > 1 else None
        self._stop = threading.Event()
        self._prepared: queue.Queue = queue.Queue(maxsize=2)
        self._finished: queue.Queue = queue.Queue(maxsize=2)
        # CPU: the reader normalises and resamples. CUDA: it gathers raw voxels (int16 stays int16: half the bytes)
        # into pinned memory, and the GPU converts, normalises and resamples them.
        dtype = plan.volume.dtype
        self._raw_dtype = dtype if dtype in (np.int16, np.uint8, np.float16, np.float32) else np.float32

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        plan = self.plan
        for zs in plan.batches:
            if self.resize_on_cpu:
                x = torch.from_numpy(np.asarray(plan.volume[zs], dtype=np.float32))[:, None]
                x = resize(plan.normalize(x), plan.model_hw)
            else:
                x = torch.from_numpy(np.asarray(plan.volume[zs], dtype=self._raw_dtype))[:, None]
            if self.device.type == "cuda":
                x = x.pin_memory()
            if not self._put(self._prepared, (zs, x)):
                return
        self._put(self._prepared, None)

    def _write(self) -> None:
        while True:
            item = self._finished.get()
            if item is None:
                return
            zs, idx, p = item
            self.index[zs] = idx.cpu().numpy()
            if p is not None:
                self.probs[:, zs] = p.cpu().numpy().transpose(1, 0, 2, 3)

    def _predict(self, zs: np.ndarray, x: torch.Tensor, writer: _Worker) -> int:
        """One batch through the model and back to (H, W); returns how many slices it filled (interpolated ones
        included), or -1 when the stream was stopped."""
        plan = self.plan
        x = x.to(self.device, non_blocking=True)
        if not self.resize_on_cpu:
            x = resize(plan.normalize(x.float()), plan.model_hw)
        p = plan.predictor.predict(x)
        n = len(zs)
        if self.interpolator is not None:
            zs, p = self.interpolator.fill(zs, p)
        if self.resize_on_cpu:  # channels-last: the class argmax reads contiguous memory (~7x faster on CPU)
            p = p.contiguous(memory_format=torch.channels_last)
        n_classes = p.shape[1]
        for k in range(0, len(zs), n):  # at most one batch of full-size probabilities at a time
            pk = resize(p[k:k + n], plan.shape[1:])
            idx = pk.argmax(1).to(torch.uint8 if n_classes <= 256 else torch.int16)
            writer.check()
            if not self._put(self._finished, (zs[k:k + n], idx, pk.half() if self.probs is not None else None)):
                break
        return -1 if self._stop.is_set() else len(zs)

    def run(self, progress=None, cancel=None) -> float:
        """Stream every batch; `progress.update(done, total, stage="segmenting")` after each, `cancel` checked
        between batches (-> Cancelled). Errors of the reader and writer threads are raised here."""
        reader, writer = _Worker(self._read, "meddinov3-read"), _Worker(self._write, "meddinov3-write")
        reader.start()
        writer.start()
        done, total, t_model = 0, len(self.plan.todo), 0.0
        try:
            if progress is not None:
                progress.update(0, total, stage="segmenting")
            while True:
                if is_cancelled(cancel):
                    raise Cancelled("segmentation cancelled")
                try:
                    item = self._prepared.get(timeout=0.5)
                except queue.Empty:
                    reader.check()
                    writer.check()
                    continue
                if item is None:
                    break
                t0 = time.perf_counter()
                filled = self._predict(*item, writer)
                t_model += time.perf_counter() - t0
                if filled < 0:
                    break
                done += filled
                if progress is not None:
                    progress.update(done, total, stage="segmenting")
            self._put(self._finished, None)
            writer.join()
            writer.check()
        finally:
            self._stop.set()
            reader.join(timeout=5)
            if writer.is_alive():
                self._finished.put(None)
                writer.join(timeout=5)
        reader.check()
        return t_model


# ---------------------------------------------------------------------------------------------- finish


def background_probabilities(n_classes: int, shape: tuple, bg_index: int) -> np.ndarray:
    """float16 (n_classes, *shape) probabilities that say background everywhere: what voxels outside the part the
    network sees (an ROI, nnU-Net's crop) hold."""
    probs = np.zeros((n_classes, *shape), dtype=np.float16)
    probs[bg_index] = 1.0
    return probs


@dataclass
class LabelOutput:
    """The label map being written, on the full input's grid, and its ROI view.

    `array` (z, y, x) of the full input, outside a ROI background 0; `roi` its view on `box` ((x0, y0, z0),
    (x1, y1, z1)) or `array` itself when `box` is (None, None); `lut` class index -> label value. Stages write
    class indices straight into `roi`, in the input's own axis order, through views: no reorienting copy and, when
    label values are the class indices (the usual case), no lookup.
    """

    full: sitk.Image
    array: np.ndarray
    roi: np.ndarray
    lut: np.ndarray
    box: tuple
    bg_index: int

    @classmethod
    def allocate(cls, full: sitk.Image, box, classes) -> "LabelOutput":
        values = [c.value for c in classes]
        lut = np.array(values, dtype=np.uint8 if len(values) <= 256 and max(values) <= 255 else np.uint16)
        array = np.zeros(sitk.GetArrayViewFromImage(full).shape, dtype=lut.dtype)
        roi = array
        if box[0] is not None:
            (x0, y0, z0), (x1, y1, z1) = box
            roi = array[z0:z1, y0:y1, x0:x1]
        return cls(full, array, roi, lut, box, background_index(classes))

    def finish(self, orient: Orientation, probs: np.ndarray | None, spec, canonical_spacing,
               options: SegmentOptions) -> tuple[sitk.Image, np.ndarray | None, list]:
        """Post-processing (on the canonical view), class index -> label value, ROI re-embedding.

        `probs`: (classes, z, y, x) of the ROI in the input's axis order, or None. Returns the label image on
        `full`'s grid, the probabilities on it (float16 (classes, z, y, x)), the post-processing steps done."""
        index = orient.to_canonical(self.roi)
        steps = []
        if options.postprocess and spec.postprocessing:
            apply_postprocessing(index, spec.postprocessing, self.lut.tolist(), canonical_spacing, self.bg_index)
            steps += [dict(step) for step in spec.postprocessing]
        if options.keep_largest:
            keep_largest_component(index, self.bg_index)
            steps.append({"step": "keep_largest"})
        if options.fill_holes:
            fill_holes(index, self.bg_index)
            steps.append({"step": "fill_holes"})
        if np.any(self.lut != np.arange(len(self.lut))):  # class index -> label value
            self.roi[...] = self.lut[self.roi]
        labels = sitk.GetImageFromArray(self.array)
        labels.CopyInformation(self.full)
        return labels, self._embed(probs), steps

    def _embed(self, probs: np.ndarray | None) -> np.ndarray | None:
        """The ROI's probabilities on the full grid (background outside)."""
        if probs is None:
            return None
        probs = np.ascontiguousarray(probs)
        if self.box[0] is None:
            return probs
        (x0, y0, z0), (x1, y1, z1) = self.box
        full = background_probabilities(len(self.lut), self.array.shape, self.bg_index)
        full[:, z0:z1, y0:y1, x0:x1] = probs
        return full
