"""Engine benchmark: segment a 512x512xN CT (the LiTS liver CT tiled/resampled up) with random weights.

Prints one table row: device, model size, slices/s end to end, wall time, peak RAM (and VRAM on CUDA),
model-forward-only time for the same network inputs at the same batch size (`--fast` on thin slices runs only
every n-th slice through the network: "net slices"), and the ratio end-to-end / forward-only.

    python benchmarks/segment.py --size base --device cuda            # < 5 min on one H100
    python benchmarks/segment.py --size small --device cpu --fast --slices 50

Run it twice with different --slices to see time grow linearly while peak memory stays flat
(each run is a fresh process, so peak RSS is per run).

`--host-only` replaces the network by a 1x1 convolution (same classes, negligible cost): what remains is the engine's
own work around the network (checks, reading, normalising, resampling, class argmax, writing the label volume), split
into set-up, the batch loop and finishing (`setup_s`, `finish_s` of the result's stats).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddinov3.checkpoints import ClassInfo, LoadedModel, ModelSpec, load_model, write_package  # noqa: E402
from meddinov3.config import model_config  # noqa: E402
from meddinov3.engine import resolve_device, segment_image  # noqa: E402
from meddinov3.engine.inference import SlicePredictor  # noqa: E402
from meddinov3.engine.preprocess import resampled_shape, target_spacing  # noqa: E402
from meddinov3.model import build_model  # noqa: E402
from meddinov3.phantom import load_liver_ct, make_phantom_ct  # noqa: E402


def big_ct(slices: int, with_labels: bool = False):
    """512 x 512 x `slices` CT at 0.75 x 0.75 x 1 mm: a 1 mm 128-slice CT upsampled in-plane (384 px, air around),
    mirrored and tiled along z. The LiTS liver CT when its package is installed, else the phantom.
    Returns (image, source), or (image, labels array (z, y, x) on its grid, source) `with_labels`."""
    try:
        ct, lab = load_liver_ct()
        source = "LiTS liver CT (tiled)"
    except FileNotFoundError:
        ct, lab = make_phantom_ct((128, 128, 128), spacing=(1.0, 1.0, 1.0), seed=0)
        source = "phantom CT (tiled)"

    def tiled(arr: np.ndarray, background: int, mode: str) -> np.ndarray:
        t = torch.from_numpy(arr.astype(np.float32))[:, None]
        up = torch.nn.functional.interpolate(t, size=(384, 384), mode=mode,
                                             **({} if mode == "nearest" else {"align_corners": False}))[:, 0]
        canvas = np.full((len(arr), 512, 512), background, np.int16)
        canvas[:, 64:448, 64:448] = up.round().numpy().astype(np.int16)
        return np.concatenate([canvas, canvas[::-1]] * -(-slices // 256))[:slices]

    image = sitk.GetImageFromArray(tiled(sitk.GetArrayFromImage(ct), -1000, "bilinear"))  # (128, 128, 128) at 1 mm
    image.SetSpacing((0.75, 0.75, 1.0))
    if with_labels:
        return image, tiled(sitk.GetArrayFromImage(lab), 0, "nearest").astype(np.uint8), source
    return image, source


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler(threading.Thread):
    """Peak resident memory while the timed segmentation runs (sampled every 20 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        from meddinov3.memory import proc_status  # /proc/self/status: no psutil (the project does not need it)

        while not self.stop.is_set():
            self.peak = max(self.peak, proc_status("VmRSS") or 0)
            time.sleep(0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--host-only", action="store_true", help="a 1x1 convolution instead of the network")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    bs = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    torch.manual_seed(0)
    cfg = model_config(args.size, num_classes=args.classes)
    classes = [ClassInfo(i, "background" if i == 0 else f"class_{i}") for i in range(args.classes)]
    spec = ModelSpec(name=f"bench-{args.size}", config=cfg, classes=classes, spacing=(0.75, 0.75),
                     normalization={"scheme": "ct_hu"}, fast={"spacing": [1.5, 1.5]})
    with tempfile.TemporaryDirectory() as tmp:
        pkg = write_package(Path(tmp) / "pkg", spec, [build_model(cfg).state_dict()])
        model = load_model(str(pkg), device=dev)
    if args.host_only:
        model = LoadedModel(model.spec, [torch.nn.Conv2d(1, args.classes, 1)], "host-only", model.path)
    image, source = big_ct(args.slices)
    rss_before = peak_rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    # warm-up on a few slices (allocator, kernels, compile)
    segment_image(image[:, :, :4], model, device=dev, fast=args.fast, tta=args.tta, batch_size=bs, compile=args.compile)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = segment_image(image, model, device=dev, fast=args.fast, tta=args.tta, batch_size=bs, compile=args.compile)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    vram = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    hw = resampled_shape((512, 512), (0.75, 0.75), target_spacing(spec, (0.75, 0.75), args.fast))
    if args.host_only:
        st = result.stats
        print("| device | input | net px | batch | wall s | set-up s | batch loop s | finishing s | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        setup, finish = st.get("setup_s", float("nan")), st.get("finish_s", float("nan"))
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
        print(f"| {device} | 512x512x{args.slices}{' fast' if args.fast else ''} | {hw[0]}x{hw[1]} | {st['batch_size']} "
              f"| {wall:.2f} | {setup:.2f} | {wall - setup - finish:.2f} | {finish:.2f} | {sampler.peak / 2**20:.0f} |")
        return 0

    # forward only: the same number of model inputs at the same shape and batch size, data already on the device
    pred = SlicePredictor(model.networks, spec, dev, tta=args.tta, batch_size=result.stats["batch_size"],
                          compile=args.compile)
    x = torch.randn(result.stats["batch_size"], 1, *hw, device=dev)
    n_inputs = result.stats["predicted_slices"] * len(pred.variants)  # --fast skips slices, --tta adds passes
    done, t_fwd = 0, 0.0
    with torch.inference_mode():
        pred.run_network(pred.networks[0], x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        while done < n_inputs:
            pred.run_network(pred.networks[0], x)
            done += x.shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_fwd = time.perf_counter() - t1
    t_fwd *= n_inputs / done

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    cols = ["device", "model", "input", "net px", "net slices", "batch", "slices/s", "wall s", "peak RSS MiB (during)", "VRAM GiB",
            "forward-only s", "e2e/forward"]
    row = [name, f"{args.size} ({sum(p.numel() for p in model.networks[0].parameters()) / 1e6:.0f} M)",
           f"512x512x{args.slices}{' fast' if args.fast else ''}{' tta' if args.tta else ''}", f"{hw[0]}x{hw[1]}",
           str(result.stats["predicted_slices"]), str(result.stats["batch_size"]), f"{args.slices / wall:.1f}", f"{wall:.1f}", f"{sampler.peak / 2**20:.0f}",
           f"{vram:.1f}" if vram is not None else "-", f"{t_fwd:.1f}", f"{wall / t_fwd:.2f}"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(row) + " |")
    print(f"({source}; peak RSS of setup {rss_before:.0f} MiB; labels {sitk.GetArrayViewFromImage(result.labels).shape}, "
          f"stats {result.stats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
