"""Volume -> label map: reorient to axial slices, stream batches through the model, undo everything exactly.

Three threads overlap the work: a reader prepares the next batch (copy, normalise, resample on CPU; pinned
memory for CUDA), the caller's thread runs the model and resamples probabilities back to the input grid on
the device, and a writer copies results into the output arrays. Only per-batch probabilities exist at full
precision; the volume keeps class indices (and float16 probabilities when asked for).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..volumes import InputError, Orientation, check_orientation_code, crop_box, validate_image
from .inference import SlicePredictor
from .postprocess import apply_postprocessing, keep_largest_component
from .postprocess import fill_holes as _fill_holes
from .preprocess import fast_slice_step, make_normalizer, resampled_shape, resize, target_spacing

AIR_HU = -600.0  # a slice whose maximum is below this is "all air"
MAX_MODEL_SLICE_SIDE = 4096  # pixels per side of a slice resampled to the model's spacing


class Cancelled(Exception):
    """Raised by `segment_image` when its `cancel` callable / event says stop."""


@dataclass
class SegmentationResult:
    labels: sitk.Image  # label values on exactly the input's grid
    probabilities: np.ndarray | None  # float16 (classes, z, y, x) on the input grid, when asked for
    classes: list  # ClassInfo, channel order
    stats: dict = field(default_factory=dict)  # device, batch size, slices, timings, OOM back-offs, post-processing

    @property
    def label_array(self) -> np.ndarray:
        """The label map as a numpy array (z, y, x); its geometry is `labels`' spacing, origin and direction."""
        return sitk.GetArrayFromImage(self.labels)


def as_image(image, spacing=None, origin=None, direction=None) -> sitk.Image:
    """A SimpleITK image as is, or a numpy array (z, y, x) placed by `spacing` (required), `origin` and
    `direction` (SimpleITK order: x, y, z; defaults: zero origin, identity direction)."""
    if isinstance(image, sitk.Image):
        if any(v is not None for v in (spacing, origin, direction)):
            raise TypeError("spacing/origin/direction are for numpy arrays: a SimpleITK image has its own")
        return image
    if isinstance(image, np.ndarray):
        if spacing is None:
            raise TypeError("a numpy array needs spacing=(x, y, z) in mm (and optionally origin and direction)")
        out = sitk.GetImageFromArray(image)
        if out.GetDimension() != 3 or out.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"a numpy volume must have 3 axes (z, y, x), got shape {image.shape}")
        out.SetSpacing([float(v) for v in spacing])
        if origin is not None:
            out.SetOrigin([float(v) for v in origin])
        if direction is not None:
            out.SetDirection([float(v) for v in np.ravel(direction)])
        return out
    raise TypeError(f"image must be a SimpleITK.Image or a numpy array (z, y, x) with spacing=..., not "
                    f"{type(image).__name__} (segment_file reads and writes files)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda", "mps"):  # torch knows more (meta, xla, ...): the engine runs on these
        raise ValueError(f"unsupported device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS (Apple GPU) is not available")
    return dev


def cpu_threads() -> int:
    """This process's share of the CPU cores it may run on: the cores divided by the processes torchrun starts on
    this machine (LOCAL_WORLD_SIZE; 1 outside torchrun), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _load(model, device: torch.device, folds):
    from ..checkpoints import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        if folds is None:
            return model
        missing = [f for f in folds if f not in model.spec.folds]
        if missing:
            from ..checkpoints import CheckpointError

            raise CheckpointError(f"{model.path}: no fold(s) {', '.join(missing)} (has {', '.join(model.spec.folds)})")
        keep = [model.spec.folds.index(f) for f in folds]
        return LoadedModel(model.spec.replace(folds=list(folds)), [model.networks[i] for i in keep], model.format,
                           model.path)
    return load_model(model, device=device, folds=folds)


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


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


def predicted_slices(todo: np.ndarray, step: int) -> np.ndarray:
    """Every `step`-th slice of each run of consecutive slices in `todo`, plus each run's last slice."""
    if step <= 1 or len(todo) == 0:
        return todo
    runs = np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1)
    return np.concatenate([np.union1d(run[::step], run[-1:]) for run in runs])


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


def segment_image(image: sitk.Image | np.ndarray, model, device: str | torch.device = "auto", fast: bool = False,
                  tta: bool = False, folds: list[str] | None = None, batch_size: int | str = "auto", roi=None,
                  keep_largest: bool = False, fill_holes: bool = False, postprocess: bool = True, progress=None,
                  cancel=None, return_probabilities: bool = False, compile: bool | None = None,
                  source: str | os.PathLike = "<image>", spacing=None, origin=None,
                  direction=None, training_orientation: str | None = None,
                  reference_precision: bool = False) -> SegmentationResult:
    """Segment a 3D image. `model`: a reference (path, hf:, name) or a `LoadedModel`.

    `image`: a SimpleITK image, or a numpy array (z, y, x) with `spacing` (and `origin`, `direction`; SimpleITK
    order x, y, z). The result's `labels` is a SimpleITK image on the same grid (`label_array`: its voxels).
    `return_probabilities`: the model's class probabilities, before any post-processing (`stats["postprocessing"]`
    lists the steps the labels had).

    `fast`: the model's fast in-plane spacing, and only every n-th slice through the network (n from
    `fast_slice_step`; the slices between are interpolated). `roi` (x0, y0, z0, x1, y1, z1) voxel box of `image`
    (end exclusive): only it is segmented, the rest is background. `cancel`: callable returning True or a
    threading.Event; checked between batches (-> Cancelled).
    `postprocess`: run the steps the model package declares (`model.json` `postprocessing`) before the optional
    `keep_largest` / `fill_holes`. `source` names the image in error messages.

    Models in nnU-Net's convention (`spec.slicing == "stored"`: nnU-Net result folders and their conversions) predict
    as nnUNetv2_predict does (`engine.nnunet_mode`); `training_orientation` (e.g. "RAS") declares how their training
    files were stored, so inputs stored otherwise are reoriented to it. `reference_precision`: RoPE in bf16 as the
    reference code computes it (fidelity checks; default fp32).
    """
    t_start = time.perf_counter()
    image = as_image(image, spacing, origin, direction)
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be 'auto' or a positive integer, got {batch_size!r}")
    dev = resolve_device(device)
    loaded = _load(model, dev, folds)
    spec = loaded.spec
    classes = list(spec.classes)
    n_classes = spec.config.num_classes
    if len(classes) != n_classes:
        from ..checkpoints.package import default_classes

        classes = default_classes(n_classes)
    validate_image(image, source, spec.modality, n_classes, return_probabilities)
    if dev.type == "cpu" and fast:
        torch.set_num_threads(cpu_threads())

    if training_orientation is not None:
        training_orientation = check_orientation_code(training_orientation)
        if spec.slicing != "stored":
            raise ValueError(f"training_orientation is for models in nnU-Net's convention (nnU-Net result folders and "
                             f"their conversions); {spec.name} slices the engine's canonical view")
    for net in loaded.networks:  # set (or reset) on every call: the networks of a LoadedModel are reused
        if hasattr(net, "backbone"):
            net.backbone.set_reference_precision(reference_precision)

    full = image
    lo = hi = None
    if roi is not None:
        try:
            image, lo, hi = crop_box(image, roi)
        except ValueError as e:
            raise InputError(source, str(e)) from None

    orient = Orientation.of(image)
    if spec.slicing == "stored":
        return _segment_stored(image, full, (lo, hi), loaded, dev, classes, t_start, source=source, tta=tta,
                               batch_size=batch_size,
                               compile=compile, fast=fast, return_probabilities=return_probabilities,
                               training_orientation=training_orientation, progress=progress, cancel=cancel,
                               postprocess=postprocess, keep_largest=keep_largest, fill_holes=fill_holes)
    volume = orient.to_canonical(sitk.GetArrayViewFromImage(image))  # (S, P, L) view
    Z, H, W = volume.shape
    slice_sp, row_sp, col_sp = orient.canonical_spacing(image.GetSpacing())
    target = target_spacing(spec, (row_sp, col_sp), fast)
    model_hw = resampled_shape((H, W), (row_sp, col_sp), target)
    check_model_slice(source, (H, W), (row_sp, col_sp), model_hw, target)
    normalize = make_normalizer(spec.normalization, volume)

    bg_index = background_index(classes)
    todo = np.arange(Z)
    if spec.skip_empty_slices:
        todo = np.array([z for z in range(Z) if float(volume[z].max()) >= AIR_HU], dtype=int)
    step = fast_slice_step(spec, slice_sp, target) if fast else 1
    run_z = predicted_slices(todo, step)
    interpolator = _SliceInterpolator(todo) if step > 1 else None

    predictor = SlicePredictor(loaded.networks, spec, dev, tta=tta, batch_size=batch_size, compile=compile)
    bs = predictor.resolve_batch_size(model_hw)
    per_slice = predictor.tiles_per_slice(model_hw)
    slices_per_batch = max(1, bs // per_slice)
    batches = [run_z[i:i + slices_per_batch] for i in range(0, len(run_z), slices_per_batch)]

    out_full, out, lut = _output_arrays(full, (lo, hi), classes)
    index = orient.to_canonical(out)  # (S, P, L) class indices, a view of `out`
    if bg_index != 0:
        index[...] = bg_index
    t_setup = time.perf_counter() - t_start
    probs = None
    if return_probabilities:
        probs = np.zeros((n_classes, Z, H, W), dtype=np.float16)
        probs[bg_index] = 1.0
    pin = dev.type == "cuda"
    resize_on_cpu = dev.type == "cpu"
    stop = threading.Event()
    prepared: queue.Queue = queue.Queue(maxsize=2)
    finished: queue.Queue = queue.Queue(maxsize=2)

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # CPU: the reader normalises and resamples. CUDA: it gathers raw voxels (int16 stays int16: half the bytes)
    # into pinned memory, and the GPU converts, normalises and resamples them.
    raw_dtype = volume.dtype if volume.dtype in (np.int16, np.uint8, np.float16, np.float32) else np.float32

    def reader():
        for zs in batches:
            if resize_on_cpu:
                x = torch.from_numpy(np.asarray(volume[zs], dtype=np.float32))[:, None]
                x = resize(normalize(x), model_hw)
            else:
                x = torch.from_numpy(np.asarray(volume[zs], dtype=raw_dtype))[:, None]
            if pin:
                x = x.pin_memory()
            if not put(prepared, (zs, x)):
                return
        put(prepared, None)

    def writer():
        while True:
            item = finished.get()
            if item is None:
                return
            zs, idx, p = item
            index[zs] = idx.cpu().numpy()
            if p is not None:
                probs[:, zs] = p.cpu().numpy().transpose(1, 0, 2, 3)

    read_t, write_t = _Worker(reader, "meddinov3-read"), _Worker(writer, "meddinov3-write")
    read_t.start()
    write_t.start()
    done = 0
    t_model = 0.0
    try:
        if progress is not None:
            progress.update(0, len(todo), stage="segmenting")
        while True:
            if _cancelled(cancel):
                raise Cancelled("segmentation cancelled")
            try:
                item = prepared.get(timeout=0.5)
            except queue.Empty:
                read_t.check()
                write_t.check()
                continue
            if item is None:
                break
            zs, x = item
            t0 = time.perf_counter()
            x = x.to(dev, non_blocking=True)
            if not resize_on_cpu:
                x = resize(normalize(x.float()), model_hw)
            p = predictor.predict(x)
            n = len(zs)
            if interpolator is not None:
                zs, p = interpolator.fill(zs, p)
            if resize_on_cpu:  # channels-last: the class argmax reads contiguous memory (~7x faster on CPU)
                p = p.contiguous(memory_format=torch.channels_last)
            for k in range(0, len(zs), n):  # at most one batch of full-size probabilities at a time
                pk = resize(p[k:k + n], (H, W))
                idx = pk.argmax(1).to(torch.uint8 if n_classes <= 256 else torch.int16)
                out_p = pk.half() if return_probabilities else None
                write_t.check()
                if not put(finished, (zs[k:k + n], idx, out_p)):
                    break
            t_model += time.perf_counter() - t0
            if stop.is_set():
                break
            done += len(zs)
            if progress is not None:
                progress.update(done, len(todo), stage="segmenting")
        put(finished, None)
        write_t.join()
        write_t.check()
    finally:
        stop.set()
        read_t.join(timeout=5)
        if write_t.is_alive():
            finished.put(None)
            write_t.join(timeout=5)
    read_t.check()

    t_finish = time.perf_counter()
    labels, prob_out, steps = _finish(full, out_full, out, lut, (lo, hi), orient, orient.from_canonical(probs)
                                      if probs is not None else None, spec, bg_index, (slice_sp, row_sp, col_sp),
                                      postprocess, keep_largest, fill_holes)
    stats = {"device": str(dev), "batch_size": predictor.batch_size, "slices": int(len(todo)),
             "predicted_slices": int(len(run_z)), "slice_step": step,
             "skipped_slices": int(Z - len(todo)), "model_shape": list(model_hw), "tiles_per_slice": per_slice,
             "spacing": list(target), "oom_backoffs": list(predictor.oom_events), "model_time_s": round(t_model, 3),
             "postprocessing": steps, "setup_s": round(t_setup, 3),
             "finish_s": round(time.perf_counter() - t_finish, 3), "seconds": round(time.perf_counter() - t_start, 3)}
    return SegmentationResult(labels, prob_out, classes, stats)


def check_model_slice(source, hw, spacing, model_hw, target) -> None:
    """InputError when a slice resampled to the model's spacing would be absurdly large (a wrong spacing)."""
    if max(model_hw) > MAX_MODEL_SLICE_SIDE:
        raise InputError(source, f"slices of {hw[0]}x{hw[1]} voxels at {spacing[0]:g} x {spacing[1]:g} mm would be "
                                 f"{model_hw[0]}x{model_hw[1]} pixels at the model's spacing {target[0]:g} x "
                                 f"{target[1]:g} mm (at most {MAX_MODEL_SLICE_SIDE} per side): wrong spacing?")


def background_index(classes) -> int:
    """Channel of label value 0 (the first channel when no class has value 0)."""
    return next((i for i, c in enumerate(classes) if c.value == 0), 0)


def _output_arrays(full: sitk.Image, box, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label array on `full`'s grid, its view on the ROI `box` ((x0, y0, z0), (x1, y1, z1)) or (None, None),
    class index -> label value table). The labels are written straight into it, in the input's own axis order,
    through views: no reorienting copy and, when label values are the class indices (the usual case), no lookup."""
    values = [c.value for c in classes]
    lut = np.array(values, dtype=np.uint8 if len(values) <= 256 and max(values) <= 255 else np.uint16)
    out_full = np.zeros(sitk.GetArrayViewFromImage(full).shape, dtype=lut.dtype)  # outside a ROI: background 0
    out = out_full
    if box[0] is not None:
        (x0, y0, z0), (x1, y1, z1) = box
        out = out_full[z0:z1, y0:y1, x0:x1]
    return out_full, out, lut


def _finish(full, out_full, out, lut, box, orient, probs, spec, bg_index, canonical_spacing, postprocess,
            keep_largest, fill_holes) -> tuple[sitk.Image, np.ndarray | None, list]:
    """Post-processing (on the canonical view), class index -> label value, ROI re-embedding.

    `out` (the ROI view of `out_full`) holds class indices; `probs` (classes, z, y, x) of the ROI in the input's
    axis order, or None. Returns the label image on `full`'s grid, the probabilities on it, the steps done."""
    index = orient.to_canonical(out)
    values = lut.tolist()
    steps = []
    if postprocess and spec.postprocessing:
        apply_postprocessing(index, spec.postprocessing, values, canonical_spacing, bg_index)
        steps += [dict(step) for step in spec.postprocessing]
    if keep_largest:
        keep_largest_component(index, bg_index)
        steps.append({"step": "keep_largest"})
    if fill_holes:
        _fill_holes(index, bg_index)
        steps.append({"step": "fill_holes"})
    if np.any(lut != np.arange(len(lut))):  # class index -> label value
        out[...] = lut[out]
    prob_out = np.ascontiguousarray(probs) if probs is not None else None
    if prob_out is not None and box[0] is not None:
        (x0, y0, z0), (x1, y1, z1) = box
        pc = np.zeros((len(lut),) + out_full.shape, dtype=np.float16)
        pc[bg_index] = 1.0
        pc[:, z0:z1, y0:y1, x0:x1] = prob_out
        prob_out = pc
    labels = sitk.GetImageFromArray(out_full)
    labels.CopyInformation(full)
    return labels, prob_out, steps


def _segment_stored(image, full, box, loaded, dev, classes, t_start, postprocess, keep_largest, fill_holes,
                    **options) -> SegmentationResult:
    """`segment_image` for models in nnU-Net's convention: `nnunet_mode.predict_stored`, then the common finish."""
    from .nnunet_mode import predict_stored

    out_full, out, lut = _output_arrays(full, box, classes)
    bg_index = background_index(classes)
    probs, stats = predict_stored(image, loaded.networks, loaded.spec, dev, out, bg_index=bg_index, **options)
    t_finish = time.perf_counter()
    orient = Orientation.of(image)
    labels, prob_out, steps = _finish(full, out_full, out, lut, box, orient, probs, loaded.spec, bg_index,
                                      orient.canonical_spacing(image.GetSpacing()), postprocess, keep_largest,
                                      fill_holes)
    stats.update(postprocessing=steps, finish_s=round(time.perf_counter() - t_finish, 3),
                 seconds=round(time.perf_counter() - t_start, 3))
    return SegmentationResult(labels, prob_out, classes, stats)


def segment_file(input_path: str | os.PathLike, output_path: str | os.PathLike, model, *,
                 probabilities_path: str | os.PathLike | None = None,
                 statistics_path: str | os.PathLike | None = None, uncertainty_path: str | os.PathLike | None = None,
                 overwrite: bool = False, progress=None, **options: Any) -> SegmentationResult:
    """Read, segment and write one input (file or DICOM folder). Nothing is written when anything fails.

    `output_path` `.dcm`: a DICOM SEG referencing the input series (a DICOM folder; `stats["dicom_seg_omitted"]`
    names the empty classes left out). Beside it, optionally: `probabilities_path` (.npz), `statistics_path`
    (.json/.csv per structure; `stats["structures"]`), `uncertainty_path` (normalised entropy in percent, uint8
    image; `stats["slice_confidence"]`). See `side_outputs.SideOutputs`.
    """
    from ..checkpoints import LoadedModel
    from ..volumes import read_image
    from .outputs import check_not_input, check_output, input_files, output_kind, write_labels
    from .side_outputs import SideOutputs

    if Path(output_path).exists():  # listing a DICOM series costs a folder scan: only when it could matter
        check_not_input(output_path, input_files([input_path]))
    check_output(output_path, overwrite)
    side = SideOutputs(probabilities_path, statistics_path, uncertainty_path)
    side.check(overwrite)
    dicom = None
    if output_kind(output_path) == "dicom-seg":
        from .dicom_seg import DicomSegOutput, model_version, read_source

        source = read_source(input_path)  # before the inference: a file input is refused here
        if not isinstance(model, LoadedModel):
            model = _load(model, resolve_device(options.get("device", "auto")), options.pop("folds", None))
        dicom = DicomSegOutput(source, model.spec.name, model_version(model.spec))
    n_classes = model.spec.config.num_classes if isinstance(model, LoadedModel) else 2
    image = read_image(input_path, n_classes, side.needs_probabilities)
    result = segment_image(image, model, progress=progress, return_probabilities=side.needs_probabilities,
                           source=input_path, **options)
    if progress is not None:
        progress.update(1, 1, stage="writing")
    side.analyse(image, result)
    # the side files are written before the label map replaces an older one: all files are new, or none
    write_labels(result.labels, output_path, result.classes, overwrite=overwrite, dicom_seg=dicom,
                 before_replace=lambda: side.write(result, overwrite, source=str(input_path)))
    if dicom is not None:
        result.stats["dicom_seg_omitted"] = list(dicom.omitted)
    return result
