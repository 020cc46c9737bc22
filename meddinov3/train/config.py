"""The options of a fine-tuning run (`TrainConfig`: every option is a field; stored in the run's config.json) and the
error a user can fix (`TrainError`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import JsonOptions
from ..data.augment import AugmentConfig


class TrainError(Exception):
    """A problem the user can fix (bad options, existing run folder...)."""


@dataclass
class TrainConfig(JsonOptions):
    """Every option of a fine-tuning run, one field each (no subclasses): what `train` needs and config.json keeps.

    `data`: a dataset (an nnU-Net v2 raw folder, or a JSON / CSV list of pairs: `data.dataset.load_dataset`);
    `out`: the run folder; `base`: where the network starts (None: from scratch at `size`). Each field's comment
    gives its meaning and default; the `meddinov3 train` options and `--set KEY=JSON` set them, `--config` reads
    them from a JSON file (or a run's config.json). `validate()` (called by `from_dict`) refuses inconsistent values
    with a ValueError naming them.
    """

    SECTION = "train"  # key of these options in the run's config.json
    KIND = "training"
    PATHS = ("data", "out", "cache_dir", "splits")  # stored absolute in config.json
    PATHS_IF_EXISTING = ("base",)  # absolute when a path, kept when a model name

    data: str = ""
    out: str = ""
    base: str | None = None  # backbone / model package / pretrain run; None = from scratch
    size: str = "base"  # when there is no base
    model: dict = field(default_factory=dict)  # model_config overrides, e.g. {"depth": 2, "patch_size": 8}
    drop_path: float | None = None  # stochastic depth on every block (DINOv3's rule); None: the model's (0 new)
    name: str | None = None  # model package name (default: the run folder's name)
    epochs: int = 1000
    steps_per_epoch: int = 250
    steps: int | None = None  # total optimiser steps; overrides epochs
    batch_size: int | str = 8  # global (all ranks together); "nnunet": nnU-Net's 2D planner rule (nnunet_batch_size)
    micro_batch: int | None = None  # per-rank forward size; None = the whole per-rank batch
    patch_size: list | None = None  # default: median slice size rounded up to the patch size, at most 512
    spacing: list | None = None  # in-plane (row, column) mm; default: the dataset's median
    resolution: int | None = None  # high-resolution configuration (MedDINOv3's 2d_896): patch R x R, spacing
    #                                 scaled per axis by (the patch without it) / R
    case_sampling: str = "uniform"  # "uniform" over cases (nnU-Net), or "slices" (in proportion to slice count)
    image_resampling: str = "linear"  # in the slice cache: "linear" (as the engine) or "cubic" (nnU-Net's order 3)
    normalization: dict | None = None  # default: CT -> nnU-Net CTNormalization from the training data
    val_cases: list | None = None
    val_fraction: float = 0.2
    fold: int | None = None  # nnU-Net cross-validation fold: KFold(5, shuffle, 12345) over sorted names, or `splits`
    splits: str | None = None  # an nnU-Net splits_final.json to take `fold` (default 0) from
    val_every: int | None = None  # steps; default one epoch
    val_tta: bool | str = False  # mirroring at validation: True, False, or "final" (the last validation only)
    export_weights: str = "best"  # model/ from the "best" validation, or the "final" weights (nnU-Net's default)
    seed: int = 0
    lr_decoder: float = 3e-4
    lr_backbone: float = 3e-5
    weight_decay: float = 0.05
    weight_decay_all: bool = False  # also decay biases, norms, tokens, LayerScale (the reference trainer does)
    lr_per_epoch: bool = False  # hold the learning rate for each epoch (nnU-Net steps its schedule per epoch)
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 12.0
    freeze_blocks: int = 0
    foreground_oversampling: float = 0.33
    loss_weights: list = field(default_factory=lambda: [1.0, 1.0])  # dice, ce
    checkpoint_every: int = 250
    log_every: int = 10
    augment: dict = field(default_factory=dict)  # AugmentConfig overrides
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; "bf16", "fp16", "none"
    prefetch: bool = True  # draw, pin and copy the next batches in a background thread while a step runs
    compile: bool = False  # torch.compile the forward + loss (dynamic=False; the first steps pay the compile time)
    device: str = "auto"
    cache_dir: str | None = None  # default: MEDDINOV3_HOME/cache/slices
    export_dtype: str = "float32"  # weights of the exported model package ("float16" halves its size)
    license: str = ""
    description: str = ""
    postprocessing: list = field(default_factory=list)  # the package's clean-up steps (see check_postprocessing)

    @property
    def total_steps(self) -> int:
        return int(self.steps) if self.steps else int(self.epochs) * int(self.steps_per_epoch)

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    def validate(self) -> None:
        for key in ("epochs", "steps_per_epoch") + (() if self.batch_size == "nnunet" else ("batch_size",)):
            self.require_number(key, 1)
        for key in ("steps", "micro_batch", "resolution"):
            self.require_number(key, 1, optional=True)
        self.require_number("drop_path", 0, whole=False, optional=True)
        self.require_number("fold", 0, optional=True)
        if self.val_tta not in (True, False, "final"):
            raise ValueError(f"val_tta must be true, false or \"final\", got {self.val_tta!r}")
        if self.export_weights not in ("best", "final"):
            raise ValueError(f"export_weights must be 'best' or 'final', got {self.export_weights!r}")
        if self.image_resampling not in ("linear", "cubic"):
            raise ValueError(f"image_resampling must be 'linear' or 'cubic', got {self.image_resampling!r}")
        if self.case_sampling not in ("uniform", "slices"):
            raise ValueError(f"case_sampling must be 'uniform' or 'slices', got {self.case_sampling!r}")
        if self.val_cases is not None and (self.fold is not None or self.splits):
            raise ValueError("val_cases and fold/splits both choose the validation cases: give one of them")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
            raise ValueError(f"val_fraction must be at least 0 (no validation) and below 1, got {vf!r}")
        if self.val_cases is not None and (not isinstance(self.val_cases, list)
                                           or not all(isinstance(n, str) for n in self.val_cases)):
            raise ValueError(f"val_cases must be a list of case names, got {self.val_cases!r}")
        self.augment_config  # noqa: B018 - parsing the augmentation options validates them
