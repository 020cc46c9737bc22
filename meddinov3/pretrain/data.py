"""Pretraining data: an index of axial CT slices, built once, read through memory maps.

Each volume is read once (any format ``meddinov3.volumes.read_image`` reads), reoriented to the canonical
(S, P, L) array and written as one ``int16`` HU shard ``<key>.npy``; ``index.npy`` lists the kept
(volume, slice) pairs (all-air slices are skipped). Millions of slices then cost one memory map per volume,
and the sampler is a pure function of (seed, step, rank): resuming needs only the step number.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import nnunet_folder_named_by
from ..files import atomic_path, write_json
from ..volumes import InputError, Orientation, dicom_series, image_suffix, read_image
from .crops import normalize_hu

AIR_HU = -900.0  # a slice whose every voxel is below this is air (outside the body)
NO_AIR_HU = -500  # a CT volume always holds some air (below this); a volume without any is not HU
SKIP_DIRS = {"labelsTr", "labelsTs", "labels", "segmentations", "masks"}


class PretrainDataError(Exception):
    """The data given to `pretrain --data` cannot be used (message names the path)."""


def collect_volumes(source: str | os.PathLike | list) -> list[Path]:
    """CT volumes from a folder (searched recursively: image files and DICOM series folders, label folders
    skipped), a text file (one path per line, ``#`` comments) or a JSON list (or ``{"volumes": [...]}``)."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        src = Path(source).expanduser()
        if not src.exists():
            raise PretrainDataError(f"{src}: no such file or folder")
        if src.is_dir():
            paths = _scan(src)
            if not paths:
                raise PretrainDataError(f"{src}: no CT volumes found (.nii/.nii.gz/.nrrd/.mha/.mhd or DICOM series)")
        elif nnunet_folder_named_by(src):
            return collect_volumes(src.parent)
        elif src.suffix.lower() == ".json":
            try:
                data = json.loads(src.read_text())
            except json.JSONDecodeError as e:
                raise PretrainDataError(f"{src}: not valid JSON ({e})") from None
            items = data.get("volumes", data.get("images")) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise PretrainDataError(f"{src}: expected a JSON list of paths or {{\"volumes\": [...]}}")
            paths = [(src.parent / str(p)).expanduser() if not Path(str(p)).is_absolute() else Path(str(p))
                     for p in items]
        elif image_suffix(src):
            paths = [src]
        else:
            try:
                lines = [ln.strip() for ln in src.read_text().splitlines()]
            except UnicodeDecodeError:
                raise PretrainDataError(f"{src}: neither a CT volume (.nii/.nii.gz/.nrrd/.mha/.mhd), a DICOM folder, "
                                        "nor a .txt/.json list of volumes") from None
            paths = [(src.parent / ln) if not Path(ln).is_absolute() else Path(ln)
                     for ln in lines if ln and not ln.startswith("#")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise PretrainDataError(f"{len(missing)} listed volume(s) do not exist, e.g. {missing[0]}")
    if not paths:
        raise PretrainDataError(f"{source}: lists no volumes")
    return paths


def _scan(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        root_p = Path(root)
        imgs = sorted(root_p / f for f in files if image_suffix(f) and not f.startswith("."))
        out += imgs
        if not imgs and any(not image_suffix(f) and not f.endswith((".json", ".txt", ".csv", ".md")) for f in files):
            if dicom_series(root_p):
                out.append(root_p)
                dirs[:] = []
    return out


def _volume_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


@dataclass
class VolumeEntry:
    path: str
    shard: str
    shape: tuple[int, int, int]
    kept: int


def build_slice_index(volumes: list[Path], folder: str | os.PathLike, log=print,
                      shards: str | os.PathLike | None = None) -> Path:
    """Write ``index.json`` + ``index.npy`` into ``folder``, over one int16 shard per volume in ``shards``
    (default: ``folder`` itself). A shard is keyed by the volume's path, size and mtime, so a shared ``shards``
    store is written once and reused by every later run and stage on the same volumes."""
    folder = Path(folder)
    store = Path(shards).expanduser().resolve() if shards is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    entries, pairs = [], []
    for vi, path in enumerate(volumes):
        key = _volume_key(path)
        shard = store / f"{key}.npy"
        keep_file = store / f"{key}.keep.npy"
        if not (shard.is_file() and keep_file.is_file()):
            try:
                image = read_image(path)
            except InputError as e:
                raise PretrainDataError(str(e)) from None
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise PretrainDataError(f"{path}: expected a 3D single-channel CT volume")
            import SimpleITK as sitk

            arr = Orientation.of(image).to_canonical(sitk.GetArrayViewFromImage(image))
            arr = np.ascontiguousarray(np.clip(np.rint(arr), -32768, 32767).astype(np.int16))
            keep = np.flatnonzero(arr.reshape(arr.shape[0], -1).max(axis=1) >= AIR_HU).astype(np.int32)
            if arr.size and int(arr.min()) > NO_AIR_HU:
                log(f"WARNING: {path}: does not look like CT in Hounsfield units (lowest value {int(arr.min())}, no "
                    "air); its values are used as HU (an MR or rescaled volume pretrains on meaningless intensities)")
            with atomic_path(shard, suffix=".npy") as tmp:
                np.save(tmp, arr)
            with atomic_path(keep_file, suffix=".npy") as tmp:
                np.save(tmp, keep)
            log(f"indexed {path}: {arr.shape[0]} slices, {len(keep)} kept (non-air)")
        keep = np.load(keep_file)
        shape = tuple(int(s) for s in np.load(shard, mmap_mode="r").shape)
        entries.append({"path": str(path), "shard": shard.name if store == folder else str(shard),
                        "shape": list(shape), "kept": int(len(keep))})
        pairs.append(np.stack([np.full(len(keep), vi, np.int32), keep], axis=1))
    index = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int32)
    if len(index) == 0:
        raise PretrainDataError("no usable (non-air) slices in the given volumes")
    with atomic_path(folder / "index.npy", suffix=".npy") as tmp:
        np.save(tmp, index)
    write_json(folder / "index.json", {"volumes": entries, "slices": int(len(index))})
    return folder


class SliceIndex:
    """Read-only view of an index folder: ``len()`` slices, ``slice(i)`` -> normalised (1, H, W) float32.
    Shards are named relative to the folder, or by absolute path when they live in a shared store."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        self.volumes = meta["volumes"]
        self.index = np.load(self.folder / "index.npy")
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(len(self.index))

    def _shard(self, vi: int) -> np.ndarray:
        if vi not in self._maps:
            self._maps[vi] = np.load(self.folder / self.volumes[vi]["shard"], mmap_mode="r")
        return self._maps[vi]

    def hu(self, i: int) -> np.ndarray:
        vi, s = self.index[i]
        return np.asarray(self._shard(int(vi))[int(s)])

    def slice(self, i: int) -> torch.Tensor:
        return torch.from_numpy(normalize_hu(self.hu(i)))[None]

    def missing_shards(self) -> list[str]:
        return [v["shard"] for v in self.volumes if not (self.folder / v["shard"]).is_file()]

    def summary(self) -> dict:
        return {"folder": str(self.folder), "volumes": len(self.volumes), "slices": len(self)}


class StepSampler:
    """Slice indices of one step on one rank: a seeded permutation per epoch over the global position
    ``(step * world + rank) * per_rank + j``, so every rank sees different slices and a resumed run continues
    exactly where the checkpoint's step left off (no sampler state to save beyond the step)."""

    def __init__(self, n: int, per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.per_rank, self.seed, self.rank, self.world = n, per_rank, seed, rank, world
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.per_rank
        out = []
        for p in range(start, start + self.per_rank):
            out.append(int(self._perm_for(p // self.n)[p % self.n]))
        return out

    def epoch(self, step: int) -> float:
        return step * self.world * self.per_rank / self.n


def crop_generator(seed: int, step: int, rank: int, j: int) -> torch.Generator:
    """The torch generator of the crops of sample ``j`` of ``step`` on ``rank`` (reproducible on resume)."""
    s = int(np.random.default_rng([seed, step, rank, j, 17]).integers(2 ** 62))
    return torch.Generator().manual_seed(s)
