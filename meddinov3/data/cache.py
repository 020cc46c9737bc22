"""The slice cache: training volumes preprocessed once, exactly as the inference engine prepares them.

Per case: reoriented to the canonical (S, P, L) axial array (`meddinov3.volumes.Orientation`), normalised with the
model's scheme (`engine.preprocess.make_normalizer`), resampled in-plane to the target spacing
(`engine.preprocess.resampled_shape` / `resize`: the engine's bilinear resize; labels by one-hot bilinear +
argmax). Stored as `<case>_image.npy` (float16, (S, H, W)), `<case>_label.npy` (uint8) and
`<case>_locs.npz` (up to 10,000 voxel positions per foreground class, for foreground oversampling), plus
`index.json`. Files are opened memory-mapped, so an epoch never re-reads NIfTI and memory stays flat.

The cache folder name is a hash of the inputs (file paths, sizes, modification times, labels, configured
spacing / normalisation): an unchanged dataset reuses it across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..files import atomic_dir
from ..engine.preprocess import make_normalizer, resampled_shape, resize, spline_resize
from ..volumes import Orientation
from .dataset import Case, Dataset, DatasetError, label_array, read_case

CACHE_VERSION = 1
LOCATIONS_PER_CLASS = 10_000
STAT_SAMPLES_PER_CASE = 100_000


def cache_key(ds: Dataset, spacing, normalization, modality: str, image_resampling: str = "linear") -> str:
    def stat(p: Path):
        s = p.stat()
        return [str(p.resolve()), s.st_size, int(s.st_mtime_ns)]

    payload = {"version": CACHE_VERSION, "labels": ds.labels, "modality": modality,
               "spacing": list(spacing) if spacing else None, "normalization": normalization,
               "cases": [[c.name, stat(c.image), stat(c.label)] for c in ds.cases]}
    if image_resampling != "linear":  # linear caches keep the keys they had before the option existed
        payload["image_resampling"] = image_resampling
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _canonical(case: Case, ds: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    image, label = read_case(case, ds.modality)
    lab = label_array(case, label, ds.label_values)
    orient = Orientation.of(image)
    vol = orient.to_canonical(sitk.GetArrayFromImage(image))  # a copy: the image is freed on return
    lab = orient.to_canonical(lab)
    _, row, col = orient.canonical_spacing(image.GetSpacing())
    return vol, lab, (row, col)


def dataset_statistics(ds: Dataset, seed: int = 0) -> dict:
    """Median in-plane spacing and foreground intensity statistics (nnU-Net's CTNormalization inputs)."""
    rng = np.random.default_rng(seed)
    spacings, samples = [], []
    for case in ds.cases:
        vol, lab, sp = _canonical(case, ds)
        spacings.append(sp)
        fg = np.asarray(vol)[np.asarray(lab) > 0]
        if fg.size > STAT_SAMPLES_PER_CASE:
            fg = rng.choice(fg, STAT_SAMPLES_PER_CASE, replace=False)
        samples.append(fg.astype(np.float64))
    fg = np.concatenate(samples) if samples else np.zeros(0)
    stats = {"median_spacing": [float(np.median([s[i] for s in spacings])) for i in (0, 1)],
             "foreground_voxels_sampled": int(fg.size)}
    if fg.size:
        stats.update(mean=float(fg.mean()), std=float(fg.std()), lower=float(np.percentile(fg, 0.5)),
                     upper=float(np.percentile(fg, 99.5)))
    return stats


def resolve_normalization(configured: dict | None, modality: str, stats: dict) -> dict:
    """The spec's normalisation: configured, or CTNormalization from the data (CT), or per-image z-score."""
    if configured:
        return dict(configured)
    if modality.upper() == "CT":
        if "mean" not in stats:
            raise ValueError("no foreground voxels in the training labels: cannot compute CT normalisation")
        return {"scheme": "ct", "lower": stats["lower"], "upper": stats["upper"], "mean": stats["mean"],
                "std": stats["std"]}
    return {"scheme": "zscore", "use_mask": False}


def resize_cubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """nnU-Net's image resampling of (B, C, H, W): `spline_resize` of order 3 per slice (skimage's `resize(order=3,
    mode="edge", anti_aliasing=False)`), float32."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    arr = x.numpy().reshape(-1, *x.shape[-2:])
    out = np.stack([spline_resize(a, size, order=3) for a in arr])
    return torch.from_numpy(out.reshape(*x.shape[:-2], *size).astype(np.float32))


def preprocess_case(vol: np.ndarray, lab: np.ndarray, spacing, target, normalization: dict, n_classes: int,
                    chunk: int = 16, image_resampling: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Canonical (S, H, W) volume + labels -> normalised float16 image and uint8 labels at `target` spacing.

    `image_resampling`: "linear" (the engine's bilinear `resize`) or "cubic" (nnU-Net's order-3 spline,
    `resize_cubic`); labels always one-hot bilinear + argmax."""
    resize_image = resize_cubic if image_resampling == "cubic" else resize
    S, H, W = vol.shape
    out_hw = resampled_shape((H, W), spacing, target)
    normalize = make_normalizer(normalization, vol)
    img_out = np.empty((S, *out_hw), np.float16)
    lab_out = np.empty((S, *out_hw), np.uint8)
    for z0 in range(0, S, chunk):
        x = torch.from_numpy(np.array(vol[z0:z0 + chunk], dtype=np.float32))[:, None]
        img_out[z0:z0 + chunk] = resize_image(normalize(x), out_hw)[:, 0].numpy().astype(np.float16)
        y = torch.from_numpy(np.ascontiguousarray(lab[z0:z0 + chunk])).long()
        if out_hw == (H, W):
            lab_out[z0:z0 + chunk] = y.numpy()
        else:
            onehot = F.one_hot(y, n_classes).permute(0, 3, 1, 2).float()
            lab_out[z0:z0 + chunk] = resize(onehot, out_hw).argmax(1).numpy().astype(np.uint8)
    return img_out, lab_out


def foreground_locations(lab: np.ndarray, n_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for c in range(1, n_classes):
        locs = np.argwhere(lab == c).astype(np.int32)
        if len(locs) > LOCATIONS_PER_CLASS:
            locs = locs[np.sort(rng.choice(len(locs), LOCATIONS_PER_CLASS, replace=False))]
        out[str(c)] = locs
    return out


@dataclass
class CachedCase:
    name: str
    image: np.ndarray  # memory-mapped float16 (S, H, W)
    label: np.ndarray  # memory-mapped uint8 (S, H, W)
    locations: dict[int, np.ndarray]  # class -> (N, 3) voxel positions (z, y, x)
    pad_value: float = 0.0  # the case's lowest normalised value (air): what patches are padded with


class SliceCache:
    """An opened cache: `cases` (memory-mapped), `spacing`, `normalization`, `statistics`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self.spacing = tuple(self.index["spacing"])
        self.normalization = self.index["normalization"]
        self.statistics = self.index["statistics"]
        self.cases = []
        for c in self.index["cases"]:
            locs = np.load(self.folder / c["locations"])
            self.cases.append(CachedCase(c["name"], np.load(self.folder / c["image"], mmap_mode="r"),
                                         np.load(self.folder / c["label"], mmap_mode="r"),
                                         {int(k): locs[k] for k in locs.files}, float(c.get("pad_value", 0.0))))

    @property
    def slice_shapes(self) -> list[tuple[int, int]]:
        return [tuple(c.image.shape[1:]) for c in self.cases]


def build_cache(ds: Dataset, root: str | os.PathLike, spacing=None, normalization: dict | None = None,
                seed: int = 0, log=None, image_resampling: str = "linear") -> Path:
    """Preprocess `ds` into `root/<key>/` unless an identical cache exists there; returns the folder."""
    root = Path(root)
    key = cache_key(ds, spacing, normalization, ds.modality, image_resampling)
    folder = root / key
    if (folder / "index.json").is_file():
        if log:
            log(f"reusing slice cache {folder}")
        return folder
    try:
        with atomic_dir(folder) as tmp:
            if log:
                log(f"preprocessing {len(ds.cases)} case(s) into {folder}")
            stats = dataset_statistics(ds, seed)
            target = tuple(float(s) for s in spacing) if spacing else tuple(stats["median_spacing"])
            try:
                norm = resolve_normalization(normalization, ds.modality, stats)
            except ValueError as e:
                raise DatasetError(f"{ds.source}: {e}") from None
            n_classes = len(ds.label_values)
            rng = np.random.default_rng(seed)
            entries = []
            for case in ds.cases:
                vol, lab, sp = _canonical(case, ds)
                img, seg = preprocess_case(vol, lab, sp, target, norm, n_classes, image_resampling=image_resampling)
                np.save(tmp / f"{case.name}_image.npy", img)
                np.save(tmp / f"{case.name}_label.npy", seg)
                np.savez(tmp / f"{case.name}_locs.npz", **foreground_locations(seg, n_classes, rng))
                entries.append({"name": case.name, "image": f"{case.name}_image.npy", "label": f"{case.name}_label.npy",
                                "locations": f"{case.name}_locs.npz", "shape": list(img.shape),
                                "pad_value": float(img.min()) if img.size else 0.0,
                                "source_spacing": list(sp), "source": str(case.image)})
            index = {"version": CACHE_VERSION, "key": key, "spacing": list(target), "normalization": norm,
                     "image_resampling": image_resampling,
                     "statistics": stats, "labels": ds.labels, "modality": ds.modality, "cases": entries}
            (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    except (FileExistsError, OSError):  # another process finished the same cache first
        if not (folder / "index.json").is_file():
            raise
    return folder
