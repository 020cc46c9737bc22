"""Volume -> label map: `segment_image` (arrays and images) and `segment_file` (files and DICOM folders).

`segment_image` reads as its stages (`engine.stages`): check the inputs and prepare the model, crop to the ROI,
plan the slicing, stream the slices through the model, finish (post-processing, label values, ROI re-embedding).
Models in nnU-Net's convention replace plan + stream by `nnunet_mode.predict_stored`; the finish is common. Every
user option arrives as one `SegmentOptions` (`meddinov3.options`), shared with the command line and the Slicer
Logic.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..checkpoints import LoadedModel, load_model
from ..checkpoints.package import default_classes
from ..options import SegmentOptions
from ..volumes import InputError, Orientation, check_orientation_code, crop_box, validate_image
from .nnunet_mode import predict_stored
from .stages import Cancelled, LabelOutput, SliceStream, background_probabilities, plan_slices

__all__ = ["Cancelled", "SegmentOptions", "SegmentationResult", "as_image", "cpu_threads", "resolve_device",
           "segment_file", "segment_image"]


@dataclass
class SegmentationResult:
    """What `segment_image` / `segment_file` return: the label map on the input's grid and what came with it."""

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
    """The torch.device of "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps"; a torch.device as
    is. ValueError, naming the value, for a device this machine does not have (checked before any work)."""
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


def segment_image(image: sitk.Image | np.ndarray, model, options: SegmentOptions | None = None, *, progress=None,
                  cancel=None, return_probabilities: bool = False, source: str | os.PathLike = "<image>",
                  spacing=None, origin=None, direction=None, **option_fields) -> SegmentationResult:
    """Segment a 3D image.

    Args:
        image: a SimpleITK image, or a numpy array (z, y, x) placed by `spacing` (required), `origin`, `direction`
            (SimpleITK order x, y, z).
        model: a reference (path, hf:, name) or a `LoadedModel` (reused across calls: nothing is reloaded).
        options: `SegmentOptions` (device, fast, tta, folds, batch_size, roi, post-processing, ...); keyword
            arguments named like its fields (`device="cpu"`, `roi=(...)`) override single fields.
        progress: object with `update(done, total, stage=...)`, called per batch.
        cancel: callable returning True, or a threading.Event; checked between batches (-> `Cancelled`).
        return_probabilities: also return the model's class probabilities, before any post-processing
            (`stats["postprocessing"]` lists the steps the labels had).
        source: names the image in error messages.

    Returns a `SegmentationResult`: `labels`, a SimpleITK image on exactly the input's grid (`label_array`: its
    voxels (z, y, x)); `probabilities`, float16 (classes, z, y, x) or None; `classes` (ClassInfo, channel order);
    `stats` (device, batch size, slices, timings, OOM back-offs, post-processing).

    With `options.fast`, the model's fast in-plane spacing, and only every n-th slice through the network (n from
    `fast_slice_step`; the slices between are interpolated). With `options.roi`, only that voxel box is segmented,
    the rest is background. Models in nnU-Net's convention (`spec.slicing == "stored"`: nnU-Net result folders and
    their conversions) predict as nnUNetv2_predict does (`engine.nnunet_mode`). Raises InputError for an image the
    model cannot take, ValueError for bad options, CheckpointError for a model that cannot be loaded.
    """
    t_start = time.perf_counter()
    options = SegmentOptions.merged(options, **option_fields)
    image = as_image(image, spacing, origin, direction)
    device = resolve_device(options.device)
    loaded, classes, options = _prepare_model(model, image, device, options, source, return_probabilities)
    region, box = _crop(image, options.roi, source)
    output = LabelOutput.allocate(image, box, classes)
    orient = Orientation.of(region)
    if loaded.spec.slicing == "stored":
        probs, stats = predict_stored(region, loaded.networks, loaded.spec, device, output.roi, options,
                                      bg_index=output.bg_index, return_probabilities=return_probabilities,
                                      progress=progress, cancel=cancel, source=source)
    else:
        probs, stats = _predict_canonical(region, loaded, device, options, output, return_probabilities, progress,
                                          cancel, source, t_start)
    t_finish = time.perf_counter()
    labels, probs, steps = output.finish(orient, probs, loaded.spec, orient.canonical_spacing(region.GetSpacing()),
                                         options)
    stats.update(postprocessing=steps, finish_s=round(time.perf_counter() - t_finish, 3),
                 seconds=round(time.perf_counter() - t_start, 3))
    return SegmentationResult(labels, probs, classes, stats)


def _prepare_model(model, image: sitk.Image, device: torch.device, options: SegmentOptions, source,
                   return_probabilities: bool) -> tuple[LoadedModel, list, SegmentOptions]:
    """(the model on `device` with `options.folds`, its classes (channel order), the options with the training
    orientation's code normalised), checked against the image before any work; the networks set to
    `options.reference_precision` (on every call: a `LoadedModel`'s networks are reused)."""
    loaded = load_model(model, device=device, folds=options.folds)
    spec = loaded.spec
    n_classes = spec.config.num_classes
    classes = list(spec.classes) if len(spec.classes) == n_classes else default_classes(n_classes)
    validate_image(image, source, spec.modality, n_classes, return_probabilities)
    if device.type == "cpu" and options.fast:
        torch.set_num_threads(cpu_threads())
    if options.training_orientation is not None:
        options = options.replace(training_orientation=check_orientation_code(options.training_orientation))
        if spec.slicing != "stored":
            raise ValueError(f"training_orientation is for models in nnU-Net's convention (nnU-Net result folders and "
                             f"their conversions); {spec.name} slices the engine's canonical view")
    for net in loaded.networks:
        if hasattr(net, "backbone"):
            net.backbone.set_reference_precision(options.reference_precision)
    return loaded, classes, options


def _crop(image: sitk.Image, roi, source) -> tuple[sitk.Image, tuple]:
    """(the ROI's image, its box ((x0, y0, z0), (x1, y1, z1)) clipped to the image), or (image, (None, None))."""
    if roi is None:
        return image, (None, None)
    try:
        region, lo, hi = crop_box(image, roi)
    except ValueError as e:
        raise InputError(source, str(e)) from None
    return region, (lo, hi)


def _predict_canonical(region: sitk.Image, loaded: LoadedModel, device: torch.device, options: SegmentOptions,
                       output: LabelOutput, return_probabilities: bool, progress, cancel, source,
                       t_start: float) -> tuple[np.ndarray | None, dict]:
    """Plan and stream the engine's canonical slicing into `output`; returns (probabilities (classes, z, y, x) of
    the ROI in the input's axis order, or None; stats)."""
    plan = plan_slices(region, loaded.networks, loaded.spec, device, options, source)
    index = plan.orient.to_canonical(output.roi)  # (S, P, L) class indices, a view of the label map
    if output.bg_index != 0:
        index[...] = output.bg_index
    t_setup = time.perf_counter() - t_start
    probs = None
    if return_probabilities:
        probs = background_probabilities(len(output.lut), plan.shape, output.bg_index)
    model_time = SliceStream(plan, device, index, probs).run(progress, cancel)
    stats = {"device": str(device), **plan.stats(), "oom_backoffs": list(plan.predictor.oom_events),
             "model_time_s": round(model_time, 3), "setup_s": round(t_setup, 3)}
    return (plan.orient.from_canonical(probs) if probs is not None else None), stats


def segment_file(input_path: str | os.PathLike, output_path: str | os.PathLike, model,
                 options: SegmentOptions | None = None, *, probabilities_path: str | os.PathLike | None = None,
                 statistics_path: str | os.PathLike | None = None, uncertainty_path: str | os.PathLike | None = None,
                 overwrite: bool = False, progress=None, **option_fields) -> SegmentationResult:
    """Read, segment and write one input (file or DICOM folder). Nothing is written when anything fails.

    Args:
        input_path: image file (.nii/.nii.gz/.nrrd/.mha/.mhd) or DICOM series folder.
        output_path: label map (.nii.gz/.nrrd), .seg.nrrd, or `.dcm`: a DICOM SEG referencing the input series (a
            DICOM folder; `stats["dicom_seg_omitted"]` names the empty classes left out).
        model, options, option_fields, progress: as `segment_image`'s.
        probabilities_path: also write the probabilities (.npz); `statistics_path`: per-structure statistics
            (.json/.csv; `stats["structures"]`); `uncertainty_path`: normalised entropy in percent (uint8 image;
            `stats["slice_confidence"]`). See `side_outputs.SideOutputs`.
        overwrite: replace existing outputs (otherwise FileExistsError before any work).

    Returns `segment_image`'s `SegmentationResult`.
    """
    from ..volumes import read_image
    from .outputs import check_not_input, check_output, input_files, output_kind, write_labels
    from .side_outputs import SideOutputs

    options = SegmentOptions.merged(options, **option_fields)
    if Path(output_path).exists():  # listing a DICOM series costs a folder scan: only when it could matter
        check_not_input(output_path, input_files([input_path]))
    check_output(output_path, overwrite)
    side = SideOutputs(probabilities_path, statistics_path, uncertainty_path)
    side.check(overwrite)
    dicom = None
    if output_kind(output_path) == "dicom-seg":
        from .dicom_seg import read_source

        dicom = read_source(input_path)  # before the inference: a file input is refused here
    # loaded before the image is read: reading sizes its memory by the model's number of classes
    model = load_model(model, device=resolve_device(options.device), folds=options.folds)
    if dicom is not None:
        from .dicom_seg import DicomSegOutput, model_version

        dicom = DicomSegOutput(dicom, model.spec.name, model_version(model.spec))
    image = read_image(input_path, model.spec.config.num_classes, side.needs_probabilities)
    result = segment_image(image, model, options, progress=progress, return_probabilities=side.needs_probabilities,
                           source=input_path)
    if progress is not None:
        progress.update(1, 1, stage="writing")
    side.analyse(image, result)
    # the side files are written before the label map replaces an older one: all files are new, or none
    write_labels(result.labels, output_path, result.classes, overwrite=overwrite, dicom_seg=dicom,
                 before_replace=lambda: side.write(result, overwrite, source=str(input_path)))
    if dicom is not None:
        result.stats["dicom_seg_omitted"] = list(dicom.omitted)
    return result
