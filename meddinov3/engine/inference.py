"""Slices -> class probabilities: sliding window with Gaussian weights, mirroring TTA, fold averaging, OOM back-off.

Per fold, logits are averaged over mirrored passes and stitched with Gaussian importance weights (nnU-Net's
scheme: step 0.5, sigma 1/8 of the tile), then turned into probabilities by softmax; folds are averaged as
probabilities. Models in nnU-Net's convention (`spec.slicing == "stored"`) get nnU-Net's exact variant: the
Gaussian peaks at n // 2, folds are averaged as logits (`return_logits`), CUDA autocast is float16.
"""

from __future__ import annotations

import itertools
import math
import os
import weakref

import numpy as np
import torch
import torch.nn.functional as F

CPU_BATCH = 4


def gaussian_weights(tile: tuple[int, int], sigma_scale: float = 1 / 8, device=None,
                     nnunet_peak: bool = False) -> torch.Tensor:
    """(h, w) importance map peaking at the tile centre ((n - 1) / 2; at n // 2 with `nnunet_peak`, as nnU-Net's
    `compute_gaussian`), max 1, no zeros."""
    axes = []
    for n in tile:
        c = n // 2 if nnunet_peak else (n - 1) / 2
        s = max(n * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float64) - c) / s) ** 2))
    g = axes[0][:, None] * axes[1][None, :]
    g = g / g.max()
    g = torch.clamp(g, min=float(g[g > 0].min()))
    return g.to(device=device, dtype=torch.float32)


def tile_starts(size: int, tile: int, step: float = 0.5) -> list[int]:
    """Evenly spaced tile starts covering `size`, with at most `step * tile` between them (nnU-Net's
    `compute_steps_for_sliding_window`, same arithmetic)."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile * step)) + 1
    actual_step = (size - tile) / (n - 1)
    return [int(np.round(actual_step * i)) for i in range(n)]


def mirror_variants(axes: tuple[int, ...], tta: bool) -> list[tuple[int, ...]]:
    """Dims to flip of a (N, C, H, W) batch for each pass: () alone, or every subset of the allowed axes."""
    if not tta:
        return [()]
    dims = [2 + a for a in axes if a in (0, 1)]
    return [tuple(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


MAX_AUTO_BATCH = 64  # items per forward on a GPU: beyond this no card runs faster
MPS_BATCH = 8
VRAM_FREE_FRACTION = 0.8  # of the free VRAM the automatic batch may fill ...
VRAM_RESERVE_GB = 1.0  # ... less this, kept for Slicer's rendering and other programs


def item_bytes(cfg, tile: tuple[int, int], dtype_bytes: int) -> int:
    """Peak memory of one item (slice or tile) in a forward, the largest decoder activations dominating: ~ pixels x
    the last decoder width x `dtype_bytes` x 6 temporaries, plus float32 logits and their stitched copies, plus 64 MiB
    of backbone activations (measured: 0.6 GiB per 512 px ViT-B slice in bf16 on an H100; this gives 0.67 GiB)."""
    pixels = tile[0] * tile[1]
    return pixels * (cfg.embed_dim // 4 * dtype_bytes * 6 + cfg.num_classes * 4 * 4) + 64 * 2**20


def auto_batch_size(device: torch.device, cfg, tile: tuple[int, int]) -> int:
    """Items (slices or tiles) per forward, from the memory the device has left (the networks already on it).

    CUDA: what fits in 80 % of the free VRAM (plus PyTorch's cache) minus 1 GiB kept for Slicer's rendering and
    other programs, at most 64; `MEDDINOV3_MAX_VRAM_GB` caps the whole run (weights included) lower or higher.
    CPU and MPS (whose memory is the host's): what fits in the host's budget (`memory.host_budget`: free memory less
    a reserve for the OS and Slicer), at most 4 on a CPU (larger batches are no faster there) and 8 on MPS.
    """
    from ..memory import host_budget

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch
        usable = VRAM_FREE_FRACTION * free - VRAM_RESERVE_GB * 2**30
        budget = os.environ.get("MEDDINOV3_MAX_VRAM_GB")
        if budget:
            weights = 4 * (cfg.embed_dim ** 2 * 12 * cfg.depth + sum(a * b * 4 for a, b in zip(
                cfg.decoder_channels[:-1], cfg.decoder_channels[1:])))
            usable = min(free * 0.9, float(budget) * 2**30 - weights - 512 * 2**20)
        return int(max(1, min(MAX_AUTO_BATCH, usable // item_bytes(cfg, tile, 2))))
    cap = MPS_BATCH if device.type == "mps" else CPU_BATCH
    return int(max(1, min(cap, host_budget().bytes // item_bytes(cfg, tile, 4))))


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(net):
    """One torch.compile wrapper per network, reused across volumes (compiling costs tens of seconds)."""
    if net not in _COMPILED:
        _COMPILED[net] = torch.compile(net, dynamic=False)
    return _COMPILED[net]


class SlicePredictor:
    """Run the fold networks on normalised slices at model resolution: (B, 1, H, W) -> probabilities (B, C, H, W)."""

    def __init__(self, networks, spec, device: torch.device, tta: bool = False, batch_size: int | str = "auto",
                 compile: bool | None = None, return_logits: bool = False):
        self.spec = spec
        self.nnunet = getattr(spec, "slicing", "canonical") == "stored"
        self.return_logits = return_logits  # fold-averaged logits (nnU-Net) instead of fold-averaged probabilities
        self.amp_dtype = torch.float16 if self.nnunet else torch.bfloat16  # nnU-Net's predictor autocasts to fp16
        self.device = device
        self.tta = tta
        self.variants = mirror_variants(tuple(spec.mirroring_axes), tta)
        if compile is None:
            compile = os.environ.get("MEDDINOV3_COMPILE", "0") not in ("", "0", "false", "False")
        self.compiled = bool(compile)
        self.amp = device.type == "cuda"
        nets = []
        for net in networks:
            net = net.to(device).eval()
            if device.type == "cuda":
                net = net.to(memory_format=torch.channels_last)
            nets.append(_compiled(net) if self.compiled else net)
        self.networks = nets
        self.requested_batch = batch_size
        self.batch_size: int | None = None if batch_size == "auto" else int(batch_size)
        self.oom_events: list[int] = []  # batch sizes that ran out of memory
        self._windows: dict = {}  # sliding-window weights per slice shape (see _window_weights)

    # ------------------------------------------------------------------ geometry of the network input

    def network_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Slice shape as the network sees it (transposed when the model was trained on transposed slices)."""
        return (shape[1], shape[0]) if self.spec.transpose_in_plane else tuple(shape)

    def tile(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Sliding-window tile for a slice of network shape `shape` (whole slice when the model has no patch)."""
        if not self.spec.patch_size:
            return tuple(shape)
        return tuple(int(p) for p in self.spec.patch_size)

    def tiles_per_slice(self, shape: tuple[int, int]) -> int:
        s = self.network_shape(shape)
        t = self.tile(s)
        return len(tile_starts(max(s[0], t[0]), t[0])) * len(tile_starts(max(s[1], t[1]), t[1]))

    def slices_per_batch(self, shape: tuple[int, int]) -> int:
        """Whole slices of shape `shape` per forward pass: the batch size in tiles over the tiles of one slice."""
        return max(1, self.resolve_batch_size(shape) // self.tiles_per_slice(shape))

    def resolve_batch_size(self, shape: tuple[int, int]) -> int:
        if self.batch_size is None:
            self.batch_size = auto_batch_size(self.device, self.spec.config, self.tile(self.network_shape(shape)))
        return self.batch_size

    def _window_weights(self, tile, padded) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian tile weights and their sum over the padded slice, made once per slice shape: building them per
        batch copies a CPU tensor to the GPU, which waits for all queued work and stalls the pipeline."""
        key = (tile, padded)
        if key not in self._windows:
            gauss = gaussian_weights(tile, device=self.device, nnunet_peak=self.nnunet)
            weight = torch.zeros(padded, device=self.device)
            for y in tile_starts(padded[0], tile[0]):
                for xx in tile_starts(padded[1], tile[1]):
                    weight[y:y + tile[0], xx:xx + tile[1]] += gauss
            self._windows[key] = (gauss, weight)
        return self._windows[key]

    # ------------------------------------------------------------------ forward

    def run_network(self, net, x: torch.Tensor) -> torch.Tensor:
        """One forward of a chunk (tests replace this to simulate running out of memory)."""
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        if self.compiled:
            # A compiled graph is specialised on its input's strides, and a slice of a batch and a padded last chunk
            # can differ in the stride of the size-1 channel dimension: without one layout it recompiles mid-volume.
            x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout).copy_(x)
        else:
            x = x.contiguous(memory_format=layout)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return net(x)

    def _forward_chunked(self, net, x: torch.Tensor):
        """Yield (start, logits float32) over chunks of `x`, halving the batch on out-of-memory errors."""
        i, n = 0, x.shape[0]
        while i < n:
            bs = max(1, self.batch_size or CPU_BATCH)
            chunk = x[i:i + bs]
            real = chunk.shape[0]
            if self.compiled and real < bs:  # keep shapes static for the compiled graph
                chunk = torch.cat([chunk, chunk[-1:].expand(bs - real, -1, -1, -1)])
            try:
                out = self.run_network(net, chunk)
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                self.oom_events.append(bs)
                self.batch_size = bs // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            yield i, out[:real].float()
            i += real

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, H, W) normalised slices on the device -> (B, C, H, W) float32 probabilities (mean of folds), or
        the mean of the folds' logits with `return_logits`."""
        B, _, H, W = x.shape
        if self.spec.transpose_in_plane:
            x = x.transpose(-1, -2)
        h, w = x.shape[-2:]
        th, tw = self.tile((h, w))
        # pad slices smaller than the tile (centred, zero = normalised background-ish value, as nnU-Net)
        ph, pw = max(th - h, 0), max(tw - w, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        Hp, Wp = x.shape[-2:]
        ys, xs = tile_starts(Hp, th), tile_starts(Wp, tw)
        positions = [(b, y, xx) for b in range(B) for y in ys for xx in xs]
        single = len(ys) == 1 and len(xs) == 1 and (th, tw) == (Hp, Wp)
        if single:
            tiles = x
        else:
            tiles = torch.stack([x[b, :, y:y + th, xx:xx + tw] for b, y, xx in positions])
        gauss, weight = (None, None) if single else self._window_weights((th, tw), (Hp, Wp))
        self.resolve_batch_size((H, W))
        probs = None
        for net in self.networks:
            acc = None
            for dims in self.variants:
                inp = tiles.flip(dims) if dims else tiles
                for start, logits in self._forward_chunked(net, inp):
                    if dims:
                        logits = logits.flip(dims)
                    if len(self.variants) > 1:
                        logits = logits / len(self.variants)
                    if acc is None and single and logits.shape[0] == B:  # the whole batch in one chunk: no copy
                        acc = logits
                        continue
                    if acc is None:
                        acc = torch.zeros((B, logits.shape[1], Hp, Wp), device=x.device, dtype=torch.float32)
                    if single:
                        acc[start:start + logits.shape[0]] += logits
                    else:
                        for k in range(logits.shape[0]):
                            b, y, xx = positions[start + k]
                            acc[b, :, y:y + th, xx:xx + tw] += logits[k] * gauss
            if not single:
                acc /= weight
            if self.return_logits:
                p = acc
            else:
                p = torch.softmax(acc.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)  # channels-last, as on CPU
            probs = p if probs is None else probs.add_(p)
        if len(self.networks) > 1:
            probs /= len(self.networks)
        probs = probs[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
        if self.spec.transpose_in_plane:
            probs = probs.transpose(-1, -2)
        return probs
