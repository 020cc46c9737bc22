"""The pretraining loop (stages 1-3): config in, RUN_DIR out.

RUN_DIR: config.json (fully resolved), checkpoints/latest.pt (atomic: student, teacher, heads, Gram teacher,
centres, optimiser, step = data position, RNG), metrics.jsonl, curves.png, status.json, backbone/ (the EMA
teacher backbone as a model package, refreshed at every checkpoint and at the end), slices/ (the slice index over
int16 shards kept in ``cache_dir`` or MEDDINOV3_HOME/cache/pretrain-slices, read once for all runs). Alone or
under torchrun (gloo on CPU, NCCL on CUDA; rank 0 writes), resumable after kill -9, stops cleanly on SIGTERM /
SIGINT. ``parallel`` picks how several processes share the work: "ddp" (every rank holds the whole model, gradients
averaged over ranks) or "fsdp" (student, EMA teacher and Gram teacher sharded with FSDP2, see ``parallel.py``: for
sizes whose three networks and optimiser state do not fit one GPU).
Checkpoints hold full, unsharded state in one layout either way: a run resumes with or without FSDP, on any number
of processes.

``pretrain`` runs in a ``meddinov3.runs.RunSession`` (run folder, status.json, signals, metrics, failure reporting,
shared with fine-tuning) through five stages, each a function or a class here: ``_prepare`` (the folder, the probe's
labelled slices, the slice index) -> ``_build`` (networks, optimiser, schedules, crops) -> ``_restore`` (a resumed
checkpoint, the micro-batch that fits, config.json) -> ``_Steps.loop`` (the steps; metrics, probe, collapse monitor,
checkpoints between them) -> ``_Steps.finish`` (last probe and checkpoint, final status).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoints.convert import strip_prefix
from ..config import ModelConfig
from ..files import atomic_path, write_json
from .. import distributed as D
from ..memory import MicroBatchChoice, peak_gpu_memory_gb
from ..model.backbone import set_drop_path
from ..runs.batch import amp_dtype, amp_name, fit_micro_batch as fit_run_micro_batch, oom_event, start_micro_batch
from ..runs.metrics import pyplot, read_metrics
from ..runs.session import RunKind, RunSession, versions
from ..train.checkpoint import rng_states, set_rng_states
from .config import GRAM_FROM_SCRATCH, PretrainConfig, PretrainError
from .crops import MultiCropAugmentation, collate_crops
from .data import PretrainDataError, SliceIndex, StepSampler, build_slice_index, collect_volumes, crop_generator
from .masking import sample_masks
from .meta_arch import HeadConfig, SSLMetaArch
from .parallel import full_state, load_optimizer, shard
from .probe import DenseProbe, ProbeSlices, run_probe_slices
from .recipe import entropy_floor, optimizer_groups, prototype_warning, step_schedules
from .step import MicroBatchStep, OutOfMemoryStop

FORMAT = "meddinov3-pretrain-state"
OFFICIAL_BASE = "meddinov3-vitb16-ct3m"


def collapse_check(stats: dict, state: dict, cfg: PretrainConfig, step: int) -> str | None:
    """Update `state` (count, max_std) with one step's teacher statistics; the reason when a collapse has lasted
    `collapse_patience` steps in a row (once), else None.

    Three signatures: a constant CLS (spread numerically zero, or below collapse_std after falling to a tenth of its
    best: random init starts near-constant, so a low spread alone is no alarm); one prototype for everything
    (usage entropy below collapse_usage); uniform targets (per-sample teacher entropy above collapse_uniform of the
    way from Sinkhorn's floor log(K / 2B) to log K, once the prototypes train, i.e. after the lr warm-up and
    freeze_last_layer_steps), the fixed point in which the student learns nothing from the DINO term. Measured from
    the floor, because equal mass per prototype keeps every target's entropy above it whatever the features
    (``recipe.entropy_floor``): with many prototypes per image, a fraction of log K alone could not tell.
    """
    spread, usage, entropy = stats["teacher_feature_std"], stats["prototype_usage"], stats["teacher_entropy"]
    state["max_std"] = max(state.get("max_std", 0.0), spread)
    k = int(cfg.head["out_dim"])
    floor = entropy_floor(k, cfg.batch_size) if cfg.centering == "sinkhorn" else 0.0
    uniform_limit = floor + cfg.collapse_uniform * (math.log(k) - floor)
    free = step > max(cfg.warmup_steps, cfg.freeze_last_layer_steps)
    why = []
    if spread < 1e-6 or (spread < cfg.collapse_std and spread < 0.1 * state["max_std"]):
        why.append(f"teacher CLS feature spread {spread:.2e} (best {state['max_std']:.2e})")
    if usage < cfg.collapse_usage:
        why.append(f"prototype usage {usage:.3f} (< {cfg.collapse_usage})")
    if free and entropy > uniform_limit:
        why.append(f"uniform teacher targets: entropy {entropy:.3f} (> {uniform_limit:.3f})")
    state["count"] = state["count"] + 1 if why else 0
    if state["count"] != cfg.collapse_patience:
        return None
    return f"{'; '.join(why)} for {cfg.collapse_patience} steps"


def base_error(base, error: Exception) -> PretrainError:
    """`--base X: problem`, naming X once when the problem already starts with it (checkpoint errors do)."""
    text = str(error)
    return PretrainError(f"--base: {text}" if text.startswith(str(base)) else f"--base {base}: {text}")


def gram_refresh_due(cfg: PretrainConfig, step: int) -> bool:
    """Whether the Gram teacher takes the EMA teacher's weights after `step` (DINOv3: every 10k iterations, at
    most 3 times in stage 2; never in stage 3). A function of the step alone, so a resumed run refreshes alike."""
    every = cfg.gram_refresh_every or 0
    return cfg.stage >= 2 and every > 0 and step % every == 0 and step // every <= (cfg.gram_max_refreshes or 0)


def step_resolution(resolutions: list, seed: int, step: int) -> int:
    """Which of `resolutions` (global, local, probability) step `step` uses: drawn from (seed, step) alone, so every
    process and a resumed run take the same (DINOv3 combines one loader per resolution by these ratios)."""
    if len(resolutions) == 1:
        return 0
    p = np.array([r[2] for r in resolutions], dtype=np.float64)
    return int(np.random.default_rng([seed, step, 7]).choice(len(resolutions), p=p / p.sum()))


def is_kept(cfg: PretrainConfig, step: int) -> bool:
    return bool(cfg.keep_every) and step % cfg.keep_every == 0


def keep_snapshot(latest: Path, step: int) -> Path:
    """checkpoints/step_NNNNNNN.pt: the checkpoint just written, kept (a hard link where the file system allows:
    latest.pt is replaced by renaming, so the link keeps this step's state at no cost in space)."""
    import os
    import shutil

    kept = latest.with_name(f"step_{step:07d}.pt")
    kept.unlink(missing_ok=True)
    try:
        os.link(latest, kept)
    except OSError:
        shutil.copyfile(latest, kept)
    return kept


def gram_teacher_weights(source: str) -> dict:
    """Backbone weights for the Gram teacher from a pretraining checkpoint (a kept snapshot or latest.pt: its EMA
    teacher), a pretraining run folder (its latest teacher) or any backbone ``load_backbone`` reads."""
    from ..checkpoints import load_backbone

    path = Path(source).expanduser()
    checkpoint = _base_run_checkpoint(source) if path.is_dir() else path if path.is_file() else None
    state = _read_state(checkpoint, other_ok=True) if checkpoint is not None else None
    if state is not None:
        return strip_prefix(state["meta"], "teacher.backbone.")
    try:
        return load_backbone(source)[1]
    except Exception as e:  # noqa: BLE001 - any unusable Gram teacher is the user's to fix
        raise PretrainError(f"gram_teacher {source}: {e}") from None


# ----------------------------------------------------------------------------------------------- set-up


def _read_state(path: Path, other_ok: bool = False, mmap: bool = False) -> dict | None:
    """A pretraining checkpoint, with restricted unpickling (a --base run folder may come from anyone); None for a
    readable file of another kind when `other_ok`. `mmap`: a cheap check, tensors not read."""
    from ..checkpoints import CheckpointError, safe_torch_load

    try:
        state = safe_torch_load(path, numpy_arrays=True, mmap=mmap)
    except CheckpointError as e:
        raise PretrainError(str(e)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if other_ok:
            return None
        raise PretrainError(f"{path}: not a MedDINOv3 pretraining checkpoint")
    return state


def _base_run_checkpoint(base: str) -> Path | None:
    """checkpoints/latest.pt of a previous pretrain run given as --base, if there is one."""
    path = Path(base).expanduser() / "checkpoints" / "latest.pt"
    return path if path.is_file() else None


def resolve_base(cfg: PretrainConfig, log) -> tuple[object, dict | None, dict | None, dict]:
    """(ModelConfig, backbone weights or None, previous run's full state or None, info)."""
    from ..checkpoints import load_backbone
    from ..config import model_config

    if cfg.base:
        prev = _base_run_checkpoint(cfg.base)
        if prev is not None:
            state = _read_state(prev, other_ok=True)
            if state is not None:
                mcfg = ModelConfig.from_dict(state["model_config"])
                return mcfg, None, state, {"base": str(cfg.base), "kind": "pretrain-run",
                                           "stage": state.get("stage"), "step": state.get("step")}
        try:
            mcfg, sd, spec = load_backbone(cfg.base)
        except Exception as e:  # noqa: BLE001 - any unusable base is the user's to fix
            raise base_error(cfg.base, e) from None
        return mcfg, sd, None, {"base": str(cfg.base), "kind": spec.kind, "name": spec.name}
    if cfg.size is None:
        try:
            mcfg, sd, spec = load_backbone(OFFICIAL_BASE, offline=True)
            return mcfg, sd, None, {"base": OFFICIAL_BASE, "kind": "backbone", "name": spec.name}
        except Exception as e:  # noqa: BLE001
            log(f"WARNING: the official MedDINOv3 backbone ({OFFICIAL_BASE}) is not available offline ({e}); "
                "starting from random initialisation (size base)")
    mcfg = model_config(cfg.size or "base", 1, **cfg.model)
    return mcfg, None, None, {"base": None, "kind": "random", "size": cfg.size or "base"}


def inherit_heads(cfg: PretrainConfig, base_head: dict | None, log) -> PretrainConfig:
    """A run continuing a previous pretrain run (e.g. stage 2 on stage 1) takes over its prototype heads, weights
    and shape: the shape comes from the base run unless `head` was set to another one, which is an error."""
    if not base_head or base_head == cfg.head:
        return cfg
    if cfg.head != PretrainConfig().head:
        raise PretrainError(f"--base {cfg.base}: its heads {base_head} differ from head={cfg.head}; leave `head` "
                            "unset to continue with the base run's heads")
    log(f"heads of the base run: {base_head}")
    return replace(cfg, head=dict(base_head))


def shard_store(cfg: PretrainConfig) -> Path:
    """Where the int16 slice shards live: ``cache_dir``, else one store under MEDDINOV3_HOME shared by all runs."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    from ..resources import user_dir
    return user_dir() / "cache" / "pretrain-slices"


def _index_complete(folder: Path) -> bool:
    return (folder / "index.json").is_file() and (folder / "index.npy").is_file() and \
        not SliceIndex(folder).missing_shards()


def make_optimizer(meta: SSLMetaArch, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW over the student with DINOv3's layer-wise lr decay and patch-embedding multiplier (the loop sets each
    group's lr to the step's lr x its ``lr_multiplier``)."""
    depth = len(meta.student["backbone"].vit.blocks)
    groups = optimizer_groups(meta.student, depth, cfg.layer_decay, cfg.patch_embed_lr)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


def fit_micro_batch(meta: SSLMetaArch, params: list, optimizer, cfg: PretrainConfig, per_rank: int, sizes: tuple,
                    device: torch.device, dist_info, log) -> MicroBatchChoice:
    """The micro-batch that fits this device (memory.size_micro_batch), measured on images of the run's crop sizes
    with the largest iBOT masks (the masked patches go through the heads: the costliest case)."""
    g_size, l_size, grid = sizes
    n_mask = int(max(cfg.mask_ratio) * grid[0] * grid[1])
    meta.train()  # the student as in a step (the teacher stays in eval mode)

    adt = amp_dtype(cfg.amp, device)

    def images(k: int) -> tuple[dict, torch.Tensor]:
        g = torch.zeros(2 * k, 1, g_size, g_size, device=device)
        loc = torch.zeros(cfg.n_local * k, 1, l_size, l_size, device=device) if cfg.n_local else g.new_empty(0)
        masks = torch.zeros(2 * k, grid[0] * grid[1], dtype=torch.bool, device=device)
        masks[:, :n_mask] = True
        return {"global": g, "local": loc}, masks

    def forward_backward(k: int) -> None:
        batch, masks = images(k)
        with torch.autocast(device.type, dtype=adt, enabled=adt is not None):
            loss, _ = meta.forward_losses(batch["global"], batch["local"], masks, cfg.teacher_temp)
        loss.backward()

    def whole_step_targets() -> None:  # Sinkhorn over all of the step's teacher outputs: not split by micro-batches
        batch, masks = images(per_rank)
        step = MicroBatchStep(meta, per_rank, 1, cfg.n_local, dist_info, device,
                              lambda: torch.autocast(device.type, dtype=adt, enabled=adt is not None))
        step.targets(batch, masks, cfg.teacher_temp)

    return fit_run_micro_batch(meta, params, optimizer, forward_backward, per_rank, device, cfg.micro_batch,
                               cfg.batch_size, dist_info, 2 if dist_info.enabled else 0, PretrainError, log,
                               whole_step=whole_step_targets)


def _all_reduce_grads(params: list, world: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    recs = read_metrics(metrics_path)
    steps = [r for r in recs if r.get("kind") == "step"]
    probes = [r for r in recs if r.get("kind") == "probe"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("loss", "dino", "ibot", "koleo", "gram"):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), lw=0.8, label=key)
    axes[0].set_title("losses"), axes[0].set_xlabel("step"), axes[0].grid(alpha=0.3)
    if steps:
        axes[0].legend(fontsize=7)
        for key in ("teacher_entropy", "prototype_usage", "teacher_feature_std"):
            axes[1].plot([r["step"] for r in steps], [r[key] for r in steps], lw=0.8, label=key)
        axes[1].legend(fontsize=7)
    axes[1].set_title("teacher (collapse monitor)"), axes[1].set_xlabel("step"), axes[1].grid(alpha=0.3)
    if probes:
        axes[2].plot([r["step"] for r in probes], [r["probe_dice"] for r in probes], marker="o", label="Dice")
        axes[2].plot([r["step"] for r in probes], [r["probe_accuracy"] for r in probes], marker="o", label="accuracy")
        axes[2].legend(fontsize=7)
    data = Path(probes[-1].get("data", "liver CT")).name if probes else "liver CT"
    axes[2].set_ylim(0, 1), axes[2].set_title(f"dense probe ({data})"), axes[2].grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the run


PRETRAIN_RUN = RunKind("pretrain", PretrainConfig, PretrainError, (PretrainError, PretrainDataError),
                       output="backbone", total=lambda cfg: cfg.steps, leftovers=("status.json", "slices"),
                       longer="to train longer, start a new run with --base {run_dir}")


def pretrain(cfg: PretrainConfig, resume: bool = False, json_progress: bool = False, stream=None,
             hooks: dict | None = None, explicit: dict | None = None) -> dict:
    """Run (or resume) pretraining into ``cfg.out`` (RUN_DIR, see the module docstring).

    Arguments:
        cfg: the options; with ``resume`` only ``out`` and ``device`` are used (the rest is RUN_DIR/config.json's).
        resume: continue RUN_DIR from checkpoints/latest.pt (a finished run is left as it is).
        json_progress: progress events as JSON lines (on ``stream``, default stdout) instead of a progress bar.
        hooks: test seams, e.g. ``{"meta": fn(meta)}`` called once the meta-architecture is built.
        explicit: with ``resume``, the options the user gave (refused when they differ from the saved ones).

    Returns the final status (status.json's content: "state" finished / stopped, "step", "rank_checksums"...);
    {} on the ranks of a distributed run other than 0. Raises PretrainError / PretrainDataError for what the user
    can fix, after recording the failure in status.json and as a ``failed`` event.
    """
    with RunSession(PRETRAIN_RUN, cfg, resume, json_progress, stream, explicit) as run:
        if run.finished:
            return run.previous
        _check_base(run.cfg)
        return _run(run, hooks or {})
    return run.result()  # stopped during the start-up


def _check_base(cfg: PretrainConfig) -> None:
    """A bad --base (unresolvable, or a run checkpoint that is refused) is reported before anything is built."""
    from ..checkpoints import CheckpointError, resolve

    if not cfg.base:
        return
    try:
        resolve(cfg.base)
    except CheckpointError as e:
        raise base_error(cfg.base, e) from None
    prev = _base_run_checkpoint(cfg.base)
    if prev is not None:
        _read_state(prev, other_ok=True, mmap=True)


def _run(run: RunSession, hooks: dict) -> dict:
    """The run's stages: prepare (the folder, the data) -> build (networks, optimiser, crops) -> restore (where the
    steps start: a resumed checkpoint, the micro-batch that fits, config.json) -> loop (the steps) -> finish (the
    last probe and checkpoint, the final status)."""
    index, probe_slices = _prepare(run)
    parts = _build(run, index, probe_slices, hooks)
    steps = _Steps(run, parts, _restore(run, parts))
    stopped = steps.loop()
    return steps.finish(stopped)


# ---- prepare

def _prepare(run: RunSession) -> tuple[SliceIndex, ProbeSlices | None]:
    """The probe's labelled slices (a bad --probe-data is reported before the slow part) and the slice index: built
    by rank 0 (volumes read once into the shared shard store; a resumed run needs only its index), opened by every
    rank."""
    cfg = run.cfg
    probe_slices = run_probe_slices(cfg.probe_data, run.log) if cfg.probe_every else None
    folder = run.run_dir / "slices"

    def decide() -> None:
        if not (run.resume and _index_complete(folder)):
            build_slice_index(collect_volumes(cfg.data), folder, run.log, shards=shard_store(cfg))

    _, error = D.decide_on_main(decide, (PretrainDataError,), run.dist_info)
    if error:
        raise PretrainDataError(error)
    return SliceIndex(folder), probe_slices


# ---- build

@dataclass
class _Parts:
    """What the steps work with, built once by ``_build``."""

    cfg: PretrainConfig  # the options with the stage's defaults and the base run's heads resolved
    mcfg: ModelConfig  # the backbone's architecture
    base_info: dict  # where the starting weights came from (config.json, the exported backbone's provenance)
    meta: SSLMetaArch  # student, EMA teacher (and Gram teacher), on the device, sharded under FSDP
    params: list  # the student's trainable parameters
    optimizer: torch.optim.Optimizer
    schedules: dict  # per-step arrays: lr, weight_decay, momentum, teacher_temp
    index: SliceIndex
    sampler: StepSampler
    resolutions: list  # (global, local, probability) of the crops
    augs: list  # a MultiCropAugmentation per resolution
    per_rank: int  # images per step on each process
    adt: torch.dtype | None  # autocast dtype
    fsdp: bool
    probe: DenseProbe | None
    latest: Path  # checkpoints/latest.pt
    resumed: dict | None  # the checkpoint being resumed, until ``_restore`` takes it


def _build_networks(run: RunSession, hooks: dict) -> tuple[PretrainConfig, ModelConfig, dict, SSLMetaArch]:
    """The meta-architecture from the base (``resolve_base``): its backbone weights or a whole previous run's
    state, the Gram teacher from stage 2; and the options with that run's heads and the stage's defaults."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    mcfg, base_sd, prev_state, base_info = resolve_base(cfg, run.log)
    if cfg.stage >= 2 and base_info["kind"] == "random" and not cfg.gram_teacher:
        raise PretrainError(GRAM_FROM_SCRATCH.format(stage=cfg.stage))
    if prev_state is not None:
        cfg = inherit_heads(cfg, prev_state.get("config", {}).get("head"), run.log)
    cfg = cfg.with_stage_defaults()
    warning = prototype_warning(int(cfg.head["out_dim"]), cfg.batch_size)
    if warning:
        run.log(f"WARNING: {warning}")
    meta = SSLMetaArch(mcfg, HeadConfig(**cfg.head), cfg.centering, cfg.student_temp, cfg.center_momentum,
                       cfg.loss_weights, local_weight=cfg.local_loss_weight)
    set_drop_path(meta.student["backbone"].vit, cfg.drop_path_rate)
    if base_sd is not None:
        meta.load_backbone_weights(base_sd)
    if prev_state is not None:
        sd = {k: v for k, v in prev_state["meta"].items() if not k.startswith("gram_teacher.")}
        try:
            meta.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise PretrainError(f"--base {cfg.base}: its heads differ from this config's ({detail})") from None
    if cfg.stage >= 2:
        meta.enable_gram(gram_teacher_weights(cfg.gram_teacher) if cfg.gram_teacher else None)
    meta.student["backbone"].grad_checkpointing = cfg.grad_checkpointing
    if "meta" in hooks:
        hooks["meta"](meta)
    meta.to(run.device)
    return cfg, mcfg, base_info, meta


def _per_rank_batch(cfg: PretrainConfig, world: int) -> int:
    """Images per step on each of the `world` processes (at least 2: KoLeo and Sinkhorn compare images)."""
    if cfg.batch_size % world:
        raise PretrainError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.batch_size // world < 2:
        raise PretrainError("each process needs at least 2 images per step (KoLeo and Sinkhorn compare images)")
    return cfg.batch_size // world


def _build(run: RunSession, index: SliceIndex, probe_slices: ProbeSlices | None, hooks: dict) -> _Parts:
    """Networks, optimiser, schedules, crops, step sampler and probe. A resumed checkpoint's whole weights go into
    the whole model here, before any sharding."""
    cfg, mcfg, base_info, meta = _build_networks(run, hooks)
    latest = run.run_dir / "checkpoints" / "latest.pt"
    resumed = _read_state(latest) if run.resume and latest.is_file() else None
    if resumed is not None:
        meta.load_state_dict(resumed["meta"])
    adt = amp_dtype(cfg.amp, run.device)
    fsdp = cfg.parallel == "fsdp" and run.dist_info.enabled
    if fsdp:
        shard(meta, run.device, run.dist_info.world_size, adt if run.device.type == "cuda" else None)
    elif cfg.parallel == "fsdp":
        run.log("parallel=fsdp: a single process, nothing to shard")
    params = meta.trainable()
    optimizer = make_optimizer(meta, cfg)
    per_rank = _per_rank_batch(cfg, run.dist_info.world_size)
    resolutions = cfg.resolutions(mcfg.patch_size)
    augs = [MultiCropAugmentation(g, l, cfg.n_local, tuple(cfg.global_scale), tuple(cfg.local_scale),
                                  patch_size=mcfg.patch_size, gram_size=cfg.gram_crop_size(g, mcfg.patch_size))
            for g, l, _ in resolutions]
    sampler = StepSampler(len(index), per_rank, cfg.seed, run.dist_info.rank, run.dist_info.world_size)
    probe = None
    if probe_slices is not None:
        probe = DenseProbe.from_slices(probe_slices, size=max(8, cfg.probe_size // mcfg.patch_size) * mcfg.patch_size)
    return _Parts(cfg, mcfg, base_info, meta, params, optimizer, step_schedules(cfg), index, sampler, resolutions,
                  augs, per_rank, adt, fsdp, probe, latest, resumed)


# ---- restore

@dataclass
class _Start:
    """Where the steps start: step (= data position), micro-batch, collapse monitor state."""

    step: int
    micro: int
    collapse: dict


def _resume_position(run: RunSession, parts: _Parts) -> _Start:
    """Step 0, or a resumed checkpoint's optimiser, RNG, step, micro-batch and collapse monitor. Takes the
    checkpoint off `parts`: it is freed when this returns, before the micro-batch is measured."""
    start = _Start(0, start_micro_batch(parts.cfg.micro_batch, parts.per_rank), {"count": 0, "warned": None})
    resumed, parts.resumed = parts.resumed, None
    if resumed is not None:
        if not load_optimizer(parts.meta, parts.optimizer, resumed["optimizer"]):
            run.log("WARNING: the checkpoint's optimiser state groups the parameters as an earlier version did and "
                    "does not name them: weights, teachers, step and schedules resume, AdamW's moments start afresh")
        set_rng_states(resumed["rng"])
        start = _Start(int(resumed["step"]), start_micro_batch(start.micro, parts.per_rank, resumed["micro_batch"]),
                       resumed["collapse"])
        run.log(f"resumed from {parts.latest} at step {start.step}")
    return start


def _restore(run: RunSession, parts: _Parts) -> _Start:
    """Where the steps start (``_resume_position``), at the micro-batch that fits this device; metrics.jsonl cut
    back to that step; a new run's config.json (options and everything resolved from them)."""
    start = _resume_position(run, parts)
    g_size, l_size, _ = parts.resolutions[0]
    grid = (g_size // parts.mcfg.patch_size,) * 2
    fit = fit_micro_batch(parts.meta, parts.params, parts.optimizer, parts.cfg, parts.per_rank,
                          (g_size, l_size, grid), run.device, run.dist_info, run.log)
    start.micro = min(start.micro, fit.micro_batch)
    run.restart_metrics(start.step)
    if run.main:
        run.status.update(batch=fit.to_dict())
        if not run.resume:
            write_json(run.run_dir / "config.json", {"pretrain": parts.cfg.to_dict(),
                                                     "resolved": _resolved(run, parts, fit), "versions": versions()})
    return start


def _resolved(run: RunSession, parts: _Parts, fit: MicroBatchChoice) -> dict:
    """config.json's "resolved": what the options became on this machine (model, crop sizes, batch split...)."""
    cfg, (g_size, l_size, _), dist_info = parts.cfg, parts.resolutions[0], run.dist_info
    resolutions = [[g, l, round(p, 4), aug.gram_size] for (g, l, p), aug in zip(parts.resolutions, parts.augs)]
    return {"model": parts.mcfg.to_dict(), "base": parts.base_info, "global_size": g_size, "local_size": l_size,
            "gram_size": parts.augs[0].gram_size, "resolutions": resolutions,
            "mask_grid": [g_size // parts.mcfg.patch_size] * 2, "total_steps": int(cfg.steps),
            "per_rank_batch": parts.per_rank, "world_size": dist_info.world_size, "device": str(run.device),
            "amp": amp_name(parts.adt), "parallel": "fsdp" if parts.fsdp else "ddp" if dist_info.enabled else "none",
            "gram_anchoring": cfg.stage >= 2, "data": parts.index.summary(), "batch": fit.to_dict(),
            "probe": parts.probe.info if parts.probe else None}


# ---- loop and finish

class _Steps:
    """The optimiser steps of a run and what happens between them: metrics, the probe, the collapse monitor,
    checkpoints (with the exported backbone), a clean stop on a signal; then the run's end (``finish``)."""

    def __init__(self, run: RunSession, parts: _Parts, start: _Start):
        self.run, self.parts, self.cfg = run, parts, parts.cfg
        self.step, self.collapse = start.step, start.collapse
        self.total = int(self.cfg.steps)
        self.acc, self.n_img, self.t_last = {}, 0, time.perf_counter()  # step statistics since the last record
        self.micro_step = MicroBatchStep(parts.meta, parts.per_rank, start.micro, self.cfg.n_local, run.dist_info,
                                         run.device, self._autocast, parts.fsdp, self._halved)

    def _autocast(self):
        """The forward passes' autocast context (a no-op without an autocast dtype)."""
        adt = self.parts.adt
        return torch.autocast(self.run.device.type, dtype=adt, enabled=adt is not None)

    def _halved(self, new_micro: int) -> None:
        oom_event(self.run.progress, self.step, new_micro, self.parts.per_rank)
        self.run.log(f"out of memory: micro-batch halved to {new_micro} on every process (gradient accumulation "
                     "and the whole-step teacher targets keep the batch's semantics)")

    def loop(self) -> bool:
        """Steps until the last, or until a stop was asked for (then True)."""
        run, cfg = self.run, self.cfg
        run.stopper.install()
        self._started()
        self.parts.meta.train()
        if self.step == 0 and cfg.probe_every:
            self.probe()  # the starting point: the curve then shows what pretraining adds
        stopped = False
        while self.step < self.total and not stopped:
            stats, grad_norm, global_size = self._one_step()
            self._after_step(stats, grad_norm, global_size)
            stopped = run.stop_requested()
            if (self.step % cfg.checkpoint_every == 0 or is_kept(cfg, self.step)) and self.step < self.total \
                    and not stopped:
                self.checkpoint()
        if stopped:
            run.mark_stopping(self.step)
        run.stopper.restore()
        return stopped

    def _started(self) -> None:
        run, parts = self.run, self.parts
        if not run.main:
            return
        run.status.update(state="running", step=self.step)
        g_size, l_size, _ = parts.resolutions[0]
        run.progress.event("started", run_dir=str(run.run_dir), stage=self.cfg.stage, total_steps=self.total,
                           step=self.step, resumed=bool(run.resume and self.step), device=str(run.device),
                           world_size=run.dist_info.world_size, base=parts.base_info, slices=len(parts.index),
                           global_size=g_size, local_size=l_size, resolutions=[list(r[:2]) for r in parts.resolutions])

    def _batch(self) -> tuple[dict, torch.Tensor, int]:
        """This step's crops (at its resolution) and iBOT masks, on the device; and its global crop size."""
        parts, cfg, step, rank = self.parts, self.cfg, self.step, self.run.dist_info.rank
        aug = parts.augs[step_resolution(parts.resolutions, cfg.seed, step)]
        grid = (aug.global_size // parts.mcfg.patch_size,) * 2
        batch = collate_crops([aug(parts.index.slice(i), crop_generator(cfg.seed, step, rank, j))
                               for j, i in enumerate(parts.sampler.indices(step))])
        masks = sample_masks(2 * parts.per_rank, grid, tuple(cfg.mask_ratio), cfg.mask_probability,
                             generator=np.random.default_rng([cfg.seed, step, rank, 5]))
        device = self.run.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, masks.to(device), aug.global_size

    def _one_step(self) -> tuple[dict, torch.Tensor, int]:
        """One optimiser step and the EMA update: the step's statistics (all ranks), gradient norm, crop size."""
        parts, cfg, step = self.parts, self.cfg, self.step
        batch, masks, global_size = self._batch()
        sched, optimizer, meta = parts.schedules, parts.optimizer, parts.meta
        for g in optimizer.param_groups:
            g["lr"] = float(sched["lr"][step]) * g["lr_multiplier"]
            if g["name"] == "decay":
                g["weight_decay"] = float(sched["weight_decay"][step])
        meta.local_weight = float(sched["local_weight"][step])
        optimizer.zero_grad(set_to_none=True)
        try:
            stats = self.micro_step(batch, masks, float(sched["teacher_temp"][step]))
        except OutOfMemoryStop as e:
            raise PretrainError(str(e)) from None
        if self.run.dist_info.enabled and not parts.fsdp:  # FSDP reduce-scatters the gradients in the backward
            _all_reduce_grads(parts.params, self.run.dist_info.world_size)
        if step < cfg.freeze_last_layer_steps:
            for hname in ("dino_head", "ibot_head"):
                meta.student[hname].last_layer.weight.grad = None
        # on FSDP's DTensor gradients this is the norm of the whole gradient (shard norms reduced over ranks)
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.params, cfg.grad_clip) if cfg.grad_clip else torch.zeros(())
        optimizer.step()
        meta.update_teacher(float(sched["momentum"][step]))
        self.step += 1
        if gram_refresh_due(cfg, self.step):
            meta.refresh_gram()
            self.run.log(f"Gram teacher refreshed from the EMA teacher at step {self.step}")
        return stats, grad_norm, global_size

    def _after_step(self, stats: dict, grad_norm: torch.Tensor, global_size: int) -> None:
        """The collapse monitor (every step; the statistics are all-rank already), a metrics record every
        `log_every` steps and at the end, the probe every `probe_every` steps."""
        self.n_img += self.cfg.batch_size
        for k, v in stats.items():
            self.acc.setdefault(k, []).append(v)
        self._watch_collapse(stats)
        if self.step % self.cfg.log_every == 0 or self.step == self.total:
            self._record(grad_norm, global_size)
        if self.cfg.probe_every and self.step % self.cfg.probe_every == 0:
            self.probe()

    def _watch_collapse(self, stats: dict) -> None:
        run, step = self.run, self.step
        reason = collapse_check(stats, self.collapse, self.cfg, step)
        if not (reason and run.main):
            return
        self.collapse["warned"] = {"step": step, "reason": reason}
        run.progress.event("collapse_warning", step=step, reason=reason,
                           teacher_feature_std=stats["teacher_feature_std"], prototype_usage=stats["prototype_usage"],
                           teacher_entropy=stats["teacher_entropy"])
        run.status.update(collapse=self.collapse["warned"])
        run.log(f"WARNING: possible collapse at step {step}: {reason}")

    def _record(self, grad_norm: torch.Tensor, global_size: int) -> None:
        """The statistics since the last record (means) and this step's schedule values: metrics.jsonl, a `step`
        event, status.json and (without --json-progress) a log line."""
        run, step, sched = self.run, self.step, self.parts.schedules
        now = time.perf_counter()
        rec = {"kind": "step", "step": step, "epoch": round(self.parts.sampler.epoch(step), 4),
               **{k: float(np.mean(v)) for k, v in self.acc.items()},
               **{k: float(sched[k][step - 1]) for k in ("lr", "weight_decay", "momentum", "teacher_temp",
                                                         "local_weight")},
               "grad_norm": float(grad_norm), "images_per_s": round(self.n_img / max(now - self.t_last, 1e-9), 3),
               "micro_batch": self.micro_step.micro, "global_size": global_size,
               "gpu_memory_gb": peak_gpu_memory_gb(run.device)}
        run.write_metrics(rec)
        self.t_last, self.n_img, self.acc = now, 0, {}
        if not run.main:
            return
        run.progress.event("step", **{k: v for k, v in rec.items() if k != "kind"}, total=self.total)
        run.status.update(step=step, metrics={k: rec[k] for k in ("loss", "dino", "ibot", "teacher_entropy",
                                                                  "teacher_feature_std", "images_per_s",
                                                                  "gpu_memory_gb")})
        if not run.json_progress:
            run.log(f"step {step}/{self.total} loss {rec['loss']:.4f} (dino {rec['dino']:.3f} ibot {rec['ibot']:.3f}"
                    f"{' gram %.4f' % rec['gram'] if 'gram' in rec else ''}) lr {rec['lr']:.2e} "
                    f"{rec['images_per_s']:.1f} img/s")

    def probe(self) -> None:
        """The dense probe on the EMA teacher, on every rank (a sharded teacher needs them all for its forward);
        rank 0 records it."""
        probe, run = self.parts.probe, self.run
        if probe is None:
            return
        t0 = time.perf_counter()
        res = probe(self.parts.meta.teacher["backbone"], run.device)
        if not run.main:
            return
        run.write_metrics({"kind": "probe", "step": self.step, **res, "data": probe.info["source"],
                           "seconds": round(time.perf_counter() - t0, 2)})
        run.progress.event("probe", step=self.step, **res)
        run.status.update(metrics=res)

    def checkpoint(self) -> None:
        """checkpoints/latest.pt (full state, gathered on rank 0: every rank takes part), a kept snapshot every
        `keep_every` steps, the EMA teacher's backbone exported to RUN_DIR/backbone, curves.png."""
        parts, run, cfg, step = self.parts, self.run, self.cfg, self.step
        model_sd, optim_sd = full_state(parts.meta, parts.optimizer)
        if run.main:
            state = {"format": FORMAT, "step": step, "stage": cfg.stage, "model_config": parts.mcfg.to_dict(),
                     "meta": model_sd, "optimizer": optim_sd, "rng": rng_states(), "micro_batch": self.micro_step.micro,
                     "collapse": self.collapse, "data_position": {"step": step, "seed": cfg.seed},
                     "config": cfg.to_dict()}
            with atomic_path(parts.latest, suffix=".pt") as tmp:
                torch.save(state, tmp)
            if is_kept(cfg, step):
                keep_snapshot(parts.latest, step)
            from .export import export_backbone
            export_backbone(run.run_dir / "backbone", strip_prefix(model_sd, "teacher.backbone."), parts.mcfg,
                            cfg.name or run.run_dir.name, stage=cfg.stage, step=step, base=parts.base_info,
                            data=parts.index.summary())
            run.progress.event("checkpoint", step=step, path=str(parts.latest), backbone=str(run.run_dir / "backbone"))
            plot_curves(run.metrics_path, run.run_dir / "curves.png")
        D.barrier(run.dist_info)

    def finish(self, stopped: bool) -> dict:
        """The run's end: the last probe (when the last step had none), the last checkpoint, every rank's weight
        checksum, the final status and event. Returns the final status ({} on ranks other than 0)."""
        run, cfg = self.run, self.cfg
        if not stopped and cfg.probe_every and self.step % cfg.probe_every:
            self.probe()
        self.checkpoint()
        checksums = run.rank_checksums(self.parts.meta.student.parameters())  # curves.png: drawn by checkpoint()
        warned = self.collapse["warned"]
        final = run.finish(stopped, self.step, self.parts.latest, {"rank_checksums": checksums, "collapse": warned},
                           {"backbone": str(run.run_dir / "backbone"), "rank_checksums": checksums,
                            "collapse": warned})
        # every rank leaves together: no rank tears down its process group (and the sharded modules on it) while
        # another is still writing the end of the run
        D.barrier(run.dist_info)
        return final
