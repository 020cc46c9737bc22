"""The fine-tuning loop: config in, RUN_DIR out. No subclasses: every option is a `TrainConfig` field.

RUN_DIR: config.json (resolved config, data summary, base, seed, versions), checkpoints/{latest,best}.pt,
metrics.jsonl, curves.png, model/ (a package the engine uses directly, exported from the best validation),
status.json. Works alone, under torchrun (DDP; rank 0 writes), resumes after kill -9, and stops cleanly on
SIGTERM / SIGINT. The run folder, status, signals, metrics and micro-batch policy are `meddinov3.runs`'; this module
holds what is particular to fine-tuning, in the order a run goes through it: prepare -> build -> restore -> loop ->
finish (`FineTuning`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed as D
from ..data.augment import augment
from ..data.cache import SliceCache
from ..data.dataset import DatasetError, check_dataset, load_dataset
from ..data.prefetch import Prefetcher
from ..data.sampler import PatchSampler
from ..files import atomic_path, write_json
from ..memory import MicroBatchChoice, peak_gpu_memory_gb
from ..runs.batch import amp_dtype, amp_name, fit_micro_batch as fit_run_micro_batch, halve_micro_batch, oom_event, \
    start_micro_batch
from ..runs.session import RunKind, RunSession, versions
from .checkpoint import load_state, save_state, set_rng_states
from .config import TrainConfig, TrainError
from .curves import plot_curves
from .losses import DiceCELoss
from .optim import freeze_blocks, make_optimizer, make_scheduler
from .plan import (build_network, cross_validation_splits, default_patch, make_spec, package_postprocessing,
                   prepare_cache, split_cases)
from .validation import validate

logger = logging.getLogger(__name__)

TRAIN_RUN = RunKind("train", TrainConfig, TrainError, (TrainError, DatasetError), output="model",
                    total=lambda cfg: cfg.total_steps, quiet_with_json=True,
                    longer="to train longer, start a new run with --base {run_dir} (it keeps the decoder)")


def train(cfg: TrainConfig, resume: bool = False, json_progress: bool = False, stream=None,
          explicit: dict | None = None) -> dict:
    """Fine-tune a segmentation network on a dataset folder into the run folder `cfg.out`, or resume that run.

    Args:
        cfg: every option of the run (`TrainConfig`); with `resume` only its `out` and `device` count, the rest
            comes from the run's config.json.
        resume: continue the run in `cfg.out` from checkpoints/latest.pt (after a stop, a crash or kill -9).
        json_progress: write progress events (started, step, validation, checkpoint, finished...) as JSON lines to
            `stream` (default stdout) instead of a progress bar: what the Slicer Train module reads.
        explicit: with `resume`, the options the user gave; refused when they differ from the saved ones.

    Returns:
        The final status.json content on rank 0 (`state` "finished" or "stopped", `step`, `metrics` with the best
        validation, `rank_checksums`), {} on the other ranks of a torchrun job. A run that already finished
        returns its status unchanged.

    Raises:
        TrainError / DatasetError: a problem the user can fix (options, run folder, data), with a one-line message
        that status.json also records.
    """
    with RunSession(TRAIN_RUN, cfg, resume, json_progress, stream, explicit) as run:
        if run.finished:
            return run.previous
        return FineTuning(run).run()
    return run.result()  # stopped during the start-up


def forward_loss(model, criterion, adt, device_type: str, compile: bool = False):
    """`(images, labels) -> loss`: the network under autocast, then the loss; `compile`: one torch.compile'd function
    (dynamic=False). The function is compiled, not the module, so state_dicts keep their keys (no `_orig_mod.`).
    On CUDA, cuDNN times its convolution algorithms once (every step has the same shapes; nnU-Net does the same)."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True

    def run(xs, ys):
        with torch.autocast(device_type, dtype=adt, enabled=adt is not None):
            logits = model(xs)
        return criterion(logits, ys)[0]

    return torch.compile(run, dynamic=False) if compile else run


def fit_micro_batch(model, net, optimizer, criterion, adt, patch, per_rank: int, cfg: TrainConfig,
                    device: torch.device, dist_info, log) -> MicroBatchChoice:
    """The micro-batch that fits this device (memory.size_micro_batch), measured on patches of the run's size
    through the uncompiled forward (a compiled one would compile for each probe size; it needs less memory)."""
    run = forward_loss(model, criterion, adt, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=adt == torch.float16)

    def forward_backward(k: int) -> None:
        x = torch.zeros(k, 1, *patch, device=device)
        y = torch.zeros(k, *patch, dtype=torch.long, device=device)
        scaler.scale(run(x, y)).backward()

    params = [p for p in net.parameters() if p.requires_grad]
    return fit_run_micro_batch(net, params, optimizer, forward_backward, per_rank, device, cfg.micro_batch,
                               cfg.batch_size, dist_info, 1 if dist_info.enabled else 0, TrainError, log)


def training_patch(cfg: TrainConfig, cache: SliceCache, multiple: int) -> tuple[int, int]:
    """The patch the network trains on: `resolution` squared, the configured one, or the default from the slices."""
    patch = (cfg.resolution,) * 2 if cfg.resolution else \
        tuple(cfg.patch_size) if cfg.patch_size else default_patch(cache.slice_shapes, multiple)
    if any(p % multiple for p in patch):
        raise TrainError(f"patch_size {list(patch)} must be a multiple of the network's patch size {multiple}")
    return patch


class StepMeter:
    """Loss and throughput between two log lines (the loss stays on the device: no sync per step)."""

    def __init__(self):
        self.start, self.images, self.loss, self.steps = time.perf_counter(), 0, 0.0, 0

    def add(self, images: int, loss) -> None:
        self.images, self.loss, self.steps = self.images + images, self.loss + loss, self.steps + 1

    def read(self) -> tuple[float, float]:
        """(mean loss, images per second) since the last read, which starts the next interval."""
        now = time.perf_counter()
        result = float(self.loss) / self.steps, self.images / max(now - self.start, 1e-9)
        self.start, self.images, self.loss, self.steps = now, 0, 0.0, 0
        return result


class FineTuning:
    """One process's part in a fine-tuning run, in the order the run goes: `prepare` (data, split, network, slice
    cache), `build` (optimiser, schedule, sampler), `restore` (a resumed run's checkpoint), `fit` (micro-batch,
    config.json), `loop`, `finish`. Every rank computes; rank 0 writes and reports."""

    def __init__(self, run: RunSession):
        self.session, self.cfg = run, run.cfg
        self.main, self.device, self.dist_info = run.main, run.device, run.dist_info
        self.run_dir, self.log = run.run_dir, run.log
        self.latest = run.run_dir / "checkpoints" / "latest.pt"
        self.step, self.best = 0, {"mean_dice": -1.0, "step": None, "dice": {}}
        self.images_per_s = None

    def run(self) -> dict:
        """The whole run; the final status (rank 0) or {}."""
        self.prepare()
        self.build()
        self.restore()
        self.fit()
        return self.finish(stopped=self.loop())

    # ---- prepare -> build -> restore -> fit

    def prepare(self) -> None:
        """The dataset, its split and the network, checked before the slow work; then the slice cache (built by
        rank 0, opened by every rank) and the global batch size."""
        cfg = self.cfg
        self.ds = load_dataset(cfg.data)
        self.postprocessing = package_postprocessing(cfg, self.ds)
        self.train_names, self.val_names = split_cases(self.ds, cfg)
        self.class_names = [n for _, n in self.ds.class_names()]
        torch.manual_seed(cfg.seed)
        self.net, self.base_info = build_network(cfg, len(self.class_names), self.class_names,
                                                 logger.info if self.main else (lambda m: None))
        self.cache, self.batch_size = self._slice_cache()

    def _slice_cache(self) -> tuple[SliceCache, int]:
        cfg, ds = self.cfg, self.ds
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else None
        if cache_root is None:
            from ..resources import user_dir
            cache_root = user_dir() / "cache" / "slices"

        def decide() -> tuple[str, int]:
            info = check_dataset(ds)
            absent = [f"{name!r} ({value})" for value, name in ds.class_names()
                      if value and not any(value in info[n]["values"] for n in self.train_names)]
            if absent:  # nnU-Net trains on such data too, but the class can only be learnt as absent
                logger.warning(f"label(s) {', '.join(absent)} have no voxels in any training case")
            folder, batch_size = prepare_cache(ds, self.train_names, cache_root, cfg, self.net.config.patch_size,
                                               self.log)
            return str(folder), batch_size

        decided, error = D.decide_on_main(decide, (DatasetError, ValueError), self.dist_info)
        if error:
            raise DatasetError(error)
        folder, batch_size = decided
        return SliceCache(Path(folder)), batch_size

    def build(self) -> None:
        """The network on its device, optimiser, schedule, loss, precision and this rank's patch sampler."""
        cfg, net, device = self.cfg, self.net, self.device
        net.backbone.mask_token.requires_grad_(False)  # pretraining only
        self.n_frozen = freeze_blocks(net, cfg.freeze_blocks)
        net.to(device)
        self.patch = training_patch(cfg, self.cache, net.config.patch_size)
        self.optimizer = make_optimizer(net, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg.total_steps,
                                        cfg.steps_per_epoch if cfg.lr_per_epoch else None)
        self.adt = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.adt == torch.float16)
        self.criterion = DiceCELoss(*cfg.loss_weights)
        self.aug_cfg = cfg.augment_config
        world = self.dist_info.world_size
        if self.batch_size % world:
            raise TrainError(f"batch_size {self.batch_size} is not divisible by the {world} processes")
        self.per_rank = self.batch_size // world
        self.micro = start_micro_batch(cfg.micro_batch, self.per_rank)
        self.sampler = PatchSampler(self.cache.cases, self.aug_cfg.sampled_patch(self.patch), self.per_rank,
                                    cfg.foreground_oversampling, cfg.seed, self.dist_info.rank, world,
                                    cfg.case_sampling)
        self.pad_value = float(np.median([c.pad_value for c in self.cache.cases]))

    def restore(self) -> None:
        """A resumed run's state from checkpoints/latest.pt: weights, optimiser, schedule, RNG, step, best."""
        if not (self.session.resume and self.latest.is_file()):
            return
        state = load_state(self.latest)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        self.step, self.best = int(state["step"]), state["best"]
        self.micro = start_micro_batch(self.micro, self.per_rank, state.get("micro_batch"))
        self.log(f"resumed from {self.latest} at step {self.step}")

    def fit(self) -> None:
        """DDP around the network, the micro-batch that fits, and what the run folder records of them."""
        self.model = self.net
        if self.dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.net, device_ids=[self.device] if self.device.type == "cuda" else None)
        fit = fit_micro_batch(self.model, self.net, self.optimizer, self.criterion, self.adt, self.patch,
                              self.per_rank, self.cfg, self.device, self.dist_info, self.log)
        self.micro = min(self.micro, fit.micro_batch)
        self.session.restart_metrics(self.step)
        if self.main:
            self.session.status.update(batch=fit.to_dict())
            if not self.session.resume:
                self._write_config(fit)
        self.spec = make_spec(self.cfg, self.net.config, self.ds, self.cache, self.patch, self.postprocessing,
                              {"base": self.base_info, "dataset": self.ds.source, "training_cases": self.train_names,
                               "validation_cases": self.val_names, "seed": self.cfg.seed,
                               "total_steps": self.cfg.total_steps})

    def _write_config(self, fit: MicroBatchChoice) -> None:
        """config.json: the options, what they resolved to, the data and the software (and splits_final.json)."""
        cfg, cache = self.cfg, self.cache
        resolved = {
            "model": self.net.config.to_dict(), "patch_size": list(self.patch), "spacing": list(cache.spacing),
            "normalization": cache.normalization, "statistics": cache.statistics, "cache": str(cache.folder),
            "total_steps": cfg.total_steps, "batch_size": self.batch_size, "per_rank_batch": self.per_rank,
            "world_size": self.dist_info.world_size, "device": str(self.device), "amp": amp_name(self.adt),
            "frozen_parameters": self.n_frozen, "augment": self.aug_cfg.to_dict(), "base": self.base_info,
            "batch": fit.to_dict(), "training_cases": self.train_names, "validation_cases": self.val_names}
        write_json(self.run_dir / "config.json", {"train": cfg.to_dict(), "resolved": resolved,
                                                  "data": self.ds.summary(), "versions": versions()})
        splits = cross_validation_splits(self.ds, cfg)
        if splits is not None:  # nnU-Net's format: the folds this run's fold came from
            write_json(self.run_dir / "splits_final.json", splits)

    # ---- loop

    def loop(self) -> bool:
        """Train to the last step or a stop request (True), validating and checkpointing on the way."""
        cfg, session = self.cfg, self.session
        session.stopper.install()
        self.step_fn = forward_loss(self.model, self.criterion, self.adt, self.device.type, cfg.compile)
        self._announce_start()
        self.model.train()
        meter, stopped = StepMeter(), False
        # the next batches are drawn while a step runs; the thread ends with the loop (finished, stopped or failed)
        with Prefetcher(self.sampler.sample, self.step, self.device, depth=2 if cfg.prefetch else 0) as batches:
            while self.step < cfg.total_steps:
                step_loss = self._forward_backward(*self._augmented(batches.get(self.step)))
                grad_norm = self._optimizer_step()
                self.step += 1
                meter.add(self.batch_size, step_loss)
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    self._report_step(meter, grad_norm)
                stopped = session.stop_requested()
                self._between_steps(stopped)
                if stopped:
                    session.mark_stopping(self.step)
                    break
        session.stopper.restore()
        return stopped

    def _announce_start(self) -> None:
        if not self.main:
            return
        self.session.status.update(state="running", step=self.step)
        warning = None if self.val_names else ("no validation cases: the final weights are exported to model/ and "
                                               "no best checkpoint is kept")
        if warning:
            logger.warning(warning)
        self.session.progress.event(
            "started", run_dir=str(self.run_dir), total_steps=self.cfg.total_steps, step=self.step,
            resumed=bool(self.session.resume and self.step), device=str(self.device),
            world_size=self.dist_info.world_size, patch_size=list(self.patch), spacing=list(self.cache.spacing),
            training_cases=len(self.train_names), validation_cases=len(self.val_names), warning=warning)

    def _augmented(self, batch):
        x, y = batch
        seed = np.random.default_rng([self.cfg.seed, self.step, self.dist_info.rank, 31]).integers(2 ** 62)
        gen = torch.Generator().manual_seed(int(seed))
        return augment(x, y, gen, self.aug_cfg, self.pad_value, self.patch, len(self.class_names))

    def _forward_backward(self, x, y):
        """The step's gradients over micro-batches (DDP syncs on the last); on a CUDA out-of-memory the
        micro-batch halves and the step starts again. Returns the step's loss (on the device)."""
        while True:
            try:
                self.optimizer.zero_grad(set_to_none=True)
                parts = range(0, self.per_rank, self.micro)
                step_loss = 0.0
                for i, start in enumerate(parts):
                    xs, ys = x[start:start + self.micro], y[start:start + self.micro]
                    last = i == len(parts) - 1
                    ctx = self.model.no_sync() if (self.dist_info.enabled and not last) else contextlib.nullcontext()
                    with ctx:
                        loss = self.step_fn(xs, ys) * (len(xs) / self.per_rank)
                        self.scaler.scale(loss).backward()
                    step_loss += loss.detach()  # stays on the device: no sync per step
                return step_loss
            except torch.cuda.OutOfMemoryError:
                if self.micro <= 1:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                loss = None
                self.micro = halve_micro_batch(self.micro, self.device)
                oom_event(self.session.progress, self.step, self.micro, self.per_rank)
                self.log(f"CUDA out of memory: micro-batch halved to {self.micro} (gradient accumulation keeps the "
                         "batch)")

    def _optimizer_step(self):
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def _report_step(self, meter: StepMeter, grad_norm) -> None:
        """A `step` record in metrics.jsonl, and (rank 0) the step event, status and progress bar or log line."""
        cfg, step, session = self.cfg, self.step, self.session
        loss, self.images_per_s = meter.read()
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        record = {"kind": "step", "step": step, "epoch": step / cfg.steps_per_epoch, "loss": loss,
                  "lr_decoder": lrs.get("decoder", 0.0), "lr_backbone": lrs.get("backbone", 0.0),
                  "grad_norm": float(grad_norm), "images_per_s": round(self.images_per_s, 3),
                  "micro_batch": self.micro, "gpu_memory_gb": peak_gpu_memory_gb(self.device)}
        session.write_metrics(record)
        if not self.main:
            return
        session.progress.event("step", step=step, total=cfg.total_steps, loss=record["loss"],
                               lr=record["lr_decoder"], lr_backbone=record["lr_backbone"],
                               images_per_s=record["images_per_s"])
        session.status.update(step=step, metrics={k: record[k] for k in ("loss", "images_per_s", "gpu_memory_gb")})
        session.progress.update(step, cfg.total_steps, stage="training", loss=round(record["loss"], 4))
        if not session.progress.shows_bar:
            self.log(f"step {step}/{cfg.total_steps} loss {record['loss']:.4f} lr {record['lr_decoder']:.2e} "
                     f"{record['images_per_s']:.1f} images/s")

    def _between_steps(self, stopping: bool) -> None:
        """Checkpoint, epoch event and validation where due (not at the last step, nor when stopping: `finish`
        saves then)."""
        cfg, step = self.cfg, self.step
        more = step < cfg.total_steps and not stopping
        if step % cfg.checkpoint_every == 0 and more:
            self.checkpoint()
        if step % cfg.steps_per_epoch == 0 and self.main:
            self.session.progress.event("epoch", epoch=step // cfg.steps_per_epoch, step=step)
        if step % int(cfg.val_every or cfg.steps_per_epoch) == 0 and more:
            self.run_validation()

    # ---- checkpoints, validation, export

    def _save(self, path: Path, extra: dict | None = None) -> None:
        cfg = self.cfg
        save_state(path, model=self.net, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                   step=self.step, epoch=self.step // cfg.steps_per_epoch, sampler=self.sampler.state_dict(),
                   best=self.best, config=cfg.to_dict(), extra=extra)

    def checkpoint(self) -> None:
        """checkpoints/latest.pt (rank 0), then every rank waits for it."""
        if self.main:
            self._save(self.latest, {"micro_batch": self.micro})
            self.session.progress.event("checkpoint", step=self.step, path=str(self.latest), kind="latest")
        D.barrier(self.dist_info)

    def export(self, weights: dict, dice: dict | None) -> None:
        """model/: the package the engine uses, with these weights and how far they trained."""
        from ..checkpoints import write_package
        prov = {**self.spec.provenance, "trained_steps": self.step, "validation_dice": dice}
        write_package(self.run_dir / "model", self.spec.replace(provenance=prov), [weights], overwrite=True,
                      dtype=torch.float16 if self.cfg.export_dtype == "float16" else None)

    def run_validation(self, final: bool = False) -> dict | None:
        """Validate on the validation cases (rank 0; the others wait); `final`: also keep the predictions in
        validation/ and nnU-Net's summary.json in the run folder (and export these weights with
        export_weights="final")."""
        result = None
        if self.main and self.val_names:
            result = self._validation(final)
            if result["mean_dice"] > self.best["mean_dice"]:
                self._keep_best(result)
            if final and self.cfg.export_weights == "final":
                self.export(self.net.state_dict(), result["dice"])
            self.session.status.update(metrics={"validation_dice": result["dice"], "best": self.best})
        if self.main:
            plot_curves(self.session.metrics_path, self.run_dir / "curves.png")
        D.barrier(self.dist_info)
        return result

    def _validation(self, final: bool) -> dict:
        """Scores of the current weights (`validation.validate`), recorded in metrics.jsonl and reported."""
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        save_to = None
        if final:
            save_to = self.run_dir / "validation"
            save_to.mkdir(exist_ok=True)
        tta = cfg.val_tta is True or (final and cfg.val_tta == "final")
        result = validate(self.net, self.spec, self.ds, self.val_names, self.device, tta, save_to)
        if final:
            from ..evaluation import to_json
            with atomic_path(self.run_dir / "summary.json", suffix=".json") as tmp:
                tmp.write_text(to_json(result["summary"]))
        self.session.write_metrics({"kind": "validation", "step": step, "epoch": step / cfg.steps_per_epoch,
                                    "dice": result["dice"], "mean_dice": result["mean_dice"],
                                    "cases": result["cases"], "seconds": round(time.perf_counter() - t0, 2)})
        self.session.progress.event("validation", step=step, dice=result["dice"], mean_dice=result["mean_dice"])
        self.log(f"step {step}: validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items()))
        return result

    def _keep_best(self, result: dict) -> None:
        """The best validation so far: checkpoints/best.pt, and model/ with export_weights="best"."""
        self.best = {"mean_dice": result["mean_dice"], "step": self.step, "dice": result["dice"]}
        best_path = self.run_dir / "checkpoints" / "best.pt"
        self._save(best_path)
        if self.cfg.export_weights == "best":
            self.export(self.net.state_dict(), result["dice"])
        self.session.progress.event("checkpoint", step=self.step, path=str(best_path), kind="best")

    # ---- finish

    def finish(self, stopped: bool) -> dict:
        """The last checkpoint, the final validation and model/ (finished), or a usable model/ (stopped before any
        validation); the final status."""
        run_dir, best = self.run_dir, self.best
        self.checkpoint()
        if not stopped:
            if self.val_names:
                if best["step"] != self.step:
                    self.run_validation(final=True)
            elif self.main:
                self.export(self.net.state_dict(), None)
        best = self.best
        checksums = self.session.rank_checksums(self.net.parameters())  # every rank's: DDP kept them identical
        if self.main:
            if not stopped and best["step"] is not None and not (run_dir / "model").exists():
                self.export(load_state(run_dir / "checkpoints" / "best.pt")["model"], best["dice"])
            if stopped and not (run_dir / "model").exists():  # stopped before any validation: usable
                self.export(self.net.state_dict(), None)  # as --model / --base now (its provenance says how far)
            plot_curves(self.session.metrics_path, run_dir / "curves.png")
        return self.session.finish(stopped, self.step, self.latest,
                                   {"metrics": {"best": best}, "rank_checksums": checksums},
                                   {"best": best, "model": str(run_dir / "model"), "rank_checksums": checksums,
                                    "images_per_s": self.images_per_s})
