"""Segmentation metrics with nnU-Net v2's conventions (`nnunetv2/evaluation/evaluate_predictions.py`).

Per case and label: TP, FP, FN, TN, n_pred (= TP + FP), n_ref (= TP + FN), Dice 2TP / (2TP + FP + FN) and IoU
TP / (TP + FP + FN), both NaN when the label is absent from prediction and reference (TP + FP + FN = 0).
`summary.json`: `metric_per_case` (one entry per case: reference_file, prediction_file, metrics by label),
`mean` (per label, NaN-ignoring mean over cases) and `foreground_mean` (plain mean over the non-zero labels of
`mean`, so NaN if a label is NaN in every case), keys sorted and labels as strings, as nnU-Net writes it.
Voxels whose reference is the ignore label (if any) count nowhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


class EvaluationError(ValueError):
    """Unusable inputs (missing prediction, size mismatch, no labels); the message names the file."""


def case_metrics(reference: np.ndarray, prediction: np.ndarray, labels: list[int],
                 ignore_label: int | None = None) -> dict[int, dict]:
    """{label: {metric: value}} of one case; `reference` and `prediction` integer arrays of one shape."""
    use = reference != ignore_label if ignore_label is not None else None  # None: every voxel counts
    counted = int(np.count_nonzero(use)) if use is not None else reference.size
    out = {}
    for label in labels:
        ref, pred = reference == label, prediction == label
        if use is not None:
            ref, pred = ref & use, pred & use
        tp = int(np.count_nonzero(ref & pred))
        fp = int(np.count_nonzero(pred)) - tp
        fn = int(np.count_nonzero(ref)) - tp
        tn = counted - tp - fp - fn
        denom = tp + fp + fn
        out[label] = {"Dice": 2 * tp / (2 * tp + fp + fn) if denom else math.nan,
                      "IoU": tp / denom if denom else math.nan,
                      "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}
    return out


def summarize(per_case: list[dict], labels: list[int]) -> dict:
    """nnU-Net's summary from `per_case` entries ({"reference_file", "prediction_file", "metrics": {label: ...}})."""
    means = {}
    for label in labels:
        means[label] = {}
        for m in METRICS:
            values = np.array([c["metrics"][label][m] for c in per_case], float)
            means[label][m] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else math.nan
    foreground = [v for k, v in means.items() if k != 0]
    foreground_mean = {m: float(np.mean([v[m] for v in foreground])) if foreground else math.nan for m in METRICS}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground_mean}


def to_json(summary: dict) -> str:
    """The summary as nnU-Net's `save_summary_json` writes it: label keys as strings, sorted keys, indent 4."""
    converted = {**summary, "mean": {str(k): v for k, v in summary["mean"].items()},
                 "metric_per_case": [{**c, "metrics": {str(k): v for k, v in c["metrics"].items()}}
                                     for c in summary["metric_per_case"]]}
    return json.dumps(converted, sort_keys=True, indent=4) + "\n"


def labels_from_dataset_json(path) -> tuple[list[int], int | None]:
    """(foreground label values, ignore label or None) from an nnU-Net `dataset.json` (regions are refused)."""
    try:
        raw = json.loads(Path(path).read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluationError(f"{path}: cannot read its 'labels' ({e})") from None
    if not isinstance(raw, dict) or any(not isinstance(v, int) or isinstance(v, bool) for v in raw.values()):
        raise EvaluationError(f"{path}: 'labels' must map names to integer values (regions are not supported)")
    ignore = raw.get("ignore")
    return sorted(v for k, v in raw.items() if v != 0 and k != "ignore"), ignore


def _files_by_case(folder: Path) -> dict[str, Path]:
    from .volumes import image_suffix, strip_suffix

    if not folder.is_dir():
        raise EvaluationError(f"{folder}: no such folder")
    return {strip_suffix(p): p for p in sorted(folder.iterdir()) if p.is_file() and image_suffix(p)}


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise EvaluationError(f"{path}: cannot read the label map ({str(e).strip().splitlines()[-1]})") from None


def evaluate_folders(pred_folder: str | os.PathLike, gt_folder: str | os.PathLike, labels: list[int] | None = None,
                     ignore_label: int | None = None) -> dict:
    """Match files by case name (file name without its image suffix); every reference needs a prediction.

    `labels`: the label values to score (default: every non-zero value in any reference or prediction).
    Predictions without a reference are not scored. Returns the summary (see `summarize`).
    """
    preds, refs = _files_by_case(Path(pred_folder)), _files_by_case(Path(gt_folder))
    if not refs:
        raise EvaluationError(f"{gt_folder}: no label maps (.nii.gz, .nii, .nrrd, .mha, .mhd)")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise EvaluationError(f"{pred_folder}: no prediction for case(s) {', '.join(missing[:10])}"
                              f"{' ...' if len(missing) > 10 else ''} of {gt_folder}")
    per_case, scored = [], set(labels or [])
    for name, ref_path in refs.items():  # one case in memory at a time
        ref, pred = _read_labels(ref_path), _read_labels(preds[name])
        if ref.shape != pred.shape:
            raise EvaluationError(f"{preds[name]}: size {pred.shape[::-1]} differs from the reference's "
                                  f"{ref.shape[::-1]} ({ref_path})")
        present = labels if labels is not None else sorted(
            int(v) for v in set(np.unique(ref).tolist()) | set(np.unique(pred).tolist()) if v not in (0, ignore_label))
        scored |= set(present)
        # a label absent from both maps scores TN = every counted voxel (what case_metrics gives it)
        counted = int(np.count_nonzero(ref != ignore_label)) if ignore_label is not None else ref.size
        per_case.append({"reference_file": str(ref_path), "prediction_file": str(preds[name]),
                         "metrics": case_metrics(ref, pred, present, ignore_label), "_counted": counted})
    if not scored:
        raise EvaluationError(f"{gt_folder}: no labels to score (every map is background)")
    labels = sorted(scored)
    for case in per_case:
        counted = case.pop("_counted")
        for label in labels:
            case["metrics"].setdefault(label, {"Dice": math.nan, "IoU": math.nan, "FP": 0, "TP": 0, "FN": 0,
                                               "TN": counted, "n_pred": 0, "n_ref": 0})
        case["metrics"] = {k: case["metrics"][k] for k in labels}
    return summarize(per_case, labels)
