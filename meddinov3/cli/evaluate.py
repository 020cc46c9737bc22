"""`meddinov3 evaluate PRED_FOLDER GT_FOLDER -o summary.json [--labels dataset.json]`: nnU-Net's metrics.

Files are matched by case name (the file name without its image suffix: `case_001.nii.gz` <-> `case_001.nrrd`);
every reference needs a prediction. Per case and label: Dice, IoU, TP, FP, FN, TN, n_pred, n_ref (Dice and IoU NaN
when the label is in neither map); `mean` per label ignores those NaNs; `foreground_mean` averages the labels' means.
The file is nnU-Net v2's summary.json format (see `meddinov3.evaluation`).
"""

from __future__ import annotations
from .common import CommandError


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice/IoU per case and label of predicted label maps (nnU-Net summary.json)",
                       description=__doc__)
    p.add_argument("pred_folder", help="folder of predicted label maps")
    p.add_argument("gt_folder", help="folder of reference label maps")
    p.add_argument("-o", "--output", required=True, help="summary JSON to write")
    p.add_argument("--labels", help="dataset.json whose 'labels' give the label values to score (default: every "
                   "non-zero value found); its 'ignore' label, if any, is left out of every count")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..files import check_new_output
    from ..evaluation import EvaluationError, evaluate_folders, labels_from_dataset_json, to_json
    from ..files import atomic_path

    out = Path(args.output)
    try:
        check_new_output(out, args.overwrite)  # before reading any case; the folder must accept the file too
    except (FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from None
    try:
        labels, ignore = labels_from_dataset_json(args.labels) if args.labels else (None, None)
        summary = evaluate_folders(args.pred_folder, args.gt_folder, labels, ignore)
    except EvaluationError as e:
        raise CommandError(str(e)) from None
    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(to_json(summary))
    means = summary["foreground_mean"]
    print(f"{len(summary['metric_per_case'])} case(s); foreground mean Dice {means['Dice']:.4f}, IoU {means['IoU']:.4f}"
          f"; written to {out}")
    return 0
