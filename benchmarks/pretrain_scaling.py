"""Pretraining scaling: images/s of the real `meddinov3 pretrain` run (data, crops, losses, gradient reduction,
EMA) with 1 and 2 processes under torchrun, at a constant per-process batch (weak scaling).

    python benchmarks/pretrain_scaling.py --device cuda --size base            # 2 GPUs: 2x224 + 8x96 crops
    python benchmarks/pretrain_scaling.py --device cpu --size tiny --global-size 64 --local-size 32 --n-local 2 \
        --per-process-batch 4 --steps 8 --out-dim 1024                         # 2 CPU cores, gloo, 1 thread each

Data: the given CT folder, else the offline LiTS liver CT (axial slices). Images/s is the median of the logged
steps after the first two (warm-up); one image = one source slice with all its crops. Efficiency = images/s with
N processes / (N x images/s with one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(nproc: int, args, data: Path, out: Path) -> float:
    sets = [f"global_size={args.global_size}", f"local_size={args.local_size}", f"n_local={args.n_local}",
            f'head={{"out_dim": {args.out_dim}}}', "log_every=1", "probe_every=0", "checkpoint_every=100000",
            f"parallel={args.parallel}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "meddinov3.cli", "pretrain", "--data", str(data), "--out", str(out), "--size", args.size,
           "--steps", str(args.steps), "--batch-size", str(args.per_process_batch * nproc), "--device", args.device,
           "--json-progress", "--set", *sets]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    rates = [e["images_per_s"] for e in events if e.get("event") == "step"][2:]
    if not rates:
        sys.exit(f"no step events after warm-up from {nproc} process(es); raise --steps")
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder of CT volumes (default: the offline liver CT)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="base")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--per-process-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--max-processes", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            from meddinov3.phantom import load_liver_ct

            data = Path(tmp) / "ct"
            data.mkdir()
            sitk.WriteImage(load_liver_ct()[0], str(data / "liver.nii.gz"))
        rates = {n: run(n, args, data, Path(tmp) / f"run{n}") for n in range(1, args.max_processes + 1)}
    print(f"stage 1, {args.size}, crops 2x{args.global_size} + {args.n_local}x{args.local_size}, "
          f"batch {args.per_process_batch} per process, {args.parallel}, device {args.device}, "
          f"{args.threads} thread(s) per process")
    print("| processes | images/s | images/s per process | efficiency |")
    print("|---|---|---|---|")
    for n, r in rates.items():
        print(f"| {n} | {r:.1f} | {r / n:.1f} | {r / (n * rates[1]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
