"""One pretraining step over micro-batches, with the semantics of the whole step's batch.

Why: every batch-level statistic of DINOv2/DINOv3 (Sinkhorn-Knopp's equal mass per prototype, the DINO centre,
KoLeo's nearest neighbours, the collapse monitor) is defined over the step's batch. Splitting the student's forward
into micro-batches (to fit memory, or after an out-of-memory) must not change them. So a step runs:

1. the teacher over all of the step's images (no gradients, in chunks of the micro-batch), then Sinkhorn /
   centring over the whole step (and over every process);
2. when the step is split, KoLeo over the whole step (``SSLMetaArch.koleo_gradient``);
3. the student, one micro-batch at a time, against its slice of those targets; gradients accumulate to the whole
   step's.

Out of memory, several processes: every rank must make the same collective calls in the same order, so no rank may
change its micro-batch alone. The teacher pass and the student micro-batches are local computations (no collective
under DDP); after each, the ranks all-reduce an "out of memory here" flag, and if any rank ran out they all halve the
micro-batch and redo that part together. Under FSDP the forward itself gathers parameters across ranks, so a rank that
runs out mid-forward cannot be re-synchronised: the run stops with a clear error instead (torchrun then ends the
others) rather than hanging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import distributed as D
from ..runs.batch import halve_micro_batch
from .meta_arch import KOLEO_CROPS, SSLMetaArch, StepTargets


class OutOfMemoryStop(RuntimeError):
    """Out of memory where the ranks cannot back off together (sharded model), or already at one image."""


def select_images(batch: dict, masks: torch.Tensor, b: int, j0: int, j1: int, n_local: int):
    """Rows of images j0:j1 from view-major global (2b, ...) / local (n b, ...) / masks (2b, N) / Gram-teacher crops
    (2b, ..., or None when the batch has none)."""
    def rows(x: torch.Tensor, views: int) -> torch.Tensor:
        return torch.cat([x[v * b + j0:v * b + j1] for v in range(views)])

    loc = rows(batch["local"], n_local) if n_local else batch["local"]
    gram = rows(batch["gram"], 2) if "gram" in batch else None
    return rows(batch["global"], 2), loc, rows(masks, 2), gram


@dataclass
class MicroBatchStep:
    """Runs steps of ``per_rank`` images per process in micro-batches of ``micro`` (halved together on OOM).

    ``autocast``: a context factory for the forward passes; ``on_halve(micro)``: called on every rank after a
    collective halving (logging); ``sharded``: FSDP (no back-off, see the module docstring).
    """

    meta: SSLMetaArch
    per_rank: int
    micro: int
    n_local: int
    dist_info: D.DistInfo
    device: torch.device
    autocast: Callable
    sharded: bool = False
    on_halve: Callable[[int], None] | None = None

    def _collectively(self, part: Callable[[], object], what: str):
        """Run ``part`` until no rank runs out of memory in it, halving the micro-batch on every rank together."""
        while True:
            result, oom = None, False
            try:
                result = part()
            except torch.cuda.OutOfMemoryError:
                if self.sharded:
                    raise OutOfMemoryStop(self._stop_message(what)) from None
                oom = True
            if not D.any_true(oom, self.dist_info, self.device):
                return result
            self.meta.student.zero_grad(set_to_none=True)
            result = None
            halved = halve_micro_batch(self.micro, self.device)
            if halved is None:
                raise OutOfMemoryStop(self._stop_message(what))
            self.micro = halved
            if self.on_halve is not None:
                self.on_halve(self.micro)

    def _stop_message(self, what: str) -> str:
        if self.sharded:
            return (f"out of memory in the {what} under parallel=fsdp at micro-batch {self.micro}: sharded ranks "
                    "cannot back off together; start again with a smaller micro_batch")
        return f"out of memory in the {what} even at micro-batch 1: use a smaller model, crops or batch_size"

    def targets(self, batch: dict, masks: torch.Tensor, teacher_temp: float) -> StepTargets:
        """The teacher side of the step, computed once for the whole step."""
        with self.autocast():
            logits = self._collectively(lambda: self.meta.teacher_logits(batch["global"], masks, self.micro),
                                        "teacher forward")
        return self.meta.targets_from_logits(*logits, masks, teacher_temp)

    def student(self, batch: dict, masks: torch.Tensor, targets: StepTargets) -> dict:
        """Backward of the student's losses over the step's micro-batches (gradients accumulate); the step's
        statistics, each a whole-step value."""

        def run() -> dict:
            stats: dict = {}
            micro = self.micro
            split = micro < self.per_rank
            if split and targets.koleo_grad is None:  # KoLeo over the whole step (kept if this part is redone)
                with self.autocast():
                    targets.koleo, targets.koleo_grad = self.meta.koleo_gradient(batch["global"], masks, micro)
            for j0 in range(0, self.per_rank, micro):
                j1 = min(self.per_rank, j0 + micro)
                share = (j1 - j0) / self.per_rank
                g, loc, m, gram = select_images(batch, masks, self.per_rank, j0, j1, self.n_local)
                part = targets.images(self.per_rank, j0, j1) if split else targets
                with self.autocast():
                    loss, part_stats = self.meta.student_losses(g, loc, m, part, share, gram)
                loss.backward()
                for k, v in part_stats.items():
                    stats[k] = stats.get(k, 0.0) + v * share
            if split:
                stats["koleo"] = targets.koleo
            return stats

        stats = self._collectively(run, "student forward/backward")
        weights = self.meta.weights
        stats["loss"] = sum(weights[k] * stats[k] for k in ("dino", "ibot", "gram") if k in stats) + \
            weights["koleo"] * KOLEO_CROPS * stats["koleo"]
        return {**targets.stats, **stats}

    def __call__(self, batch: dict, masks: torch.Tensor, teacher_temp: float) -> dict:
        """One step's forward and backward (gradients left in ``.grad``, not yet reduced over ranks)."""
        return self.student(batch, masks, self.targets(batch, masks, teacher_temp))
