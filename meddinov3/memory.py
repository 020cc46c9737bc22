"""How much memory a job may still take, and how many images fit in one forward and backward (the micro-batch).

Why: on a CPU, running out of host memory is not an exception a loop can catch: the kernel's OOM killer ends the
process without a word. So `train` and `pretrain` measure what one image costs on two small probe micro-batches (1 and up to 4 images)
before their first step, and choose the micro-batch from what the device has left; gradient accumulation keeps the
configured batch, so results do not depend on the machine. A batch that cannot fit even one image at a time is a
one-line `BatchDoesNotFit` error before any step.

Rules (also in the README):
- host (CPU jobs; segment on MPS, whose memory is the host's): the least of MemAvailable minus a reserve for the OS and the
  programs beside us, Slicer included (max(1 GiB, 10 % of the machine's memory)), the room under this process's
  cgroup memory limit, and the room under its RLIMIT_AS / RLIMIT_DATA;
- CUDA: the free memory (plus what PyTorch holds cached) minus max(1 GiB, 10 % of the card).
On a CPU the micro-batch is at most 8 images: larger ones are no faster and only take memory.
The measured per-image cost is taken with a safety factor of 1.25 (allocator fragmentation, differences between
batches).
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

GIB = 2**30
SAFETY = 1.25  # measured per-image cost x this
HOST_RESERVE_FRACTION = 0.10  # of the machine's memory, kept for the OS and other programs (Slicer)
MIN_RESERVE = GIB
CPU_MICRO_CAP = 8  # on a CPU a larger micro-batch is no faster (the cores are busy at 8) and only takes memory


class BatchDoesNotFit(Exception):
    """Even a micro-batch of one image does not fit in the memory left: the message has the numbers."""


@dataclass(frozen=True)
class Budget:
    """Bytes a job may still allocate on a device, and where that number comes from."""

    bytes: int
    reason: str


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux), else psutil's numbers when psutil is installed, else {}."""
    try:
        out = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
        return out
    except (OSError, ValueError, IndexError):
        try:
            import psutil
        except ImportError:
            return {}
        vm = psutil.virtual_memory()
        return {"MemTotal": int(vm.total), "MemAvailable": int(vm.available)}


def proc_status(key: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, VmSize, VmData) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 memory.max, v1 memory.limit_in_bytes); None if
    unlimited or unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files = (Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            files = (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder, limit_name, usage_name = files
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:
            return int(limit) - usage
    return None


def _rlimit_room() -> tuple[int, str] | None:
    """Bytes left under RLIMIT_AS (virtual size) or RLIMIT_DATA (private writable memory), the tighter one."""
    try:
        import resource  # POSIX only (not on Windows)
    except ImportError:
        return None
    rooms = []
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        used = proc_status(used_key)
        if soft != resource.RLIM_INFINITY and used is not None:
            rooms.append((soft - used, f"{name} {gib(soft)} - {used_key} {gib(used)}"))
    return min(rooms) if rooms else None


def host_budget() -> Budget:
    """Host memory this process may still allocate (see the module docstring for the rule)."""
    info = _meminfo()
    candidates = []
    if "MemAvailable" in info:
        reserve = max(MIN_RESERVE, int(HOST_RESERVE_FRACTION * info.get("MemTotal", 0)))
        candidates.append((info["MemAvailable"] - reserve,
                           f"MemAvailable {gib(info['MemAvailable'])} - reserve {gib(reserve)} for the OS and Slicer"))
    room = _cgroup_room()
    if room is not None:
        candidates.append((room, f"cgroup memory limit room {gib(room)}"))
    limited = _rlimit_room()
    if limited is not None:
        candidates.append(limited)
    if not candidates:
        return Budget(2**62, "host memory unknown on this platform")
    n, why = min(candidates)
    return Budget(max(0, n), why)


def device_budget(device: torch.device) -> Budget:
    """Memory a job may still allocate on `device`: free VRAM less a reserve on CUDA, else the host's budget."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch
        reserve = max(MIN_RESERVE, int(HOST_RESERVE_FRACTION * total))
        return Budget(max(0, free - reserve), f"free VRAM {gib(free)} - reserve {gib(reserve)}")
    return host_budget()


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS measures what is in use."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_host_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_growth(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory growth (bytes) on `device` while `fn()` runs; None where it cannot be measured (MPS; a host
    without /proc). CUDA: PyTorch's peak allocation; CPU: the process's peak resident set (VmHWM) over its RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    release_host_memory()
    before = proc_status("VmRSS")
    if before is None or not _reset_host_peak():
        return None
    fn()
    return max(0, (proc_status("VmHWM") or before) - before)


@dataclass(frozen=True)
class MicroBatchChoice:
    """The micro-batch a job runs, the gradient accumulation that keeps its batch, and why (logged, recorded)."""

    micro_batch: int
    accumulation: int
    reason: str
    per_image_gb: float | None = None
    fixed_gb: float | None = None
    budget_gb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_image_cost(run: Callable[[int], None], device: torch.device, sizes: tuple[int, int] = (1, 4)
                       ) -> tuple[int, int] | None:
    """(bytes per image, fixed bytes) of one forward and backward, from its peak growth at two micro-batch sizes;
    None where memory cannot be measured. `run(k)` does the forward and backward of k images (gradients already
    allocated, so they are not counted). The cost per image is the larger of the slope between the two sizes and
    the whole growth at the larger size per image: on a CPU the first, small probe can reuse memory the allocator
    still holds, which makes the slope alone too low (measured: half the true cost)."""
    k1, k2 = sizes
    d1 = peak_growth(lambda: run(k1), device)
    if d1 is not None:  # the larger probe must fit too: at most what fits at the first probe's cost per image
        k2 = max(k1, min(k2, int(device_budget(device).bytes / SAFETY // max(1, d1 / k1))))
    try:
        d2 = None if d1 is None or k1 == k2 else peak_growth(lambda: run(k2), device)
    except torch.OutOfMemoryError:  # (CUDA) the larger probe did not fit after all
        if device.type == "cuda":
            torch.cuda.empty_cache()
        d2 = None
    if d1 is None:
        return None
    if d2 is None:  # one size only: all of its growth is the images' (an overestimate)
        return int(d1 / k1), 0
    per_image = max((d2 - d1) / (k2 - k1), d2 / k2)
    return int(per_image), int(max(0, d1 - k1 * per_image))


ALLOCATION_ERRORS = (torch.OutOfMemoryError, MemoryError, RuntimeError)


def raise_unless_allocation_failure(error: BaseException) -> None:
    """Re-raise `error` (one of ALLOCATION_ERRORS) unless it is a failed allocation: only that means "does not
    fit" (on a CPU PyTorch raises a RuntimeError saying it cannot allocate memory)."""
    if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "allocate memory" not in str(error):
        raise error


def choose_micro_batch(per_rank: int, run: Callable[[int], None], device: torch.device, pending_bytes: int,
                       configured: int | None, what: str, min_micro: int = 1) -> MicroBatchChoice:
    """The largest micro-batch (at most `per_rank`, at least `min_micro`) whose measured cost fits the device.

    `run(k)`: forward and backward of k images (see `measure_image_cost`); `pending_bytes`: memory the job will
    still allocate outside the forward and backward (optimiser state); `configured`: a micro-batch the user set
    (used as given, not measured); `what` names the batch in messages. Raises `BatchDoesNotFit`.
    """
    def accumulation(m: int) -> int:
        return math.ceil(per_rank / m)

    if configured:
        m = min(int(configured), per_rank)
        return MicroBatchChoice(m, accumulation(m), f"micro_batch {configured} set in the configuration")
    sizes = (min_micro, min(per_rank, 4 * min_micro))
    try:
        cost = measure_image_cost(run, device, sizes)
    except ALLOCATION_ERRORS as e:
        raise_unless_allocation_failure(e)
        raise BatchDoesNotFit(f"{what} cannot fit on {device}: {min_micro} image(s) ran out of memory in a forward "
                              "and backward; use a smaller model, crop or image size, or free memory") from None
    if device.type == "cpu":
        release_host_memory()
    elif device.type == "cuda":
        torch.cuda.empty_cache()
    if cost is None:
        return MicroBatchChoice(per_rank, 1, f"memory cannot be measured on {device.type}: the whole {what}")
    per_image, fixed = cost
    budget = device_budget(device)
    need_fixed = fixed + pending_bytes
    fits = int((budget.bytes - need_fixed) // max(1, SAFETY * per_image))
    numbers = dict(per_image_gb=round(per_image / GIB, 3), fixed_gb=round(need_fixed / GIB, 3),
                   budget_gb=round(budget.bytes / GIB, 3))
    if fits < min_micro:
        raise BatchDoesNotFit(
            f"{what} cannot fit on {device}: {min_micro} image(s) need {gib(min_micro * SAFETY * per_image)} "
            f"(measured {gib(per_image)} per image x {SAFETY}) plus {gib(need_fixed)} for gradients and optimiser "
            f"state, but only {gib(budget.bytes)} are free ({budget.reason}); use a smaller model, crop or image "
            "size, or free memory")
    cap = CPU_MICRO_CAP if device.type == "cpu" else per_rank
    m = min(per_rank, fits, cap)
    reason = (f"{gib(per_image)} per image measured, {gib(need_fixed)} fixed, {gib(budget.bytes)} free "
              f"({budget.reason}): {m} of {per_rank} image(s) per forward"
              f"{f' (at most {cap} on a CPU)' if m == cap < min(per_rank, fits) else ''}")
    return MicroBatchChoice(m, accumulation(m), reason, **numbers)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (its shard under FSDP2, whose parameters are DTensors)."""
    return p.to_local() if hasattr(p, "to_local") else p


def step_state_bytes(params: list, optimizer: torch.optim.Optimizer, grad_copies: int = 0) -> int:
    """Bytes a training step allocates beyond its forward, backward and gradients: `grad_copies` more copies of the
    gradients (flattened for an all-reduce) and, before the first step, AdamW's two moments."""
    n = sum(_local(p).numel() * _local(p).element_size() for p in params)
    moments = 0 if optimizer.state else 2 * n
    return grad_copies * n + moments


def _whole_step_bytes(whole_step: Callable[[], None], device: torch.device, what: str) -> int:
    """Peak growth of the part of a step that does not shrink with the micro-batch (0 where not measurable)."""
    try:
        return peak_growth(whole_step, device) or 0
    except ALLOCATION_ERRORS as e:
        raise_unless_allocation_failure(e)
        raise BatchDoesNotFit(f"{what} cannot fit on {device}: the part of a step that covers the whole batch "
                              "(pretraining's teacher targets) ran out of memory at any micro-batch; use a smaller "
                              "batch_size or fewer prototypes (head out_dim), or free memory") from None


def size_micro_batch(module: torch.nn.Module, params: list, optimizer: torch.optim.Optimizer,
                     forward_backward: Callable[[int], None], per_rank: int, device: torch.device,
                     configured: int | None, what: str, grad_copies: int = 0,
                     gather: Callable[[object], list] | None = None,
                     whole_step: Callable[[], None] | None = None) -> MicroBatchChoice:
    """`choose_micro_batch` for a training loop, leaving no trace: the probe runs with gradients allocated (so they
    count as state, not per image), and afterwards gradients are dropped and `module`'s buffers (running centres)
    and the RNG states are put back. `forward_backward(k)`: forward and backward of k images. `gather`: all ranks'
    results (`all_gather_object`) in a distributed job, which then all take the smallest micro-batch (FSDP needs
    the same number of backward passes on every rank). `whole_step()`: the part of a step that works on all of the
    rank's images whatever the micro-batch (pretraining's teacher targets): measured once and counted in full.
    Raises `BatchDoesNotFit` on every rank when one cannot fit.
    """
    result: object
    if configured:
        result = choose_micro_batch(per_rank, forward_backward, device, 0, configured, what)
    else:
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        try:
            fixed = _whole_step_bytes(whole_step, device, what) if whole_step is not None else 0
            result = choose_micro_batch(per_rank, forward_backward, device,
                                        step_state_bytes(params, optimizer, grad_copies) + fixed, None, what)
        except BatchDoesNotFit as e:
            result = e
        finally:
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
    results = gather(result) if gather else [result]
    errors = [r for r in results if isinstance(r, BatchDoesNotFit)]
    if errors:
        raise errors[0]
    return min(results, key=lambda r: r.micro_batch)


def peak_gpu_memory_gb(device) -> float | None:
    """Peak memory PyTorch has reserved on a CUDA device in this process (GiB): what training reports so the
    Slicer module can show it without querying the GPU itself. None on other devices."""
    if getattr(device, "type", None) != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
