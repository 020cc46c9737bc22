"""torchrun / DDP plumbing shared by training, pretraining and cohort segmentation: rank discovery, process group,
rank-0 decisions, collectives that are no-ops in a single process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .engine import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(ValueError):
    """The requested device does not exist here (unknown name, no CUDA, no such GPU)."""


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = resolve_device(device)  # the engine's check: unknown name, no CUDA (or MPS), no such GPU
    except (ValueError, RuntimeError, TypeError) as e:
        raise DeviceError(str(e)) from None
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return info, dev


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (stop requests)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_main(decide, errors: tuple[type[Exception], ...], info: DistInfo):
    """(result of `decide()` on rank 0, or None; the message of one of `errors` it raised, or None) on every rank:
    a decision read from rank 0's files (status.json) then never differs between ranks."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except errors as e:
            error = str(e)
    return broadcast_object((result, error), info)


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when ``t`` is a sharded DTensor (FSDP2; a collective, so every
    rank calls it), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
