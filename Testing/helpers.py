"""Shared test helpers: tiny model packages, a deterministic intensity-threshold model, real/phantom CT, DICOM.

API:
- `make_package(folder, num_classes=3, seed=0, folds=1, **spec_fields) -> Path`: tiny random MedDINOv3 package.
- `ThresholdNet(transpose=False)`: local 5x5 conv "network" on HU: 0 background, 1 above ~100 HU, 2 above ~475 HU
  plus a vertical-gradient term, so its output depends on intensity *and* slice orientation.
- `threshold_model(**spec_fields) -> LoadedModel` of ThresholdNet(s) (normalisation none, no resampling by default).
- `load_liver_ct()`: LiTS case 117 as (CT, labels) SimpleITK images (the project's loader).
- `write_dicom_series(image, folder)`: int16 CT DICOM series of a SimpleITK image.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk
import torch
from torch import nn

from meddinov3.checkpoints import ClassInfo, LoadedModel, ModelSpec, write_package
from meddinov3.config import model_config
from meddinov3.model import build_model
from meddinov3.phantom import load_liver_ct, make_phantom_ct  # noqa: F401 - re-exported for tests

CLASSES3 = [ClassInfo(0, "background"), ClassInfo(1, "liver"), ClassInfo(2, "tumour")]


def make_package(folder, num_classes: int = 3, seed: int = 0, folds: int = 1, **spec_fields) -> Path:
    torch.manual_seed(seed)
    cfg = model_config("tiny", num_classes=num_classes)
    sds = [build_model(cfg).state_dict() for _ in range(folds)]
    classes = CLASSES3 if num_classes == 3 else [ClassInfo(i, f"class_{i}") for i in range(num_classes)]
    spec = ModelSpec(name="tiny-test", config=cfg, classes=classes, folds=[str(i) for i in range(folds)],
                     weights=[f"fold_{i}.safetensors" for i in range(folds)], **spec_fields)
    return write_package(folder, spec, sds)


class ThresholdNet(nn.Module):
    def __init__(self, transpose: bool = False, k: float = 0.05):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 5, padding=2)
        w = torch.zeros(3, 1, 5, 5)
        b = torch.zeros(3)
        w[1, 0, 2, 2], b[1] = k, -k * 100          # class 1: x > 100 HU
        w[2, 0, 2, 2], b[2] = 3 * k, -3 * k * 350  # class 2: beats class 1 above ~475 HU
        w[2, 0, 1, 2] += k                          # + k * (pixel above - pixel below): orientation-dependent
        w[2, 0, 3, 2] -= k
        if transpose:
            w = w.transpose(-1, -2).contiguous()
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(b)

    def forward(self, x):
        return self.conv(x.float())


def threshold_model(nets: list[nn.Module] | None = None, **spec_fields) -> LoadedModel:
    fields = dict(normalization={"scheme": "none"}, spacing=None, patch_size=None, classes=list(CLASSES3))
    fields.update(spec_fields)
    nets = nets or [ThresholdNet()]
    spec = ModelSpec(name="threshold", config=model_config("tiny", num_classes=3),
                     folds=[str(i) for i in range(len(nets))], weights=["x"] * len(nets), **fields)
    return LoadedModel(spec, [n.eval() for n in nets], "test", Path("threshold"))


def write_dicom_series(image: sitk.Image, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + "1" * 10
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        origin = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".0",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])),
            "0020|0032": "\\".join(f"{v:.4f}" for v in origin), "0020|0013": str(k + 1),
            "0018|0050": f"{img.GetSpacing()[2]:.4f}", "0028|1052": "0", "0028|1053": "1",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        sl.SetSpacing(img.GetSpacing()[:2])
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)
    return folder
