"""What a model contributes, computed once per volume and cached on disk.

- Backbone features: multi-scale patch tokens (the model's feature blocks, concatenated) of each canonical slice,
  reduced by PCA to a few channels and kept at token resolution as float16 (a 512x512x300 CT at 16 px patches:
  ~20 MB).
- A model package's decoder: its own segmentation of the volume, as class probabilities (uint8, memory-mapped): the
  head's starting point wherever a painted structure is one of the model's classes (the fit learns which).

A repeat run on the same volume (after corrections) skips the network entirely.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path, read_json_or, write_json
from ..resources import user_dir

OFFICIAL_BACKBONE = "meddinov3-vitb16-ct3m"
FEATURE_CHANNELS = 16


def choose_model(model: str | os.PathLike | None) -> tuple[str | None, str]:
    """(backbone reference or None for scratch, a sentence saying which was chosen and why).

    `None`: the official backbone when it is on this machine (no download), else scratch."""
    if model not in (None, "", "auto"):
        if str(model) == "scratch":
            return None, "model: scratch (a small network fitted on the painted slices, no backbone)"
        return str(model), f"model: backbone of {model}"
    from ..checkpoints import CheckpointError
    from ..checkpoints.loader import resolve

    try:
        path = resolve(OFFICIAL_BACKBONE, offline=True)
    except CheckpointError:
        return None, (f"model: scratch (the official backbone {OFFICIAL_BACKBONE} is not on this machine; "
                      f"`meddinov3 models download {OFFICIAL_BACKBONE}` or pass --model)")
    return str(path), f"model: official backbone {OFFICIAL_BACKBONE}"


def volume_key(volume: np.ndarray) -> str:
    """Content hash of a volume (shape, dtype, voxels): what a cache entry of this volume is keyed on."""
    h = hashlib.sha256()
    h.update(str((volume.shape, volume.dtype.str)).encode())
    h.update(np.ascontiguousarray(volume).tobytes())
    return h.hexdigest()[:32]


def cache_key(volume_hash: str, *parts: str) -> str:
    """Cache key of something computed from a volume (its `volume_key`) and `parts` (e.g. the model path)."""
    return hashlib.sha256("\0".join((volume_hash, *parts)).encode()).hexdigest()[:32]


def model_stamp(model_ref: str) -> str:
    """The model reference and, for a file or folder, its modification time: a cache key part that changes when the
    model at that path is replaced."""
    path = Path(model_ref)
    return f"{model_ref}@{path.stat().st_mtime_ns}" if path.exists() else str(model_ref)


def cache_dir() -> Path:
    path = user_dir() / "cache" / "complete"
    path.mkdir(parents=True, exist_ok=True)
    return path


@torch.no_grad()
def backbone_features(volume: np.ndarray, spacing: tuple[float, float, float], model_ref: str, device: torch.device,
                      progress=None, batch_size: int = 8) -> np.ndarray:
    """(S, FEATURE_CHANNELS, h, w) float16 PCA-reduced token maps of a canonical volume (S, P, L), h x w tokens."""
    from ..checkpoints.loader import load_backbone
    from ..checkpoints.convert import load_strict
    from ..engine.preprocess import make_normalizer, resampled_shape, resize, target_spacing
    from ..model.backbone import DINOv3Backbone

    cfg, state, spec = load_backbone(model_ref, offline=True)
    net = DINOv3Backbone(cfg)
    load_strict(net, state, str(model_ref))
    net = net.to(device).eval()
    normalize = make_normalizer(spec.normalization, volume)
    size = resampled_shape(volume.shape[1:], spacing[1:], target_spacing(spec, spacing[1:]))
    p = cfg.patch_size
    size = tuple(-(-n // p) * p for n in size)
    maps = []
    for i in range(0, volume.shape[0], batch_size):
        # a copy: the normaliser clamps in place, and `volume` may be the caller's image memory
        x = torch.from_numpy(np.array(volume[i:i + batch_size], dtype=np.float32))[:, None].to(device)
        x = resize(normalize(x), size).expand(-1, cfg.in_chans, -1, -1)
        feats = torch.cat(net.feature_maps(x, cfg.feature_blocks), 1)
        maps.append(feats.float().cpu())
        if progress is not None:
            progress.update(min(i + batch_size, volume.shape[0]), volume.shape[0], stage="features")
    feats = torch.cat(maps)  # (S, C, h, w)
    S, C, h, w = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, C)
    mean = flat.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(flat - mean, q=min(FEATURE_CHANNELS, C), center=False)
    reduced = (flat - mean) @ v
    reduced = reduced / reduced.std(0, keepdim=True).clamp_min(1e-6)
    return reduced.reshape(S, h, w, -1).permute(0, 3, 1, 2).contiguous().half().numpy()


def cached_features(volume: np.ndarray, spacing, model_ref: str, device: torch.device, progress=None,
                    use_cache: bool = True, volume_hash: str | None = None) -> tuple[np.ndarray, bool]:
    """`backbone_features`, from the cache when this volume met this model before; (features, came from cache).
    `volume_hash`: the volume's `volume_key` when the caller has it already (hashing a CT takes a while)."""
    key = cache_key(volume_hash or volume_key(volume), model_stamp(model_ref), str(spacing))
    path = cache_dir() / f"features-{key}.npy"
    cached = _load_cached(path, use_cache)
    if cached is not None:
        return cached, True
    feats = backbone_features(volume, spacing, model_ref, device, progress)
    if use_cache:
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, feats)
    return feats, False


def _load_cached(path: Path, use_cache: bool, mmap: bool = False) -> np.ndarray | None:
    if use_cache and path.exists():
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    return None


def decoder_probabilities(image, to_canonical, model_ref: str, device: torch.device, volume_hash: str,
                          progress=None, use_cache: bool = True) -> tuple[np.ndarray | None, list[str], bool]:
    """(probabilities, class names, came from cache) of a model package's segmentation of `image`.

    `image`: the SimpleITK image; `to_canonical`: maps a (z, y, x) array to the canonical (S, P, L) layout. The
    probabilities: (foreground classes, S, P, L) uint8 (x 255), memory-mapped from the cache; None (and no
    names) for a bare backbone, which has no decoder.
    """
    from ..checkpoints.loader import has_decoder, load_model, run_package
    from ..engine import segment_image
    from ..options import SegmentOptions

    path = cache_dir() / f"decoder-{cache_key(volume_hash, model_stamp(model_ref))}.npy"
    names_path = path.with_suffix(".json")
    cached = _load_cached(path, use_cache, mmap=True)
    names = read_json_or(names_path)
    if cached is not None and isinstance(names, list) and len(names) == len(cached):
        return cached, names, True
    if not has_decoder(model_ref, offline=True):  # a backbone: its weights are not read a second time
        return None, [], False
    model = load_model(run_package(model_ref), device=device, offline=True)
    result = segment_image(image, model, SegmentOptions(device=str(device), postprocess=False), progress=progress,
                           return_probabilities=True)
    probs = np.stack([to_canonical(p) for p in result.probabilities[1:]])
    probs = np.clip(np.rint(probs.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    names = [c.name for c in result.classes[1:]]
    if use_cache:
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, probs)
        write_json(names_path, names)
        return np.load(path, mmap_mode="r"), names, False
    return probs, names, False
