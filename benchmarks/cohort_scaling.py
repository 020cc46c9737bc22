"""Cohort scaling: the same cohort segmented by `meddinov3 segment FOLDER -o OUT` in one process and under torchrun
with 2 (or --max-processes) processes, each a fresh command writing into an empty output folder.

    python benchmarks/cohort_scaling.py                       # CPU (gloo): the shipped demo model, 8 liver CT crops
    python benchmarks/cohort_scaling.py --device cuda --size base       # one GPU per process, random ViT-B weights

Cohort: the given folder, else 8 crops of the offline LiTS liver CT with uneven slice counts (sharding by size
matters). "Wall" is the whole command (start-up, model load, segmenting, CSV); "cohort" is the span between rank 0's
`started` and `done` events (after the model is loaded), the part that shards. On the CPU the processes share the
machine's cores (each gets cores / processes threads), so the ideal speed-up there is what the cores give, not N;
`--threads 1` gives the one-process run a single core, as each of 2 processes on 2 cores has (ideal speed-up 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CROPS = (12, 40, 20, 28, 16, 36, 24, 8)  # slices per case


def make_cohort(folder: Path) -> Path:
    from meddinov3.phantom import load_liver_ct

    ct, _ = load_liver_ct()
    folder.mkdir()
    depth = ct.GetSize()[2]
    for k, n in enumerate(CROPS):
        start = (k * 13) % (depth - n)
        sitk.WriteImage(ct[:, :, start:start + n], str(folder / f"case{k}.nii.gz"))
    return folder


def random_package(size: str, folder: Path) -> Path:
    """A model package of random weights at `size` (ViT-B: 'base'), 16 classes, 0.75 mm spacing, CT normalisation."""
    from meddinov3.checkpoints import ClassInfo, ModelSpec, write_package
    from meddinov3.config import model_config
    from meddinov3.model import build_model

    cfg = model_config(size, num_classes=16)
    classes = [ClassInfo(i, "background" if i == 0 else f"class_{i}") for i in range(16)]
    spec = ModelSpec(name=f"bench-{size}", config=cfg, classes=classes, spacing=(0.75, 0.75),
                     normalization={"scheme": "ct_hu"})
    return write_package(folder, spec, [build_model(cfg).state_dict()])


def run(nproc: int, data: Path, out: Path, args) -> dict:
    """(wall s, cohort s, per-rank case counts) of one `segment` command with `nproc` processes."""
    cli = ["-m", "meddinov3.cli", "segment", str(data), "-o", str(out), "--model", args.model,
           "--device", args.device, "--json-progress"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cli]
    else:
        cmd = [sys.executable, *cli]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the code picks threads per process
    if nproc == 1 and args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    events = {e["event"]: e for e in map(json.loads, (ln for ln in proc.stdout.splitlines() if ln.startswith("{")))}
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ranks = [sum(r["rank"] == str(k) for r in rows) for k in range(nproc)]
    voxels = [sum(int(r["voxels"]) for r in rows if r["rank"] == str(k)) for k in range(nproc)]
    return {"wall": wall, "cohort": events["done"]["time"] - events["started"]["time"], "cases": ranks,
            "voxels": voxels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder of CT volumes (default: 8 crops of the offline liver CT)")
    ap.add_argument("--model", default=str(ROOT / "Resources" / "demo-liver-ct"))
    ap.add_argument("--size", choices=["tiny", "small", "base", "large"], help="random weights of this size instead "
                    "of --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-processes", type=int, default=2)
    ap.add_argument("--threads", type=int, help="CPU threads of the one-process run (default: torch's, all cores); "
                    "torchrun processes take cores / processes each")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_cohort(Path(tmp) / "cohort")
        if args.size:
            args.model = str(random_package(args.size, Path(tmp) / f"random-{args.size}"))
        n_cases = sum(1 for _ in data.iterdir())
        results = {n: run(n, data, Path(tmp) / f"out{n}", args) for n in range(1, args.max_processes + 1)}
    print(f"{n_cases} cases from {data if args.data else 'LiTS liver CT crops ' + str(CROPS) + ' slices'}, model "
          f"{Path(args.model).name}, device {args.device}, {os.cpu_count()} cores, {platform.node()}, one-process "
          f"threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")
    print("| processes | wall s | cohort s | cohort speed-up | efficiency | cases per rank | voxels per rank |")
    print("|---|---|---|---|---|---|---|")
    base = results[1]["cohort"]
    for n, r in results.items():
        speedup = base / r["cohort"]
        print(f"| {n} | {r['wall']:.1f} | {r['cohort']:.1f} | {speedup:.2f} | {speedup / n:.2f} | "
              f"{'/'.join(map(str, r['cases']))} | {'/'.join(f'{v / 1e6:.2f}M' for v in r['voxels'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
