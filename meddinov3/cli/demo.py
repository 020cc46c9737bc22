"""`meddinov3 demo [--out DIR]`: segment the bundled LiTS liver CT with the shipped demo model, offline, on CPU.

Writes DIR/segmentation.nii.gz (on the case's own voxel grid: array axes in the source .mrc order),
DIR/overlay.png (slices with the segments over the CT) and prints Dice per class on the held-out part.

Split (literally "axis-0 indices of the source array"): the .mrc's axis 0 is the patient's right->left axis
(axis 2 is the body axis, see meddinov3.phantom.load_liver_ct), so the training labels are the right half of the
body, `mrc[0:64, :, :]`, and the held-out part is `mrc[64:128, :, :]` (the left half). The network still works on
true axial slices; only which voxels are trained on / held out follows the source array's axis 0.
`--export-dataset DIR` instead writes the nnU-Net dataset the demo model was trained on (see
tools/train_demo_model.sh). Existing files are never replaced without `--overwrite`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from .common import CommandError, device_option

DEMO_MODEL = "demo-liver-ct"
LABELS = {"background": 0, "liver": 1, "tumour": 2}
SPLIT = 64  # source .mrc array axis-0 indices [0, 64) train, [64, 128) held out (= canonical x / SimpleITK index 0)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="segment the bundled liver CT with the shipped demo model (offline, CPU)",
                       description=__doc__)
    p.add_argument("--out", default="meddinov3-demo", help="output folder (default meddinov3-demo/)")
    p.add_argument("--model", default=DEMO_MODEL, help="model to run (default: the shipped demo model)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, mps or auto (default cpu: the demo model is small)")
    p.add_argument("--no-postprocessing", dest="postprocess", action="store_false",
                   help="skip the post-processing the model package declares (the network's raw labels)")
    p.add_argument("--export-dataset", metavar="DIR", help="write the demo training dataset (nnU-Net layout) and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (segmentation.nii.gz, overlay.png, or the --export-dataset files)")
    p.set_defaults(run=run)


def export_dataset(out_dir: str | Path, heldout_as_validation: bool = False, overwrite: bool = False) -> Path:
    """nnU-Net v2 raw dataset of the source-array axis-0 split.

    imagesTr/labelsTr: `liver117_train` = `mrc[0:64, :, :]`, the only training case (the demo model is the final
    checkpoint: no model selection, so no held-out labels are ever read in training); imagesTs/labelsTs:
    `liver117_heldout` = `mrc[64:128, :, :]`. Source axis 0 is SimpleITK index 0 of `load_liver_ct()` (canonical x);
    cropping with SimpleITK index slicing keeps each crop's origin where it lies in the full volume.
    `heldout_as_validation`: the held-out case goes to imagesTr/labelsTr too, for experiments that validate on it
    with `--val-cases liver117_heldout` (pipeline tests, benchmarks; never the demo model).
    Every file is written atomically; existing ones are refused (FileExistsError) unless `overwrite`.
    """
    import SimpleITK as sitk

    from ..files import check_new_output
    from ..files import atomic_path, write_json
    from ..phantom import load_liver_ct

    out = Path(out_dir)
    held_part = "Tr" if heldout_as_validation else "Ts"
    image, labels = load_liver_ct()
    nx = image.GetSize()[0]
    cases = [("Tr", "liver117_train", slice(0, SPLIT)), (held_part, "liver117_heldout", slice(SPLIT, nx))]
    files = [(out / f"images{part}" / f"{name}_0000.nii.gz", out / f"labels{part}" / f"{name}.nii.gz")
             for part, name, _ in cases]
    for path in [f for pair in files for f in pair] + [out / "dataset.json"]:  # all refused before any is written
        check_new_output(path, overwrite)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for (_, _, xs), pair in zip(cases, files):
        for source, path in zip((image, labels), pair):
            with atomic_path(path) as tmp:
                sitk.WriteImage(source[xs, :, :], str(tmp))
    meta = {"name": "LiTS case 117 (liver-ct-segmentation-package)", "channel_names": {"0": "CT"}, "labels": LABELS,
            "numTraining": 2 if heldout_as_validation else 1, "file_ending": ".nii.gz",
            "licence": "data: LiTS via liver-ct-segmentation-package (MIT)",
            "description": f"Source .mrc array axis-0 indices [0, {SPLIT}) (patient right half) for training: "
                           f"liver117_train = mrc[0:{SPLIT}, :, :]; held out (imagesTs/labelsTs): liver117_heldout = "
                           f"mrc[{SPLIT}:{nx}, :, :]; of the 128^3 LiTS case 117 crop at the assumed 1 mm spacing "
                           "(meddinov3.phantom.load_liver_ct)."}
    write_json(out / "dataset.json", meta)
    return out


def overlay_png(ct: np.ndarray, seg: np.ndarray, path: Path, classes, n: int = 8) -> None:
    """Montage of `n` axial slices (canonical (z, y, x) arrays) with segment outlines and fills."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..files import atomic_path
    from ..terminology import describe_classes

    entries = describe_classes(classes)
    colors = [(0, 0, 0, 0)] + [tuple(c / 255 for c in e.color) + (0.45,) for e in entries[1:]]
    cmap = ListedColormap(colors)
    zs = np.linspace(4, ct.shape[0] - 5, n).round().astype(int)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3 * cols, 3 * ((n + cols - 1) // cols)))
    for ax, z in zip(axes.ravel(), zs):
        ax.imshow(ct[z], cmap="gray", vmin=-200, vmax=300)
        ax.imshow(seg[z], cmap=cmap, vmin=0, vmax=len(colors) - 1, interpolation="nearest")
        ax.axvline(SPLIT - 0.5, color="yellow", lw=0.8, ls="--")  # columns >= SPLIT: source axis-0 [64, 128), held out
        ax.set_title(f"axial slice {z} (right of line: held out)", fontsize=9)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i][:3]) for i in range(1, len(colors))]
    fig.legend(handles, [e.name for e in entries[1:]], loc="lower center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def run(args) -> int:
    import SimpleITK as sitk

    from ..checkpoints import load_model
    from ..engine import segment_image
    from ..files import check_new_output
    from ..files import atomic_path
    from ..phantom import load_liver_ct
    from ..train.losses import dice_per_class

    try:
        if args.export_dataset:
            print(export_dataset(args.export_dataset, overwrite=args.overwrite))
            return 0
        out = Path(args.out)
        # no mkdir: atomic_path creates --out with the first file, so a failed run leaves no empty folder behind
        for path in (out / "segmentation.nii.gz", out / "overlay.png"):
            check_new_output(path, args.overwrite)
    except ValueError as e:
        raise CommandError(str(e)) from None
    device = device_option(args.device)
    image, labels = load_liver_ct()
    model = load_model(args.model, device=device, offline=True)
    result = segment_image(image, model, device=device, postprocess=args.postprocess)
    seg = sitk.GetArrayFromImage(result.labels)  # (z, y, x) = mrc axes reversed
    truth = sitk.GetArrayViewFromImage(labels)
    # back to the source .mrc array order (load_liver_ct transposed it with .transpose(2, 1, 0))
    seg_mrc = np.ascontiguousarray(seg.transpose(2, 1, 0))
    native = sitk.GetImageFromArray(seg_mrc)
    native.SetSpacing(image.GetSpacing()[::-1])
    with atomic_path(out / "segmentation.nii.gz") as tmp:
        sitk.WriteImage(native, str(tmp), True)
    overlay_png(sitk.GetArrayViewFromImage(image), seg, out / "overlay.png", result.classes)
    values = [c.value for c in result.classes if c.value != 0]
    names = {c.value: c.name for c in result.classes}
    truth_mrc = truth.transpose(2, 1, 0)
    held = dice_per_class(seg_mrc[SPLIT:], truth_mrc[SPLIT:], values)
    trained = dice_per_class(seg_mrc[:SPLIT], truth_mrc[:SPLIT], values)
    print(f"model: {model.path} ({model.spec.name})")
    if model.spec.postprocessing:
        state = "applied" if args.postprocess else "skipped (--no-postprocessing)"
        print(f"post-processing from model.json, {state}: {json.dumps(model.spec.postprocessing)}")
    print(f"segmentation: {out / 'segmentation.nii.gz'} (array axes in the source .mrc order)")
    print(f"overlay: {out / 'overlay.png'}")
    n = seg_mrc.shape[0]
    print(f"Dice held-out (source array axis-0 indices {SPLIT}-{n - 1}):")
    for v in values:
        print(f"  {names[v]:<10} {held[v]:.4f}")
    print(f"Dice training part, for reference (source array axis-0 indices 0-{SPLIT - 1}):")
    for v in values:
        print(f"  {names[v]:<10} {trained[v]:.4f}")
    print(f"segmentation took {result.stats.get('seconds')} s on {result.stats.get('device')}", file=sys.stderr)
    return 0
