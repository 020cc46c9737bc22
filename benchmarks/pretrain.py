"""Pretraining throughput: images/s of one optimiser step (teacher + student forward/backward, all losses).

Usage: python benchmarks/pretrain.py [--size base] [--batch 32] [--global 224 --local 96 --n-local 8]
       [--stage 1|2] [--grad-checkpointing] [--device cuda]. bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from meddinov3.config import model_config
    from meddinov3.pretrain.masking import sample_masks
    from meddinov3.pretrain.meta_arch import HeadConfig, SSLMetaArch

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global", dest="g", type=int, default=224)
    ap.add_argument("--local", dest="l", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    mcfg = model_config(a.size, 1)
    meta = SSLMetaArch(mcfg, HeadConfig(out_dim=a.out_dim), gram=a.stage >= 2).to(dev)
    meta.student["backbone"].grad_checkpointing = a.grad_checkpointing
    opt = torch.optim.AdamW(meta.trainable(), lr=1e-4)
    b = a.batch
    g = torch.randn(2 * b, 1, a.g, a.g, device=dev)
    loc = torch.randn(a.n_local * b, 1, a.l, a.l, device=dev)
    p = mcfg.patch_size
    masks = sample_masks(2 * b, (a.g // p, a.g // p), generator=0).to(dev)
    adt = torch.bfloat16 if dev.type == "cuda" else None
    times = []
    for i in range(a.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=adt, enabled=adt is not None):
            loss, _ = meta.forward_losses(g, loc, masks, 0.04)
        loss.backward()
        opt.step()
        meta.update_teacher(0.996)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    print(f"size {a.size} batch {b} crops {a.g}/{a.l}x{a.n_local} stage {a.stage} on {dev}: "
          f"{t * 1000:.0f} ms/step, {b / t:.1f} images/s, peak {mem:.2f} GiB")


if __name__ == "__main__":
    main()
