"""How many images a run's forward takes at once: the micro-batch, its sizing before the first step, and the
out-of-memory back-off during the run; and the autocast precision.

The policy, the same for `train` and `pretrain`: the per-rank micro-batch is the least of the configured one (default:
the whole per-rank batch), the one a resumed checkpoint ran at, and the one `memory.size_micro_batch` measures to fit.
A CUDA out-of-memory during a step halves it (down to 1 image) and redoes the step; gradient accumulation keeps the
configured batch, so results do not depend on the machine.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..memory import BatchDoesNotFit, MicroBatchChoice, size_micro_batch
from .. import distributed as D

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of option `amp` ("auto": bf16 on CUDA, none elsewhere; "bf16", "fp16", "none")."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    return AMP_DTYPES[mode]


def amp_name(dtype: torch.dtype | None) -> str:
    """How config.json records the autocast dtype: "bfloat16", "float16" or "fp32"."""
    return str(dtype).replace("torch.", "") if dtype else "fp32"


def start_micro_batch(configured: int | None, per_rank: int, resumed: int | None = None) -> int:
    """The micro-batch before sizing: the configured one (None: the whole per-rank batch), at most the per-rank
    batch and the one a resumed run had halved down to."""
    micro = min(configured or per_rank, per_rank)
    return micro if resumed is None else min(int(resumed), micro)


def fit_micro_batch(module: torch.nn.Module, params: list, optimizer, forward_backward: Callable[[int], None],
                    per_rank: int, device: torch.device, configured: int | None, batch_size, dist_info,
                    grad_copies: int, error: type[Exception], log, whole_step: Callable[[], None] | None = None
                    ) -> MicroBatchChoice:
    """The micro-batch that fits this device (`memory.size_micro_batch`, decided together by every rank), logged.

    `forward_backward(k)`: one forward and backward of k images as the run's steps do them; `grad_copies`: extra
    gradient-sized buffers (DDP's buckets); `whole_step`: a part of the step that is not split by micro-batches.
    A batch that cannot fit even one image at a time raises `error` (one line) before any step.
    """
    try:
        fit = size_micro_batch(module, params, optimizer, forward_backward, per_rank, device, configured,
                               f"batch_size {batch_size}", grad_copies=grad_copies,
                               gather=lambda obj: D.all_gather_object(obj, dist_info), whole_step=whole_step)
    except BatchDoesNotFit as e:
        raise error(str(e)) from None
    log(f"micro-batch {fit.micro_batch} x {fit.accumulation} accumulation: {fit.reason}")
    return fit


def halve_micro_batch(micro: int, device: torch.device) -> int | None:
    """After an out-of-memory (the step's gradients already dropped): PyTorch's cached blocks given back and the
    halved micro-batch, or None at 1 image (nothing left to halve: the caller reports the error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(1, micro // 2) if micro > 1 else None


def oom_event(progress, step: int, micro: int, per_rank: int) -> None:
    """The `oom` progress event: the new micro-batch and the gradient accumulation that keeps the batch."""
    progress.event("oom", step=step, micro_batch=micro, accumulation=math.ceil(per_rank / micro))
