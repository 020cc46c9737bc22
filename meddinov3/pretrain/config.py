"""The options of a pretraining run (`PretrainConfig`: every option is a field; stored in the run's config.json)
and the error a user can fix (`PretrainError`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..config import JsonOptions
from .recipe import HIGHRES_CROPS, lr_scale, prototypes_for_batch, stage_value

GRAM_FROM_SCRATCH = ("stage {stage} anchors the patch features to those of a trained teacher (Gram anchoring), but the "
                     "run would start from a random network: give --base (a stage-1 run folder or a pretrained "
                     "backbone) or run stage 1 first")


class PretrainError(Exception):
    """A problem the user can fix (bad options, existing run folder, unusable base...)."""


@dataclass
class PretrainConfig(JsonOptions):
    """Every option of a pretraining run (``meddinov3 pretrain`` flags, ``--set KEY=JSON``, ``--config FILE``),
    saved in RUN_DIR/config.json under "pretrain". Stage-dependent options left None take the stage's DINOv3 value
    (``with_stage_defaults``, ``recipe.STAGE_DEFAULTS``) when the run starts."""

    SECTION = "pretrain"  # key of these options in the run's config.json
    KIND = "pretraining"
    PATHS = ("data", "out", "cache_dir", "probe_data")  # stored absolute in config.json
    PATHS_IF_EXISTING = ("base", "gram_teacher")  # absolute when a path, kept when a model name

    data: str | list = ""
    out: str = ""
    base: str | None = None  # backbone of any layout or a previous pretrain run; None: official, else scratch
    size: str | None = None  # architecture from scratch (default "base")
    model: dict = field(default_factory=dict)  # model_config overrides (from scratch only)
    stage: int = 1
    name: str | None = None
    steps: int = 10000
    batch_size: int = 64  # images per step, all ranks together
    micro_batch: int | None = None  # per-rank forward size (OOM back-off halves it)
    seed: int = 0
    # None: the stage's DINOv3 default (``recipe.STAGE_DEFAULTS``), resolved into config.json at the start
    lr: float | None = None  # base lr, x ``recipe.lr_scale(lr_scaling, batch_size)`` (x1 at batch 64 by default)
    min_lr: float | None = None
    lr_scaling: str = "sqrt_wrt_1024"  # DINOv3's rule: lr x 4 sqrt(batch_size / 1024); "linear_wrt_256", "none"
    layer_decay: float = 0.9  # layer-wise lr decay (DINOv3 optim.layerwise_decay)
    patch_embed_lr: float = 0.2  # lr multiplier of the patch embedding (DINOv3 optim.patch_embed_lr_mult)
    drop_path_rate: float = 0.3  # student stochastic depth, every block (DINOv3 student.drop_path_rate)
    warmup_steps: int | None = None
    warmup_shape: str | None = None  # "linear" or "cosine" (a half cosine: DINOv3's stage 3)
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    momentum: float | None = None
    momentum_end: float | None = None
    teacher_temp: float = 0.07
    warmup_teacher_temp: float | None = None
    teacher_temp_warmup_steps: int | None = None
    student_temp: float = 0.1
    centering: str = "sinkhorn"  # or "centering" (DINO centre + sharpen), "none"
    center_momentum: float = 0.9
    # out_dim None: 32 prototypes per Sinkhorn row (``recipe.prototypes_for_batch``)
    head: dict = field(default_factory=lambda: {"out_dim": None, "hidden_dim": 2048, "bottleneck_dim": 256,
                                                "nlayers": 3})
    # DINO pairs of local crops count this much (None: DINOv3's 1 in stage 1, 0.5 in stages 2 and 3)
    local_loss_weight: float | None = None
    # ... reached from 1 along a half cosine over this many steps (None: 1000 in stage 2, as DINOv3; else 0)
    local_weight_steps: int | None = None
    # KoLeo counts once per global crop (x2, as DINOv3); "gram" absent: the stage's default (2 / 1.5)
    loss_weights: dict = field(default_factory=lambda: {"dino": 1.0, "ibot": 1.0, "koleo": 0.1})
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: list = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list = field(default_factory=lambda: [0.05, 0.32])
    # stage 3 draws one (global, local, probability) per step, DINOv3's high-resolution mix, sizes x highres_scale
    # (e.g. 0.25 for a small run: global 128/192, local 28..84 rounded to the patch size)
    highres_crops: list = field(default_factory=lambda: [list(c) for c in HIGHRES_CROPS])
    highres_scale: float = 1.0
    mask_ratio: list = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5
    grad_clip: float = 3.0
    # the prototypes stay fixed this long (stage 1: DINOv3's one epoch, 1250 steps): early on the targets are near
    # uniform and trainable prototypes would settle in that uniform fixed point
    freeze_last_layer_steps: int | None = None
    grad_checkpointing: bool = False
    # stage >= 2: the Gram teacher's weights: a kept snapshot (RUN/checkpoints/step_NNNNNNN.pt: its EMA teacher), a
    # run folder (its latest teacher) or a backbone; None = the EMA teacher at the start of this stage
    gram_teacher: str | None = None
    gram_scale: float | None = None  # Gram teacher's clean crops at this x the global size (2 in stage 2, 1.5 in 3)
    gram_refresh_every: int | None = None  # Gram teacher <- EMA teacher every N steps (10000 in stage 2; 0 never)
    gram_max_refreshes: int | None = None  # ... at most this many times (3)
    keep_every: int = 10000  # checkpoints/step_NNNNNNN.pt kept every N steps (0: only latest.pt), e.g. Gram teachers
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; "bf16", "none"
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    probe_every: int = 500  # 0: never
    probe_size: int = 128  # px at 1 mm, at least 8 patches a side
    # labelled dataset of the probe (any `train --data` layout); None: the LiTS liver CT (offline default)
    probe_data: str | None = None
    collapse_std: float = 0.02  # teacher CLS feature spread below this ...
    collapse_usage: float = 0.02  # ... or prototype-usage entropy (fraction of log K) below this ...
    collapse_uniform: float = 0.995  # ... or teacher entropy above this fraction of [Sinkhorn floor, log K] ...
    collapse_patience: int = 3  # ... for this many steps in a row: collapse_warning
    cache_dir: str | None = None  # slice shard store (default MEDDINOV3_HOME/cache/pretrain-slices)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated model) or "fsdp" (sharded with FSDP2)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "global_size", "local_size", "checkpoint_every", "log_every",
                    "collapse_patience"):
            self.require_number(key, 1)
        for key in ("seed", "n_local", "probe_every", "keep_every"):
            self.require_number(key, 0)
        for key in ("warmup_steps", "teacher_temp_warmup_steps", "freeze_last_layer_steps", "gram_refresh_every",
                    "gram_max_refreshes", "local_weight_steps"):
            self.require_number(key, 0, optional=True)
        self.require_number("micro_batch", 1, optional=True)
        for key in ("grad_clip", "teacher_temp", "student_temp", "highres_scale", "layer_decay", "patch_embed_lr",
                    "drop_path_rate"):
            self.require_number(key, 0, whole=False)
        for key in ("lr", "min_lr", "weight_decay", "weight_decay_end", "momentum", "momentum_end",
                    "warmup_teacher_temp", "gram_scale", "local_loss_weight"):
            self.require_number(key, 0, whole=False, optional=True)
        lr_scale(self.lr_scaling, 1)  # an unknown rule is refused here
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.stage >= 2 and self.size is not None and not self.base and not self.gram_teacher:
            raise ValueError(GRAM_FROM_SCRATCH.format(stage=self.stage))
        if self.warmup_shape not in (None, "linear", "cosine"):
            raise ValueError(f"warmup_shape must be linear or cosine, got {self.warmup_shape!r}")
        if self.centering not in ("sinkhorn", "centering", "none"):
            raise ValueError(f"centering must be sinkhorn, centering or none, got {self.centering!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")

    def with_stage_defaults(self) -> PretrainConfig:
        """These options with every unset (None) stage-dependent option at its DINOv3 default for this stage
        (``recipe.STAGE_DEFAULTS``), the prototype count from the batch, and the stage's Gram weight."""
        filled = {f.name: stage_value(self.stage, f.name, self.steps) for f in fields(self)
                  if getattr(self, f.name) is None and stage_value(self.stage, f.name, self.steps) is not None}
        head = dict(self.head)
        if head.get("out_dim") is None:
            head["out_dim"] = prototypes_for_batch(self.batch_size)
        weights = dict(self.loss_weights)
        if self.stage >= 2:
            weights.setdefault("gram", stage_value(self.stage, "gram_weight", self.steps))
        return replace(self, **filled, head=head, loss_weights=weights)

    def gram_crop_size(self, global_size: int, patch: int) -> int | None:
        """Side of the Gram teacher's clean crops (a multiple of `patch`), None before stage 2."""
        if self.stage < 2:
            return None
        return max(patch, int(round(global_size * self.gram_scale / patch)) * patch)

    def resolutions(self, patch: int) -> list[tuple[int, int, float]]:
        """(global size, local size, probability per step) of the crops: one pair before stage 3, DINOv3's
        high-resolution mix (x ``highres_scale``, multiples of `patch`) in stage 3."""
        if self.stage < 3:
            return [(self.global_size, self.local_size, 1.0)]
        side = lambda s: max(patch, int(round(s * self.highres_scale / patch)) * patch)  # noqa: E731
        total = sum(float(c[2]) for c in self.highres_crops)
        return [(side(g), side(l), float(p) / total) for g, l, p in self.highres_crops]
