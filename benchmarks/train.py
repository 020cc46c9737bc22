"""Training throughput: the real data pipeline (slice cache -> sampler -> augmentation on the device), drawn inline
or prefetched in a background thread as `meddinov3 train` does, vs the pure model step (one batch already on the
device), to show whether the GPU waits for data.

    python benchmarks/train.py                      # ViT-B, 512 px, batch 32, bf16 on CUDA (< 5 min on one H100)
    python benchmarks/train.py --compile            # the same with TrainConfig.compile (torch.compile, dynamic=False)
    python benchmarks/train.py --size tiny --res 128 --batch 4 --steps 6 --device cpu   # CPU smoke figure

Prints a table (images/s, ms/step, peak memory, time spent in sampling / augmentation).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddinov3.config import model_config  # noqa: E402
from meddinov3.data.augment import AugmentConfig, augment  # noqa: E402
from meddinov3.data.cache import SliceCache, build_cache  # noqa: E402
from meddinov3.data.dataset import load_dataset  # noqa: E402
from meddinov3.data.prefetch import Prefetcher  # noqa: E402
from meddinov3.data.sampler import PatchSampler  # noqa: E402
from meddinov3.model import build_model  # noqa: E402
from meddinov3.train.losses import DiceCELoss  # noqa: E402
from meddinov3.train import TrainConfig  # noqa: E402
from meddinov3.train.loop import forward_loss  # noqa: E402
from meddinov3.train.optim import make_optimizer  # noqa: E402


def make_dataset(folder: Path, res: int, n_cases: int = 2, slices: int = 24) -> Path:
    import json

    from meddinov3.phantom import PHANTOM_LABELS, make_phantom_ct

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    for i in range(n_cases):
        img, lab = make_phantom_ct(shape=(slices, res, res), spacing=(350 / res, 350 / res, 5.0), seed=i)
        sitk.WriteImage(img, str(folder / "imagesTr" / f"c{i}_0000.nii.gz"))
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"c{i}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": PHANTOM_LABELS,
                                                      "file_ending": ".nii.gz"}))
    return folder


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(mode: str, step_fn, net, opt, sampler, dev, steps: int, warmup: int, aug_cfg, pad) -> dict:
    """`model-only`: one batch already on the device, again and again. `inline`: the loop with prefetch off (draw,
    copy, augment, then the step). `prefetch`: the loop's default (next batches drawn in a background thread)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    depth = 2 if mode == "prefetch" else 0
    fixed, t_data = None, 0.0
    with Prefetcher(sampler.sample, 0, dev, depth) as batches:
        for i in range(warmup + steps):
            if i == warmup:
                sync(dev)
                t0, t_data = time.perf_counter(), 0.0
            td = time.perf_counter()
            if mode != "model-only" or fixed is None:
                x, y = batches.get(i)
                fixed = augment(x, y, torch.Generator().manual_seed(i), aug_cfg, pad)
            x, y = fixed
            t_data += time.perf_counter() - td
            opt.zero_grad(set_to_none=True)
            step_fn(x, y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
        sync(dev)
        dt = time.perf_counter() - t0
    b = sampler.batch_size
    return {"mode": mode, "images_per_s": steps * b / dt, "ms_per_step": 1000 * dt / steps,
            "data_ms_per_step": 1000 * t_data / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward + loss (TrainConfig.compile)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    adt = torch.bfloat16 if dev.type == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = load_dataset(make_dataset(Path(tmp) / "ds", args.res))
        cache = SliceCache(build_cache(ds, Path(tmp) / "cache"))
        t_cache = time.perf_counter() - t0
        sampler = PatchSampler(cache.cases, (args.res, args.res), args.batch, 0.33, seed=0)
        net = build_model(model_config(args.size, args.classes)).to(dev).train()
        net.backbone.mask_token.requires_grad_(False)
        opt = make_optimizer(net, TrainConfig())
        step_fn = forward_loss(net, DiceCELoss(), adt, dev.type, args.compile)
        aug_cfg = AugmentConfig()
        pad = float(cache.cases[0].pad_value)
        rows = [bench(m, step_fn, net, opt, sampler, dev, args.steps, args.warmup, aug_cfg, pad)
                for m in ("model-only", "inline", "prefetch")]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    print(f"# meddinov3 training throughput: {args.size} @ {args.res}px, batch {args.batch}, "
          f"{'bf16 autocast' if adt else 'fp32'}, {'compiled' if args.compile else 'eager'}, {name}, "
          f"torch {torch.__version__}, {datetime.date.today()}")
    print(f"# slice cache build: {t_cache:.1f} s for 2 phantom cases x 24 slices")
    print("| mode | images/s | ms/step | data ms/step (host: get + augment) | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['images_per_s']:.2f} | {r['ms_per_step']:.0f} | {r['data_ms_per_step']:.0f} | "
              f"{r['peak_gib']:.1f} |")
    ratio = rows[2]["images_per_s"] / rows[0]["images_per_s"]
    print(f"# prefetch pipeline / model-only throughput: {ratio:.2f} "
          f"({'the device waits for data' if ratio < 0.9 else 'data keeps up'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
