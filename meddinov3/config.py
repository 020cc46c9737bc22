"""Network configuration: one frozen dataclass, named size presets, JSON round trip.

Everything needed to rebuild a network lives here, so a model package's `model.json` (or a run's
`config.json`) alone reproduces the architecture.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# embed_dim, depth, num_heads. `tiny` exists for tests and CPU demos; `base` is the paper's ViT-B/16.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (96, 4, 2),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def quartile_blocks(depth: int) -> tuple[int, ...]:
    """Blocks (0-based) at the end of each quarter of the network: (2, 5, 8, 11) for depth 12."""
    return tuple(max(0, round(depth * (k + 1) / 4) - 1) for k in range(4))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a MedDINOv3 segmentation network (DINOv3 ViT backbone + patch decoder)."""

    size: str = "base"
    num_classes: int = 2
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    in_chans: int = 3  # the 1-channel slice is repeated to 3 channels, as the DINOv3 patch embedding expects
    num_reg_tokens: int = 4
    qkv_bias: bool = False
    layer_scale_init: float = 1e-5
    norm_eps: float = 1e-6
    rope_base: float = 100.0
    feature_blocks: tuple[int, ...] = field(default=(2, 5, 8, 11))
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "feature_blocks", tuple(int(b) for b in self.feature_blocks))
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 * num_heads ({self.num_heads}) for RoPE")
        if any(not 0 <= b < self.depth for b in self.feature_blocks):
            raise ValueError(f"feature_blocks {self.feature_blocks} outside 0..{self.depth - 1}")
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if self.patch_size & (self.patch_size - 1):
            raise ValueError("patch_size must be a power of two (the decoder doubles resolution per stage)")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Channels after each decoder stage: halved per stage from the concatenated features (3072 -> ... -> 192)."""
        ch = [self.embed_dim * len(self.feature_blocks)]
        for _ in range(self.patch_size.bit_length() - 1):
            ch.append(ch[-1] // 2)
        return tuple(ch)

    @property
    def multiscale(self) -> bool:
        return len(self.feature_blocks) > 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["feature_blocks"] = list(self.feature_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def model_config(size: str = "base", num_classes: int = 2, multiscale: bool = True, **overrides) -> ModelConfig:
    """Config of a named size; `overrides` change any field (e.g. depth=2 for a faster test)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    embed_dim, depth, num_heads = SIZES[size]
    depth = overrides.pop("depth", depth)
    embed_dim = overrides.pop("embed_dim", embed_dim)
    num_heads = overrides.pop("num_heads", num_heads)
    blocks = overrides.pop("feature_blocks", quartile_blocks(depth) if multiscale else (depth - 1,))
    return ModelConfig(size=size, num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                       feature_blocks=blocks, **overrides)


class JsonOptions:
    """JSON round trip for the option dataclasses of `train` and `pretrain` (mixin).

    Unknown keys are an error that names them (a typo must not silently fall back to a default). `SECTION` is
    the key under which a run's `config.json` stores these options, so a run's config can be passed back with
    `--config`; `KIND` names the options in messages; `PATHS` and `PATHS_IF_EXISTING` are made absolute when a
    run stores them (`files.absolute_paths`).
    """

    SECTION = ""
    KIND = "config"
    PATHS = ()  # options stored absolute in config.json (paths, or lists of them)
    PATHS_IF_EXISTING = ()  # ... absolute when they name an existing file or folder (else model names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.KIND} config keys: {sorted(unknown)} (known: {sorted(known)})")
        options = cls(**d)
        options.validate()
        return options

    @classmethod
    def file_options(cls, path) -> dict:
        """The options a JSON file gives, as written (a run's config.json holds them under its section)."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if isinstance(d, dict):
            d = d.get(cls.SECTION, d)
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of {cls.KIND} options, got {type(d).__name__}")
        return d

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(cls.file_options(path))

    def validate(self) -> None:
        """Raise ValueError for inconsistent options (subclasses add their checks)."""

    def require_number(self, key: str, low: float, whole: bool = True, optional: bool = False) -> None:
        """ValueError unless option `key` is a number (whole if `whole`) of at least `low`; None too if `optional`."""
        value = getattr(self, key)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value < low:
            raise ValueError(f"{key} must be {'a whole number' if whole else 'a number'} of at least {low:g}, "
                             f"got {value!r}")
