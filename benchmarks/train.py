"""Training throughput: the real data pipeline (slice cache -> sampler -> augmentation on the device) vs the pure
model step (one batch already on the device), to show whether the GPU waits for data.

    python benchmarks/train.py                      # ViT-B, 512 px, batch 32, bf16 on CUDA (< 5 min on one H100)
    python benchmarks/train.py --size tiny --res 128 --batch 4 --steps 5 --device cpu   # CPU smoke figure

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
from meddinov3.data.sampler import PatchSampler  # noqa: E402
from meddinov3.model import build_model  # noqa: E402
from meddinov3.train.losses import DiceCELoss  # noqa: E402
from meddinov3.train.loop import TrainConfig  # noqa: E402
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


def bench(mode: str, net, opt, sampler, dev, steps: int, warmup: int, adt, aug_cfg, pad) -> dict:
    crit = DiceCELoss()
    fixed = None
    t_data = 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0, t_data = time.perf_counter(), 0.0
        td = time.perf_counter()
        if mode == "pipeline" or fixed is None:
            x, y = sampler.sample(i)
            x = torch.from_numpy(x).to(dev, non_blocking=True)
            y = torch.from_numpy(y).to(dev, non_blocking=True)
            x, y = augment(x, y, torch.Generator().manual_seed(i), aug_cfg, pad)
            fixed = (x, y)
        x, y = fixed
        if mode == "pipeline":
            sync(dev)
            t_data += time.perf_counter() - td
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=adt, enabled=adt is not None):
            logits = net(x)
        loss, _ = crit(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
    sync(dev)
    dt = time.perf_counter() - t0
    b = sampler.batch_size
    return {"mode": mode, "images_per_s": steps * b / dt, "ms_per_step": 1000 * dt / steps,
            "data_ms_per_step": 1000 * t_data / steps if mode == "pipeline" else 0.0,
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
        aug_cfg = AugmentConfig()
        pad = float(cache.cases[0].pad_value)
        rows = [bench(m, net, opt, sampler, dev, args.steps, args.warmup, adt, aug_cfg, pad)
                for m in ("model-only", "pipeline")]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    print(f"# meddinov3 training throughput: {args.size} @ {args.res}px, batch {args.batch}, "
          f"{'bf16 autocast' if adt else 'fp32'}, {name}, torch {torch.__version__}, {datetime.date.today()}")
    print(f"# slice cache build: {t_cache:.1f} s for 2 phantom cases x 24 slices")
    print("| mode | images/s | ms/step | data ms/step | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['images_per_s']:.2f} | {r['ms_per_step']:.0f} | {r['data_ms_per_step']:.0f} | "
              f"{r['peak_gib']:.1f} |")
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"# pipeline / model-only throughput: {ratio:.2f} "
          f"({'the device waits for data' if ratio < 0.9 else 'data keeps up'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
