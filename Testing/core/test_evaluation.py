"""`meddinov3 evaluate` and `meddinov3.evaluation`: nnU-Net's compute_metrics conventions on label maps with known
counts (written as real NIfTI / NRRD files through SimpleITK)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.cli.main import main
from meddinov3.evaluation import case_metrics, evaluate_folders, summarize


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8)), str(path))


@pytest.fixture
def folders(tmp_path):
    """Two cases of 1 x 4 x 5 voxels (20 each), labels 1-3. Label 3 is in no map of case `a`; label 2 in no map
    at all. Counts are worked out by hand in the tests."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    ref_a = np.zeros((1, 4, 5), np.uint8)
    ref_a[0, 0, :4] = 1                     # 4 reference voxels of label 1
    pred_a = np.zeros_like(ref_a)
    pred_a[0, 0, 1:4] = 1                   # TP 3, FN 1
    pred_a[0, 3, 0:2] = 1                   # FP 2
    ref_b = np.zeros((1, 4, 5), np.uint8)
    ref_b[0, 1, :] = 3                      # 5 voxels of label 3; label 1 absent from reference
    pred_b = np.zeros_like(ref_b)
    pred_b[0, 1, :] = 3                     # perfect label 3
    pred_b[0, 2, 0] = 1                     # label 1: FP 1, TP 0 -> Dice 0
    _write(gt / "a.nii.gz", ref_a)
    _write(pred / "a.nii.gz", pred_a)
    _write(gt / "b.nii.gz", ref_b)
    _write(pred / "b.nrrd", pred_b)         # matched by case name, whatever the suffix
    return pred, gt


def test_case_metrics_counts_and_nan_when_absent_from_both():
    ref = np.array([[1, 1, 0, 0, 2]])
    pred = np.array([[1, 0, 1, 0, 0]])
    m = case_metrics(ref, pred, [1, 2, 3])
    assert m[1] == {"Dice": 0.5, "IoU": 1 / 3, "FP": 1, "TP": 1, "FN": 1, "TN": 2, "n_pred": 2, "n_ref": 2}
    assert m[2]["Dice"] == 0.0 and m[2]["FN"] == 1 and m[2]["TN"] == 4
    assert math.isnan(m[3]["Dice"]) and math.isnan(m[3]["IoU"]) and m[3]["TN"] == 5 and m[3]["n_ref"] == 0
    # voxels whose reference is the ignore label count nowhere
    ignored = case_metrics(np.array([[1, 9, 9]]), np.array([[1, 1, 0]]), [1], ignore_label=9)
    assert ignored[1] == {"Dice": 1.0, "IoU": 1.0, "FP": 0, "TP": 1, "FN": 0, "TN": 0, "n_pred": 1, "n_ref": 1}


def test_summary_means_leave_nan_out_and_foreground_mean_averages_labels(folders):
    pred, gt = folders
    s = evaluate_folders(pred, gt)
    assert [c["reference_file"].rsplit("/", 1)[-1] for c in s["metric_per_case"]] == ["a.nii.gz", "b.nii.gz"]
    assert s["metric_per_case"][1]["prediction_file"].endswith("b.nrrd")
    a, b = (c["metrics"] for c in s["metric_per_case"])
    assert sorted(a) == [1, 3]  # the labels found anywhere; label 2 is in no map
    assert a[1]["Dice"] == pytest.approx(6 / 9) and a[1]["IoU"] == pytest.approx(3 / 6)
    assert (a[1]["TP"], a[1]["FP"], a[1]["FN"], a[1]["TN"]) == (3, 2, 1, 14)
    assert math.isnan(a[3]["Dice"]) and a[3]["TN"] == 20          # label 3 absent from both maps of case a
    assert b[1]["Dice"] == 0.0 and b[3]["Dice"] == 1.0
    # mean per label: NaN cases left out (label 3: only case b counts), counts averaged
    assert s["mean"][1]["Dice"] == pytest.approx((6 / 9 + 0) / 2)
    assert s["mean"][3]["Dice"] == 1.0 and s["mean"][3]["TP"] == 2.5
    assert s["foreground_mean"]["Dice"] == pytest.approx(((6 / 9) / 2 + 1) / 2)


def test_cli_writes_nnunet_summary_json_with_labels_from_dataset_json(folders, tmp_path, capsys):
    pred, gt = folders
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}}))
    out = tmp_path / "summary.json"
    assert main(["evaluate", str(pred), str(gt), "-o", str(out), "--labels", str(dataset_json)]) == 0
    text = out.read_text()
    data = json.loads(text)
    assert list(data) == ["foreground_mean", "mean", "metric_per_case"]     # sort_keys, as nnU-Net writes it
    assert list(data["mean"]) == ["1", "2", "3"]                            # labels as strings
    assert "NaN" in text and math.isnan(data["mean"]["2"]["Dice"])           # label 2 in no case at all
    assert math.isnan(data["foreground_mean"]["Dice"])                      # nnU-Net: plain mean over the labels
    assert data["metric_per_case"][0]["metrics"]["1"]["n_ref"] == 4
    # never overwritten without --overwrite
    assert main(["evaluate", str(pred), str(gt), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate", str(pred), str(gt), "-o", str(out), "--overwrite"]) == 0
    assert list(json.loads(out.read_text())["mean"]) == ["1", "3"]


def test_cli_missing_prediction_or_size_mismatch_is_one_clear_error(folders, tmp_path, capsys):
    pred, gt = folders
    (pred / "b.nrrd").unlink()
    out = tmp_path / "s.json"
    assert main(["evaluate", str(pred), str(gt), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no prediction for case(s) b" in err and not out.exists()
    _write(pred / "b.nii.gz", np.zeros((1, 4, 4)))
    assert main(["evaluate", str(pred), str(gt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "differs from the reference" in err and not out.exists()


def test_summarize_of_one_label_absent_everywhere_is_nan():
    per_case = [{"reference_file": "r", "prediction_file": "p",
                 "metrics": case_metrics(np.zeros((2, 2)), np.zeros((2, 2)), [1])}]
    s = summarize(per_case, [1])
    assert math.isnan(s["mean"][1]["Dice"]) and s["mean"][1]["TN"] == 4
