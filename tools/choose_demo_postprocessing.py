"""Choose the demo model's post-processing on the TRAINING half of the split only (held-out labels are printed for
information, never used to choose): liver + tumour keep their largest region after an opening of r mm.

    .venv/bin/python tools/choose_demo_postprocessing.py [--model demo-liver-ct] [--openings 0 1 1.5 2 2.5 3 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddinov3.checkpoints import load_model  # noqa: E402
from meddinov3.cli.demo import DEMO_MODEL, SPLIT  # noqa: E402
from meddinov3.engine import segment_image  # noqa: E402
from meddinov3.engine.postprocess import apply_postprocessing  # noqa: E402
from meddinov3.phantom import load_liver_ct  # noqa: E402
from meddinov3.train.losses import dice_per_class  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--openings", type=float, nargs="+", default=[0, 1, 1.5, 2, 2.5, 3, 4])
    args = ap.parse_args(argv)
    image, labels = load_liver_ct()
    model = load_model(args.model, device="cpu", offline=True)
    raw = segment_image(image, model, device="cpu", postprocess=False)
    index = sitk.GetArrayFromImage(raw.labels).transpose(2, 1, 0)  # source .mrc order: axis 0 is split
    truth = sitk.GetArrayViewFromImage(labels).transpose(2, 1, 0)
    values = [c.value for c in raw.classes]
    foreground = [v for v in values if v != 0]
    spacing = image.GetSpacing()  # (x, y, z) = the .mrc axes in this order
    rows = []
    for r in args.openings:
        seg = index.copy()
        steps = [{"step": "largest_component", "labels": foreground, "opening_mm": float(r)}] if r > 0 else []
        apply_postprocessing(seg, steps, values, spacing, values.index(0))
        train = dice_per_class(seg[:SPLIT], truth[:SPLIT], foreground)
        held = dice_per_class(seg[SPLIT:], truth[SPLIT:], foreground)
        rows.append((float(np.mean([train[v] for v in foreground])), r, train, held))
    names = {c.value: c.name for c in raw.classes}
    print("| opening mm | " + " | ".join(f"train {names[v]}" for v in foreground) + " | train mean | "
          + " | ".join(f"held-out {names[v]}" for v in foreground) + " |")
    print("|---" * (2 * len(foreground) + 2) + "|")
    for mean, r, train, held in rows:
        print(f"| {r:g} | " + " | ".join(f"{train[v]:.4f}" for v in foreground) + f" | {mean:.4f} | "
              + " | ".join(f"{held[v]:.4f}" for v in foreground) + " |")
    best = max(rows, key=lambda row: (round(row[0], 4), -row[1]))  # ties: the smaller opening
    print(f"chosen on the training half: opening_mm = {best[1]:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
