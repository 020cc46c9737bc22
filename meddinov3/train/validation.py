"""Validation of a fine-tuning run: whole-volume inference through the engine, scored as nnU-Net scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import Dataset, read_case


def validate(net, spec, ds: Dataset, names: list[str], device, tta: bool = False, save_to: Path | None = None) -> dict:
    """Whole-volume inference through the engine on each validation case, scored as nnU-Net does.

    Returns {"dice": {class name: mean Dice over cases, NaN where a class is in no prediction and no truth},
    "mean_dice": mean of the non-NaN class Dice, "cases": {case: {class name: Dice}}, "summary": nnU-Net's
    summary (`meddinov3.evaluation`)}. `save_to`: also write each prediction there as `<case>.nii.gz`.
    """
    import copy

    import SimpleITK as sitk

    from ..checkpoints import LoadedModel
    from ..engine import segment_image
    from ..evaluation import case_metrics, summarize

    net = copy.deepcopy(net).eval()  # the engine may cast / compile its networks: never touch the trained one
    loaded = LoadedModel(spec, [net], "package", Path(spec.name))
    values = [c.value for c in spec.classes if c.value != 0]
    per_case = []
    try:
        for case in ds.cases:
            if case.name not in names:
                continue
            image, label = read_case(case, ds.modality)
            with torch.no_grad():
                result = segment_image(image, loaded, device=device, tta=tta, source=str(case.image))
            prediction = None
            if save_to is not None:
                prediction = save_to / f"{case.name}.nii.gz"
                sitk.WriteImage(result.labels, str(prediction), True)
            metrics = case_metrics(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(result.labels), values)
            per_case.append({"reference_file": str(case.label),
                             "prediction_file": str(prediction) if prediction else None, "metrics": metrics,
                             "case": case.name})
    finally:
        del loaded, net
    names_by_value = {c.value: c.name for c in spec.classes}
    cases = {c.pop("case"): {names_by_value[v]: m["Dice"] for v, m in c["metrics"].items()} for c in per_case}
    summary = summarize(per_case, values)
    dice = {names_by_value[v]: summary["mean"][v]["Dice"] for v in values}
    scored = [d for d in dice.values() if not math.isnan(d)]
    return {"dice": dice, "mean_dice": float(np.mean(scored)) if scored else 0.0, "cases": cases, "summary": summary}
