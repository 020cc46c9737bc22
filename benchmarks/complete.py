"""Few-shot completion benchmark on the offline LiTS case (128^3 CT at 1 mm): `meddinov3 complete` vs ITK's
morphological contour interpolation (Slicer's Fill between slices) on the same painted slices.

For each structure (liver = labels >= 1, the whole organ; tumour = label 2) and k: every k-th axial slice of the
structure's extent is painted (binary truth on those slices); Dice is measured on every slice not painted. Columns:
ITK interpolation, our signed-distance prior alone (the head's shape input), and Complete (`--model scratch`).
Then the time and peak memory of the CLI on the whole 128^3 case (first run, repeat run: each a fresh process).

    pip install itk-morphologicalcontourinterpolation==2.1.2   # the `benchmark` extra
    python benchmarks/complete.py --budget 10 --ks 5,10,20,30
    python benchmarks/complete.py --budget 10 --no-accuracy --no-timing --loop tumour:20:5   # correction loop PNG
    # with a model package's decoder, scored on the half of the case the demo model never saw in training
    python benchmarks/complete.py --budget 10 --no-timing --model demo-liver-ct --score-from-column 64
    # GPU: ViT-B backbone, 512 x 512 x 300, first and repeat run (benchmarks/gpu_check.sh)
    python benchmarks/complete.py --no-accuracy --no-timing --large 300 --model-size base --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meddinov3.complete import complete_image
from meddinov3.complete.prior import ShapePrior
from meddinov3.phantom import load_liver_ct

STRUCTURES = {"liver": lambda a: a >= 1, "tumour": lambda a: a == 2}


def painted_slices(mask: np.ndarray, k: int) -> np.ndarray:
    extent = np.flatnonzero(mask.reshape(len(mask), -1).any(1))
    return np.arange(extent[0], extent[-1] + 1, k)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2 * float((pred & truth).sum()) / max(1, int(pred.sum() + truth.sum()))


def itk_interpolation(sparse: np.ndarray) -> np.ndarray:
    """ITK MorphologicalContourInterpolator along the slice axis (numpy axis 0 = ITK axis 2), as Fill between slices."""
    import itk

    image = itk.image_from_array(sparse.astype(np.uint8))
    out = itk.morphological_contour_interpolator(image, axis=2, use_distance_transform=True)
    return itk.array_from_image(out)


def accuracy(ct: sitk.Image, labels: np.ndarray, ks: list[int], budget: float, model: str | None = None,
             first_column: int = 0) -> list[dict]:
    """Dice of each method on the unpainted slices (and SimpleITK index 0 >= `first_column`); with `model`, a
    column for Complete with that model (its backbone features and, for a package, its decoder)."""
    rows = []
    region = (slice(None), slice(None), slice(first_column, None))
    for name, select in STRUCTURES.items():
        truth = select(labels)
        for k in ks:
            painted = painted_slices(truth, k)
            sparse = np.zeros(truth.shape, np.uint8)
            sparse[painted] = truth[painted]
            others = np.setdiff1d(np.arange(len(truth)), painted)

            def score(pred: np.ndarray) -> float:
                return round(dice(pred[others][region], truth[others][region]), 3)

            prior = ShapePrior(sparse, painted[sparse[painted].reshape(len(painted), -1).any(1)], [1], (1.0,) * 3)
            ref = sitk.GetImageFromArray(sparse)
            ref.CopyInformation(ct)
            row = {"structure": name, "k": k, "painted": int(len(painted)),
                   "itk": score(itk_interpolation(sparse) != 0),
                   "prior": score(np.stack([prior.labels_at(z) for z in range(len(truth))]) != 0)}
            for column, ref_model in [("complete", "scratch")] + ([("complete_model", model)] if model else []):
                t0 = time.perf_counter()
                result = complete_image(ct, ref, model=ref_model, time_budget_s=budget, use_cache=False)
                row[column] = score(sitk.GetArrayFromImage(result.labels) != 0)
                row[f"{column}_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def timing(ct: sitk.Image, sparse: np.ndarray, budget: float, model: str = "scratch", device: str = "cpu"
           ) -> list[dict]:
    """The CLI on the whole image with `sparse` painted, twice (first, repeat), each a fresh process: seconds, peak
    RSS and, on CUDA, peak GPU memory."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = sitk.GetImageFromArray(sparse)
        ref.CopyInformation(ct)
        img, lab = Path(tmp) / "ct.nii.gz", Path(tmp) / "sparse.nii.gz"
        sitk.WriteImage(ct, str(img))
        sitk.WriteImage(ref, str(lab))
        for run in ("first", "repeat"):
            out = Path(tmp) / f"{run}.seg.nrrd"
            code = ("import resource, sys, time, torch; from meddinov3.cli.main import main; t = time.perf_counter(); "
                    f"rc = main(['complete', {str(img)!r}, '--labels', {str(lab)!r}, '-o', {str(out)!r}, "
                    f"'--model', {model!r}, '--device', {device!r}, '--time-budget', '{budget}']); "
                    "gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0; "
                    "print(round(time.perf_counter() - t, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, gpu)")
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            seconds, rss_kb, gpu = res.stdout.split()[-3:]
            row = {"run": run, "shape": list(ct.GetSize()), "model": Path(model).name, "device": device,
                   "seconds": float(seconds), "peak_rss_mb": round(int(rss_kb) / 1024),
                   "peak_gpu_mb": round(int(gpu) / 2**20)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def large_timing(slices: int, model_size: str, device: str, budget: float, every: int = 10) -> list[dict]:
    """`timing` on a 512 x 512 x `slices` CT (the LiTS case tiled, `segment.big_ct`), liver and tumour painted on
    every `every`-th slice, with a random backbone of `model_size` (the official one cannot be downloaded here; the
    time does not depend on the weights)."""
    import torch

    from meddinov3.checkpoints import ModelSpec, write_package
    from meddinov3.config import model_config
    from meddinov3.model import build_model
    from segment import big_ct

    image, labels, _ = big_ct(slices, with_labels=True)
    sparse = np.zeros_like(labels)
    sparse[::every] = labels[::every]
    torch.manual_seed(0)
    cfg = model_config(model_size, num_classes=2)
    spec = ModelSpec(name=f"bench-{model_size}-backbone", config=cfg, classes=[], kind="backbone",
                     normalization={"scheme": "ct_hu"})
    with tempfile.TemporaryDirectory() as tmp:
        pkg = write_package(Path(tmp) / "backbone", spec, [build_model(cfg).state_dict()])
        return timing(image, sparse, budget, str(pkg), device)


def worst_slice(pred: np.ndarray, truth: np.ndarray, candidates: np.ndarray) -> int:
    """The candidate slice with the most wrong voxels (what an annotator would correct first)."""
    errors = (pred[candidates] != truth[candidates]).reshape(len(candidates), -1).sum(1)
    return int(candidates[int(errors.argmax())])


def correction_loop(ct: sitk.Image, labels: np.ndarray, structure: str, k: int, rounds: int, budget: float,
                    png: Path) -> list[dict]:
    """After each Complete (and, separately, each interpolation) the worst unpainted slice gets its truth painted;
    Dice on the unpainted slices against the number of painted slices, for both, plotted to `png`. Each Complete
    after the first continues from the last head (half the budget), as in Slicer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = STRUCTURES[structure](labels)
    curves = {"complete": [], "itk": []}
    for method in curves:
        painted = set(painted_slices(truth, k).tolist())
        for _ in range(rounds + 1):
            done = np.array(sorted(painted))
            sparse = np.zeros(truth.shape, np.uint8)
            sparse[done] = truth[done]
            if method == "itk":
                pred = itk_interpolation(sparse) != 0
            else:
                ref = sitk.GetImageFromArray(sparse)
                ref.CopyInformation(ct)
                pred = sitk.GetArrayFromImage(complete_image(ct, ref, model="scratch", time_budget_s=budget).labels) != 0
            others = np.setdiff1d(np.arange(len(truth)), done)
            row = {"method": method, "structure": structure, "painted": len(done),
                   "dice": round(dice(pred[others], truth[others]), 3)}
            print(json.dumps(row), flush=True)
            curves[method].append(row)
            painted.add(worst_slice(pred, truth, others))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, label in (("complete", "Complete (scratch)"), ("itk", "ITK interpolation (Fill between slices)")):
        ax.plot([r["painted"] for r in curves[method]], [r["dice"] for r in curves[method]], "o-", label=label)
    ax.set_xlabel("painted slices")
    ax.set_ylabel(f"Dice on unpainted slices ({structure})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return curves["complete"] + curves["itk"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="5,10,20,30")
    parser.add_argument("--budget", type=float, default=20.0, help="--time-budget of each Complete (s)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--loop", metavar="STRUCTURE:K:ROUNDS", help="correction loop, e.g. tumour:20:5")
    parser.add_argument("--loop-png", default="benchmarks/complete_loop.png")
    parser.add_argument("--model", help="also Complete with this model (backbone or package), e.g. demo-liver-ct")
    parser.add_argument("--large", type=int, metavar="SLICES",
                        help="also time the CLI on a 512 x 512 x SLICES CT with a random backbone (--model-size)")
    parser.add_argument("--model-size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--device", default="cuda", help="device of the --large timing")
    parser.add_argument("--score-from-column", type=int, default=0,
                        help="score only voxels with SimpleITK index 0 >= N (64: the demo model's held-out half)")
    args = parser.parse_args()
    # a fresh store: the head cache (a repeat on the same volume continues from the last head) starts empty
    os.environ["MEDDINOV3_HOME"] = tempfile.mkdtemp(prefix="meddinov3-bench-")
    ct, lab = load_liver_ct()
    labels = sitk.GetArrayFromImage(lab)
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count(),
                      "torch_threads": __import__("torch").get_num_threads()}), flush=True)
    if not args.no_accuracy:
        accuracy(ct, labels, [int(k) for k in args.ks.split(",")], args.budget, args.model, args.score_from_column)
    if args.loop:
        structure, k, rounds = args.loop.split(":")
        correction_loop(ct, labels, structure, int(k), int(rounds), args.budget, Path(args.loop_png))
    if not args.no_timing:
        sparse = np.zeros(labels.shape, np.uint8)
        sparse[::10] = labels[::10]  # liver and tumour painted every 10th slice
        timing(ct, sparse, args.budget)
    if args.large:
        large_timing(args.large, args.model_size, args.device, args.budget)
    print(json.dumps({"load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
