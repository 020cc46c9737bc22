"""Evidence: fine-tuning from this project's own pretraining vs from scratch, same budget, offline liver CT.

1. Pretrain the tiny ViT (depth 2, patch 8) with `meddinov3.pretrain` on the liver CT training half only
   (axial slices [0, 64) of LiTS case 117, no labels used).
2. Fine-tune two segmentation models with `meddinov3 train` for the same steps, seed and options: one with
   `--base PRETRAIN_RUN`, one from random initialisation.
3. Report held-out Dice (source axis-0 [64, 128)) of both, and the pretraining run's dense-probe Dice.
Each seed repeats 1-3 with that seed (pretraining, fine-tuning); a table of all seeds and their mean closes.

Usage: python benchmarks/pretrain_vs_scratch.py [--out DIR] [--pretrain-steps 200] [--finetune-steps 60]
       [--seeds 0 1 2]
CPU only, about 10-15 minutes per seed on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finetune(ds: Path, out: Path, steps: int, base: str | None, cache: Path, seed: int) -> dict:
    args = [sys.executable, "-m", "meddinov3.cli", "train", "--data", str(ds), "--out", str(out),
            "--steps", str(steps), "--steps-per-epoch", str(steps), "--batch-size", "4",
            "--val-cases", "liver117_heldout", "--device", "cpu", "--seed", str(seed),
            "--set", f"cache_dir={json.dumps(str(cache))}", 'augment={"enabled": false}', "lr_decoder=2e-3",
            "lr_backbone=1e-3", "log_every=10", "patch_size=[64, 64]"]
    args += ["--base", base] if base else ["--size", "tiny", "--set", 'model={"depth": 2, "patch_size": 8}']
    t0 = time.time()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in recs if x["kind"] == "validation"][-1]
    return {"dice": val["dice"], "mean_dice": val["mean_dice"], "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/meddinov3_pretrain_vs_scratch")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out-dim", type=int, default=None,
                    help="DINO/iBOT head prototypes (default: the project's, 32 per Sinkhorn row; 2026-11-27 used 1024)")
    a = ap.parse_args()
    from meddinov3.cli.demo import export_dataset

    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    ds = export_dataset(root / "dataset", heldout_as_validation=True, overwrite=True)  # this script's own files
    results = {seed: one_seed(a, root, ds, seed) for seed in a.seeds}
    print("| seed | pretrained liver | pretrained tumour | scratch liver | scratch tumour |")
    print("|---|---|---|---|---|")
    for seed, res in results.items():
        pre, scr = res["from_pretraining"]["dice"], res["from_scratch"]["dice"]
        print(f"| {seed} | {pre['liver']:.3f} | {pre['tumour']:.3f} | {scr['liver']:.3f} | {scr['tumour']:.3f} |")
    mean = {k: sum(r[k]["dice"]["liver"] for r in results.values()) / len(results)
            for k in ("from_pretraining", "from_scratch")}
    print(f"| mean | {mean['from_pretraining']:.3f} | | {mean['from_scratch']:.3f} | |")


def one_seed(a, root: Path, ds: Path, seed: int) -> dict:
    from meddinov3.pretrain.loop import PretrainConfig, pretrain

    root = root / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    run = root / "pretrain"
    t0 = time.time()
    if not (run / "status.json").exists() or json.loads((run / "status.json").read_text())["state"] != "finished":
        cfg = PretrainConfig.from_dict({
            "data": str(ds / "imagesTr" / "liver117_train_0000.nii.gz"), "out": str(run), "size": "tiny",
            "model": {"depth": 2, "patch_size": 8}, "device": "cpu", "steps": a.pretrain_steps, "batch_size": 8,
            "seed": seed,
            "head": {"out_dim": a.out_dim, "hidden_dim": 256, "bottleneck_dim": 64, "nlayers": 3},
            "global_size": 64, "local_size": 32, "n_local": 2, "lr": 1e-3, "warmup_steps": 20,
            "teacher_temp_warmup_steps": 50, "log_every": 10, "probe_every": 50, "checkpoint_every": 100})
        pretrain(cfg, resume=(run / "config.json").exists())
    pre_s = round(time.time() - t0, 1)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [x for x in recs if x["kind"] == "probe"]
    steps = [x for x in recs if x["kind"] == "step"]
    resolved = json.loads((run / "config.json").read_text())
    res = {"pretrain": {"steps": a.pretrain_steps, "seconds": pre_s, "first_loss": steps[0]["loss"],
                        "out_dim": resolved["pretrain"]["head"]["out_dim"],
                        "last_loss": steps[-1]["loss"],
                        "probe": [(p["step"], round(p["probe_dice"], 4), round(p["probe_accuracy"], 4)) for p in probes]},
           "finetune_steps": a.finetune_steps}
    res["from_pretraining"] = finetune(ds, root / "ft_pretrained", a.finetune_steps, str(run), root / "cache", seed)
    res["from_scratch"] = finetune(ds, root / "ft_scratch", a.finetune_steps, None, root / "cache", seed)
    print(json.dumps(res, indent=2))
    (root / "result.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
