"""Cheap dense-feature probe: closed-form ridge regression of frozen patch features onto foreground.

Probe data: a labelled dataset in any layout ``meddinov3 train --data`` reads (an nnU-Net v2 raw folder, a JSON or
CSV list: ``meddinov3.data.load_dataset``), named by ``pretrain --probe-data`` (config key ``probe_data``); without
one, the LiTS liver CT (``meddinov3.phantom.load_liver_ct``), the offline default. Slices are axial in the canonical
(S, P, L) orientation of the pretraining slices, read as HU like them. Foreground = every labelled class (liver +
tumour for the default), judged per patch (a patch is foreground when at least half its pixels are). Only slices
where the foreground covers at least a tenth of the slice take part (elsewhere hardly a patch is mostly foreground,
and a probe fitted on background alone reports Dice 0 whatever the features). Fit and score never share a case's
neighbouring slices: one case is split along its range of such slices (fit on the upper part, score on the lower
part, with a gap between them); several cases are split by case (fit on the first half, score on the rest, at most
``MAX_CASES`` read). Reports patch accuracy and foreground Dice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .crops import normalize_hu
from .data import PretrainDataError

LIVER = "LiTS liver CT (case 117)"
MAX_CASES = 8  # cases read from a --probe-data dataset: the probe is a cheap trend, not an evaluation


@dataclass
class ProbeSlices:
    """The labelled axial slices a probe fits on (the first `n_fit`) and scores on (the rest).

    images, labels: lists of (H, W) arrays (HU; int, > 0 = foreground), shapes may differ between cases.
    info: where they come from, as recorded in config.json (source, cases, slice counts).
    """

    images: list
    labels: list
    n_fit: int
    info: dict = field(default_factory=dict)


def _foreground_slices(label: np.ndarray, min_fraction: float) -> np.ndarray:
    """Indices of the slices of a (Z, H, W) label array whose foreground covers at least `min_fraction`."""
    return np.flatnonzero((label > 0).reshape(label.shape[0], -1).mean(axis=1) >= min_fraction)


def _spread(candidates: list, n: int) -> list:
    """At most `n` of `candidates`, evenly spaced over them (first and last included; all of them when n >= their
    number)."""
    if not candidates:
        return []
    return [candidates[i] for i in sorted(set(np.linspace(0, len(candidates) - 1, n).astype(int)))]


def _split_case(z: np.ndarray, gap: int) -> tuple[list, list]:
    """One case's foreground slice indices `z` as a first part (fit) and a last part (score), `gap` slices apart."""
    cut = len(z) // 2
    return list(z[:max(cut - gap // 2, 1)]), list(z[cut + gap - gap // 2:])


def select_slices(volumes: Iterable, n_cases: int, n_fit: int = 8, n_eval: int = 8, min_fraction: float = 0.1,
                  gap: int = 4) -> ProbeSlices:
    """Fit and score slices from `n_cases` canonical (image, label) pairs of (Z, H, W) arrays, see the module
    docstring. `volumes` may yield them one at a time: only the slices kept (at most `n_fit` or `n_eval` a case)
    stay in memory. Raises ValueError when the fit or the score part has no slice with enough foreground."""
    fit, ev, found = [], [], 0
    for c, (image, label) in enumerate(volumes):
        z = _foreground_slices(label, min_fraction)
        found += len(z)
        if n_cases == 1:
            fit_z, ev_z = _split_case(z, gap)
        else:
            fit_z, ev_z = (list(z), []) if c < (n_cases + 1) // 2 else ([], list(z))
        for part, part_z, n in ((fit, fit_z, n_fit), (ev, ev_z, n_eval)):
            part += [(np.array(image[k]), np.array(label[k])) for k in _spread(part_z, n)]  # copies, not views
    if not fit or not ev:
        raise ValueError(f"too few axial slices where the foreground covers at least {min_fraction:.0%} of the "
                         f"slice ({found} in {n_cases} case(s)) to fit and to score a probe")
    fit, ev = _spread(fit, n_fit), _spread(ev, n_eval)
    return ProbeSlices([im for im, _ in fit + ev], [lab for _, lab in fit + ev], len(fit),
                       {"fit_slices": len(fit), "eval_slices": len(ev)})


def liver_volumes() -> tuple[list, list]:
    """The offline default: the LiTS liver CT as one canonical (image, label) pair, and its name."""
    import SimpleITK as sitk

    from ..phantom import load_liver_ct
    from ..volumes import Orientation

    image, labels = load_liver_ct()
    canonical = Orientation.of(image).to_canonical
    return [(canonical(sitk.GetArrayFromImage(image)), canonical(sitk.GetArrayFromImage(labels)))], ["liver117"]


def dataset_volumes(source: str, log=None) -> tuple[Iterator, list]:
    """Canonical (image, label) pairs of up to MAX_CASES cases (evenly spread) of the labelled dataset `source`,
    read one at a time as they are iterated, and the cases' names. Raises PretrainDataError naming `source` when
    it cannot be used (also while iterating)."""
    from ..data import DatasetError, load_dataset

    try:
        ds = load_dataset(source)
    except DatasetError as e:
        raise PretrainDataError(f"--probe-data {source}: {e}") from None
    if ds.modality != "CT" and log is not None:
        log(f"WARNING: --probe-data {source} is {ds.modality}: its values are read as HU, like the pretraining "
            "slices")
    cases = _spread(ds.cases, MAX_CASES)
    return _read_cases(source, ds, cases), [c.name for c in cases]


def _read_cases(source: str, ds, cases: list) -> Iterator:
    """Each case's canonical (image, label) arrays, read when asked for (one volume in memory at a time)."""
    import SimpleITK as sitk

    from ..data import DatasetError
    from ..data.dataset import label_array, read_case
    from ..volumes import Orientation

    for case in cases:
        try:
            image, label = read_case(case, ds.modality)
            labels = label_array(case, label, ds.label_values)
        except DatasetError as e:
            raise PretrainDataError(f"--probe-data {source}: {e}") from None
        canonical = Orientation.of(image).to_canonical
        yield canonical(sitk.GetArrayFromImage(image)), canonical(labels)


def probe_slices(source: str | None = None, log=None, **selection) -> ProbeSlices:
    """The probe's slices from the labelled dataset `source`, or from the offline liver CT when None.

    `selection`: ``select_slices`` options. Raises PretrainDataError naming `source` when a named dataset cannot
    be used; the default's own errors (FileNotFoundError when its package is missing...) pass through.
    """
    volumes, names = liver_volumes() if source is None else dataset_volumes(source, log)
    try:
        chosen = select_slices(volumes, len(names), **selection)
    except ValueError as e:
        if source is None:
            raise
        raise PretrainDataError(f"--probe-data {source}: {e}") from None
    chosen.info = {"source": LIVER if source is None else str(source), "cases": names, **chosen.info}
    return chosen


def run_probe_slices(source: str | None, log) -> ProbeSlices | None:
    """``probe_slices`` for a pretraining run: None, with a log line, when the offline default is not available
    (a probe is optional); a named dataset that cannot be used is the user's to fix (PretrainDataError)."""
    try:
        return probe_slices(source, log)
    except (FileNotFoundError, ImportError, ValueError) as e:
        if source is not None:
            raise
        log(f"dense probe disabled: {e}")
        return None


class DenseProbe:
    """A ridge probe of a backbone's patch features: ``DenseProbe.from_slices(probe_slices(...), size)(backbone)``.

    Why: pretraining's losses say little about whether the features separate anatomy; a closed-form linear probe on
    frozen features does, in about a second, so the run can record it every ``probe_every`` steps.
    """

    def __init__(self, images, labels, fit_idx, eval_idx, size: int = 64, ridge: float = 1e-4,
                 info: dict | None = None) -> None:
        """images: (N, H, W) HU, or a list of N (H, W) slices of any sizes; labels alike, int (> 0 = foreground).
        Each slice is resized to (size, size)."""
        self.x = torch.cat([self._resized(normalize_hu(np.asarray(im, np.float32)), size, "image") for im in images])
        self.fg = torch.cat([self._resized((np.asarray(lab) > 0).astype(np.float32), size, "area") for lab in labels])
        self.fit_idx, self.eval_idx, self.size, self.ridge = list(fit_idx), list(eval_idx), size, ridge
        self.info = dict(info or {})

    @staticmethod
    def _resized(plane: np.ndarray, size: int, mode: str) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(plane))[None, None]
        if mode == "area":
            return F.interpolate(x, size=(size, size), mode="area")
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    @classmethod
    def from_slices(cls, slices: ProbeSlices, size: int = 128) -> "DenseProbe":
        n = len(slices.images)
        return cls(slices.images, slices.labels, range(slices.n_fit), range(slices.n_fit, n), size,
                   info={**slices.info, "size": size})

    @classmethod
    def liver(cls, size: int = 128, **selection) -> "DenseProbe":
        """The probe on the offline default, the LiTS liver CT."""
        return cls.from_slices(probe_slices(None, **selection), size)

    @torch.no_grad()
    def features(self, backbone, device) -> tuple[torch.Tensor, torch.Tensor]:
        was = backbone.training
        backbone.eval()
        try:
            out = backbone.forward_features(self.x.to(device).expand(-1, 3, -1, -1))["patch"].float().cpu()
        finally:
            backbone.train(was)
        p = backbone.config.patch_size
        target = F.avg_pool2d(self.fg, p).flatten(1)  # (N, h*w) foreground fraction per patch
        return out, target

    def __call__(self, backbone, device="cpu") -> dict:
        """Fit the probe on the fit slices' patch features of `backbone` (a ``DINOv3Backbone``: ``forward_features``
        returning "patch" (N, h*w, C), ``config.patch_size``), score it on the others.

        Returns {"probe_dice": foreground Dice of the scored patches, "probe_accuracy": their accuracy,
        "probe_patches": how many were scored}. The backbone's train/eval mode is left as it was.
        """
        feats, target = self.features(backbone, device)
        feats = F.normalize(feats, dim=-1)
        fit_x = feats[self.fit_idx].reshape(-1, feats.shape[-1]).double()
        fit_y = (target[self.fit_idx].reshape(-1) >= 0.5).double()
        xb = torch.cat([fit_x, torch.ones(len(fit_x), 1, dtype=fit_x.dtype)], dim=1)
        a = xb.T @ xb + self.ridge * len(xb) * torch.eye(xb.shape[1], dtype=xb.dtype)
        w = torch.linalg.solve(a, xb.T @ (2 * fit_y - 1))
        ev_x = feats[self.eval_idx].reshape(-1, feats.shape[-1]).double()
        ev_y = target[self.eval_idx].reshape(-1) >= 0.5
        pred = (torch.cat([ev_x, torch.ones(len(ev_x), 1, dtype=ev_x.dtype)], dim=1) @ w) > 0
        inter = float((pred & ev_y).sum())
        denom = float(pred.sum() + ev_y.sum())
        return {"probe_dice": 2 * inter / denom if denom else 1.0,
                "probe_accuracy": float((pred == ev_y).double().mean()),
                "probe_patches": int(len(ev_y))}
