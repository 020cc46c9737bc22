"""`complete_image`: a few painted slices -> the whole structure, on the image's exact grid.

Per run: the shape prior (signed distances interpolated between painted slices, structure by structure), per-voxel
inputs (3D image features, the prior, the distance to the nearest painted slice, and with a model its backbone's
features and, for a model package, its decoder's class probabilities) on the painted region's box, a small head
fitted on the painted slices within the time budget, its probabilities on the unpainted slices, each label kept to
its own painted slice range (unless `extrapolate`), painted slices copied voxel for voxel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..checkpoints import CheckpointError, safe_torch_load
from ..checkpoints.package import ClassInfo
from ..volumes import Orientation, array_to_image, validate_image
from .head import CompletionHead, fit_head, predict
from .image import image_features
from .prior import ShapePrior
from .sparse import PaintedSlices, label_array, painted_slices

MARGIN_MM = 20.0  # the head runs on the painted region's in-plane box grown by this much
DEFAULT_TIME_BUDGET_S = 20.0
MAX_STEPS = 600
PRIOR_SCALE_MM = 5.0  # prior input = tanh(signed distance / 5 mm)
WARM_BUDGET_FRACTION = 0.5  # a repeat on the same volume and labels starts from the last head: half the budget


def _warm_start(head: CompletionHead, path) -> bool:
    """Load the head fitted by the last run on this volume with these labels (after corrections, Complete again):
    True when it was there and fits."""
    try:
        head.load_state_dict(safe_torch_load(path))
        return True
    except (OSError, RuntimeError, ValueError, EOFError, CheckpointError):
        return False


@dataclass
class CompletionResult:
    labels: sitk.Image  # on exactly the input's grid
    classes: list  # ClassInfo: background and every label value, names/colours as given
    least_confident: dict | None  # {"slice": canonical index, "point": LPS mm of the slice's centre}; None: nothing filled
    stats: dict = field(default_factory=dict)


class SliceInputs:
    """Per-voxel inputs of one canonical slice on the box: image features, the prior per label (tanh of the signed
    distance / 5 mm), and optionally backbone features (token maps upsampled to the slice) and a model package's
    class probabilities (`decoder`: (classes, S, P, L) uint8, x 255)."""

    def __init__(self, volume, labels, painted: PaintedSlices, prior: ShapePrior, box, spacing, device,
                 features=None, decoder=None):
        (r0, r1), (c0, c1) = box
        self.prior, self.box, self.features, self.full = prior, box, features, volume.shape[1:]
        self.decoder, self.device = decoder, device
        self.image = image_features(np.asarray(volume[:, r0:r1, c0:c1]), np.asarray(labels[:, r0:r1, c0:c1]),
                                    painted.slices, spacing, device)

    @property
    def prior_columns(self) -> slice:
        """Where the prior's channels are (the head adds them to its logits)."""
        return slice(len(self.image), len(self.image) + len(self.prior.values))

    @property
    def distance_column(self) -> int:
        """Where the slice's distance (cm: an input of order 1) to its nearest painted slice is."""
        return len(self.image) + len(self.prior.values)

    @property
    def channels(self) -> int:
        extra = 0 if self.features is None else self.features.shape[1]
        extra += 0 if self.decoder is None else len(self.decoder)
        return len(self.image) + len(self.prior.values) + 1 + extra

    def __call__(self, z: int, exclude: int | None = None) -> torch.Tensor:
        """(rows * columns of the box, channels) float32, on the run's device."""
        (r0, r1), (c0, c1) = self.box
        dev = self.device
        prior = np.tanh(self.prior.at(z, exclude)[:, r0:r1, c0:c1] / PRIOR_SCALE_MM).astype(np.float32)
        distance = self.prior.distance(z, exclude) / 10  # cm
        chans = [self.image[:, z].float(), torch.from_numpy(prior).to(dev),
                 torch.full((1, r1 - r0, c1 - c0), distance, device=dev)]
        if self.features is not None:
            f = torch.from_numpy(self.features[z].astype(np.float32))[None].to(dev)
            chans.append(F.interpolate(f, size=self.full, mode="bilinear", align_corners=False)[0, :, r0:r1, c0:c1])
        if self.decoder is not None:
            chans.append(torch.from_numpy(np.asarray(self.decoder[:, z, r0:r1, c0:c1], np.float32) / 255).to(dev))
        x = torch.cat(chans)
        return x.reshape(len(x), -1).T


def _box(labels: np.ndarray, slices, spacing, whole: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """In-plane (rows, columns) box of everything painted, grown by MARGIN_MM; the whole plane when `whole`."""
    H, W = labels.shape[1:]
    if whole:
        return (0, H), (0, W)
    fg = (labels[slices] != 0).any(axis=0)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    mr, mc = (int(np.ceil(MARGIN_MM / s)) for s in spacing[1:])
    return (max(0, rows[0] - mr), min(H, rows[-1] + 1 + mr)), (max(0, cols[0] - mc), min(W, cols[-1] + 1 + mc))


def _classes(values: list[int], given: list | None) -> list:
    """Background + every painted value, with the given names/colours (all given classes kept)."""
    by_value = {c.value: c for c in (given or [])}
    by_value.setdefault(0, ClassInfo(0, "background"))
    for v in values:
        by_value.setdefault(v, ClassInfo(v, f"label_{v}"))
    return [by_value[v] for v in sorted(by_value)]


def _allowed(painted: PaintedSlices, zs, extrapolate: bool) -> torch.Tensor:
    """(slices, classes) mask: background always, a label only between its first and last painted slice."""
    allowed = torch.ones(len(zs), 1 + len(painted.values), dtype=torch.bool)
    if not extrapolate:
        for c, v in enumerate(painted.values, start=1):
            lo, hi = painted.ranges[v]
            allowed[:, c] = torch.tensor([lo <= z <= hi for z in zs])
    return allowed


def complete_image(image: sitk.Image, sparse: sitk.Image, model: str | os.PathLike | None = None,
                   device: str | torch.device = "auto", time_budget_s: float = DEFAULT_TIME_BUDGET_S,
                   extrapolate: bool = False, classes: list | None = None, progress=None, cancel=None,
                   use_cache: bool = True, max_steps: int = MAX_STEPS, seed: int = 0, source: str = "<image>",
                   labels_source: str = "<labels>") -> CompletionResult:
    """Complete the structures painted on a few slices of `image` (SimpleITK images, same grid).

    `sparse`: label map; a slice (along S-I, as the engine slices) with any non-zero voxel is painted and all its
    voxels are truth. `model`: "scratch", a backbone (its features are used), a model package (its backbone's
    features and its decoder's class probabilities: where a painted structure is one of its classes the head starts
    from the model's answer; `stats["decoder_classes"]`), or None: the official backbone when on this machine, else
    scratch (`stats["model"]` says which).
    `time_budget_s`: the head's training time (half of it when a head fitted on this volume with the same labels is
    in the cache, `use_cache`: it continues from there). `classes`: ClassInfo names/colours to keep (e.g. a .seg.nrrd's).
    `cancel`: callable returning True to stop (-> engine.Cancelled). Raises InputError on bad input.
    The result's labels: painted slices as given, unpainted slices completed, each label only within its own
    first..last painted slice unless `extrapolate`.
    """
    from ..engine import resolve_device
    from .features import cache_dir, cache_key, choose_model, volume_key

    t0 = time.perf_counter()
    model_ref, model_note = choose_model(model)
    validate_image(image, source, modality=None)
    lab = label_array(sparse, image, labels_source)
    orient = Orientation.of(image)
    vol_c = orient.to_canonical(sitk.GetArrayViewFromImage(image))
    lab_c = orient.to_canonical(lab)
    spacing = orient.canonical_spacing(image.GetSpacing())
    painted = painted_slices(lab_c, extrapolate, labels_source)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    volume_hash = volume_key(np.asarray(vol_c)) if use_cache else ""
    features, decoder, model_stats = _model_inputs(image, orient, vol_c, spacing, model_ref, dev, volume_hash,
                                                   progress, use_cache)
    prior = ShapePrior(lab_c, painted.slices, painted.values, spacing)
    box = _box(lab_c, painted.slices, spacing, whole=extrapolate)
    inputs = SliceInputs(vol_c, lab_c, painted, prior, box, spacing, dev, features, decoder)
    head_path = cache_dir() / f"head-{cache_key(volume_hash, model_note, str(painted.values), str(inputs.channels))}.pt"
    head, fit = _fit_head(inputs, lab_c, painted, dev, head_path if use_cache else None, time_budget_s, max_steps,
                          cancel, progress, seed)

    out = np.zeros(lab.shape, dtype=lab.dtype)
    out_c = orient.to_canonical(out)  # a view: writing it writes `out`
    out_c[painted.slices] = lab_c[painted.slices]
    todo, doubt = _fill_unpainted(out_c, head, inputs, painted, extrapolate, dev)
    least = None
    if todo:
        z = todo[int(doubt.argmax())]
        least = {"slice": int(z), "point": _slice_centre(image, orient, z, lab_c.shape)}
    stats = {"model": model_note, "device": str(dev), "painted_slices": [int(s) for s in painted.slices],
             "completed_slices": len(todo), "box": [list(map(int, b)) for b in box], "fit": fit, **model_stats,
             "seconds": round(time.perf_counter() - t0, 2)}
    return CompletionResult(array_to_image(out, image), _classes(painted.values, classes), least, stats)


def _model_inputs(image, orient: Orientation, vol_c, spacing, model_ref: str | None, dev, volume_hash: str, progress,
                  use_cache: bool) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """(backbone features, decoder probabilities, stats) of `model_ref` on the volume; Nones without a model."""
    from .features import cached_features, decoder_probabilities

    if model_ref is None:
        return None, None, {"features_cached": False, "decoder_classes": [], "decoder_cached": False}
    features, features_cached = cached_features(np.asarray(vol_c), spacing, model_ref, dev, progress, use_cache,
                                                volume_hash=volume_hash)
    decoder, names, decoder_cached = decoder_probabilities(image, orient.to_canonical, model_ref, dev, volume_hash,
                                                           progress, use_cache)
    return features, decoder, {"features_cached": features_cached, "decoder_classes": names,
                               "decoder_cached": decoder_cached}


def _fit_head(inputs: SliceInputs, lab_c, painted: PaintedSlices, dev, head_path, time_budget_s: float,
              max_steps: int, cancel, progress, seed: int) -> tuple[CompletionHead, dict]:
    """The head fitted leave-one-out on the painted slices; continued from `head_path` (the last run's head on this
    volume and labels, with half the budget) when it is there, and saved there; `head_path` None: no cache."""
    from ..files import atomic_path

    (r0, r1), (c0, c1) = inputs.box
    prior = inputs.prior
    train_x = torch.cat([inputs(int(z), exclude=int(z)) for z in painted.slices]).to(dev)
    to_index = np.zeros(int(max(painted.values)) + 1, dtype=np.int64)
    to_index[painted.values] = np.arange(1, len(painted.values) + 1)
    train_y = torch.from_numpy(to_index[lab_c[painted.slices, r0:r1, c0:c1]].ravel()).to(dev)
    reference_cm = float(np.median([prior.distance(int(z), exclude=int(z)) for z in painted.slices])) / 10
    head = CompletionHead(inputs.channels, 1 + len(painted.values), inputs.prior_columns, inputs.distance_column,
                          reference_cm).to(dev)
    warm = head_path is not None and _warm_start(head, head_path)
    budget = time_budget_s * (WARM_BUDGET_FRACTION if warm else 1.0)
    fit = fit_head(head, train_x, train_y, budget, max_steps, cancel=cancel, progress=progress, seed=seed)
    fit["warm_start"] = warm
    if head_path is not None:
        with atomic_path(head_path, suffix=".pt") as tmp:
            torch.save(head.state_dict(), tmp)
    return head, fit


def _fill_unpainted(out_c: np.ndarray, head: CompletionHead, inputs: SliceInputs, painted: PaintedSlices,
                    extrapolate: bool, dev) -> tuple[list[int], torch.Tensor]:
    """Write the head's labels into the unpainted slices of `out_c` (canonical, painted slices already there), one
    slice at a time (probabilities never exist for the whole volume). Returns (those slices, per slice the number
    of voxels the head is unsure about)."""
    (r0, r1), (c0, c1) = inputs.box
    z_lo = 0 if extrapolate else min(r[0] for r in painted.ranges.values())
    z_hi = len(out_c) - 1 if extrapolate else max(r[1] for r in painted.ranges.values())
    done = set(painted.slices.tolist())
    todo = [z for z in range(z_lo, z_hi + 1) if z not in done]
    allowed = _allowed(painted, todo, extrapolate)
    values = torch.tensor([0] + painted.values)
    doubt = torch.zeros(len(todo))
    for i, z in enumerate(todo):
        probs = predict(head, inputs(z).to(dev)).cpu().T.reshape(-1, r1 - r0, c1 - c0) * allowed[i, :, None, None]
        best = probs.max(0)
        out_c[z, r0:r1, c0:c1] = values[best.indices].numpy().astype(out_c.dtype)
        doubt[i] = (1 - best.values).sum()
    return todo, doubt


def _slice_centre(image: sitk.Image, orient: Orientation, z: int, shape) -> list[float]:
    """LPS point (mm) at the centre of canonical slice `z`: where a viewer jumps to show that slice."""
    canonical = (z, shape[1] // 2, shape[2] // 2)
    index = [0, 0, 0]
    for n, c in enumerate(canonical):  # canonical axis n is patient axis 2 - n, held by sitk axis perm[2 - n]
        axis = orient.perm[2 - n]
        index[axis] = image.GetSize()[axis] - 1 - c if orient.flip[2 - n] else c
    return [float(v) for v in image.TransformIndexToPhysicalPoint([int(v) for v in index])]
