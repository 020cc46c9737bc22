"""nnU-Net result folders predict as nnUNetv2_predict does, whatever the file's orientation and spacing.

The oracle is nnU-Net's own code (the stock `nnunetv2` package): its `nnUNetPredictor`, initialised by hand with the
project's own MedDINOv3 class (tiny, random weights) and the folder's plans, predicts the array SimpleITK reads (as
stored, spacing reversed), exactly as `nnUNetv2_predict` does; `meddinov3 segment` runs on the same image and folder.
Real CT: a crop of LiTS case 117. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

for _var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnunetv2 reads them at import
    os.environ.setdefault(_var, tempfile.gettempdir())

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import (compute_gaussian,  # noqa: E402
                                                          compute_steps_for_sliding_window)
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from meddinov3.checkpoints import load_model  # noqa: E402
from meddinov3.cli.main import main  # noqa: E402
from meddinov3.engine import gaussian_weights, segment_image, tile_starts  # noqa: E402
from meddinov3.engine.nnunet_mode import resample  # noqa: E402
from meddinov3.phantom import load_liver_ct  # noqa: E402
from meddinov3.volumes import direction_of_code, reoriented  # noqa: E402
from Testing.core.reference_dinov3 import make_dinov3_state_dict, make_primus_decoder_state_dict  # noqa: E402
from Testing.core.upstream_layouts import dataset_json, nnunet_checkpoint, plans_json  # noqa: E402
from Testing.helpers import make_package  # noqa: E402

TRAINER = "meddinov3_base_primus_multiscale_Trainer"
PATCH = (32, 32)
SPACING = (0.8, 0.8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A two-fold result folder of a tiny multi-scale MedDINOv3 (width 32, 4 blocks), patch 32x32 at 0.8 mm."""
    folder = tmp_path_factory.mktemp("nnunet") / "Dataset117_Liver" / f"{TRAINER}__nnUNetPlans__2d"
    folder.mkdir(parents=True)
    plans = plans_json(patch=PATCH, spacing=SPACING)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))
    for fold in (0, 1):
        enc = make_dinov3_state_dict(embed_dim=32, depth=4, num_heads=2, seed=10 + fold)
        dec = make_primus_decoder_state_dict(32 * 4, 3, seed=20 + fold)
        (folder / f"fold_{fold}").mkdir()
        torch.save(nnunet_checkpoint(enc, dec, TRAINER, plans, fold), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def ct():
    """12 slices x 48 x 48 of LiTS case 117 through the liver, 2.5 mm slices, 0.8 mm pixels, identity direction."""
    image, _ = load_liver_ct()
    crop = sitk.GetArrayFromImage(image)[44:56, 28:76, 14:62]
    out = sitk.GetImageFromArray(np.ascontiguousarray(crop))
    out.SetSpacing((0.8, 0.8, 2.5))
    return out


def nnunet_predict(folder, image: sitk.Image, tta: bool) -> np.ndarray:
    """Labels of nnU-Net's predictor for `image` (as SimpleITKIO reads it), on the image's array grid."""
    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    loaded = load_model(folder)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(loaded.networks[0], plans, plans.get_configuration("2d"),
                                    [net.state_dict() for net in loaded.networks],
                                    json.loads((folder / "dataset.json").read_text()), TRAINER,
                                    tuple(loaded.spec.mirroring_axes))
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    props = {"spacing": list(reversed(image.GetSpacing()))}
    return np.asarray(predictor.predict_single_npy_array(array, props, None, None, False))


def with_header(image: sitk.Image, spacing=None, direction=None) -> sitk.Image:
    out = sitk.Image(image)
    if spacing is not None:
        out.SetSpacing(spacing)
    if direction is not None:
        out.SetDirection(direction)
    return out


CASES = {
    "identity": lambda ct: ct,
    "flipped": lambda ct: with_header(ct, direction=direction_of_code("RAS")),  # an RAS-affine NIfTI, same voxels
    "permuted": lambda ct: reoriented(ct, (0, 2, 1), (False, True, False)),  # slices along the old y axis
    "resampled": lambda ct: with_header(ct, spacing=(0.9, 0.9, 2.5)),
}


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
@pytest.mark.parametrize("case", list(CASES))
def test_segment_agrees_with_nnunet_predictor(folder, ct, case, tta):
    """>= 99.9 % of voxels (two folds averaged); what differs are near-ties that nnU-Net's float16 buffers decide
    (see the next test)."""
    image = CASES[case](ct)
    expected = nnunet_predict(folder, image, tta)
    ours = segment_image(image, load_model(folder), device="cpu", tta=tta).label_array
    assert ours.shape == expected.shape
    counts = np.bincount(expected.ravel(), minlength=3)
    assert (counts > 0.05 * expected.size).sum() >= 2, counts  # a real segmentation, not one class everywhere
    agreement = float((ours == expected).mean())
    assert agreement >= 0.999, f"{case}: {agreement:.5f} of voxels agree"


@pytest.mark.parametrize("transpose", [(0, 2, 1), (2, 0, 1)])
def test_plans_transposes_are_nnunets(folder, ct, tmp_path, transpose):
    """The plans' transpose_forward / transpose_backward, also one that slices along another axis than z."""
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    plans = json.loads((copy / "plans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = list(transpose), [int(a) for a in np.argsort(transpose)]
    (copy / "plans.json").write_text(json.dumps(plans))
    expected = nnunet_predict(copy, ct, tta=False)
    ours = segment_image(ct, load_model(copy), device="cpu").label_array
    assert float((ours == expected).mean()) >= 0.999


def test_identical_to_nnunet_with_float32_buffers(folder, ct, monkeypatch):
    """nnU-Net accumulates tiles, Gaussian weights and logits in float16 (even on CPU); with those buffers in float32
    (the only change: its module's `torch.half` and `compute_gaussian`'s dtype patched) every voxel is identical, on
    the case that transposes, crops, resamples the image with nearest-neighbour rows and the logits back."""
    import types

    import nnunetv2.inference.predict_from_raw_data as predict_module

    torch32 = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    torch32.half = torch.float32
    monkeypatch.setattr(predict_module, "torch", torch32)
    gaussian16 = predict_module.compute_gaussian
    monkeypatch.setattr(predict_module, "compute_gaussian", lambda *a, **k: gaussian16(*a, **{**k, "dtype": torch.float32}))
    image = CASES["permuted"](ct)
    expected = nnunet_predict(folder, image, tta=False)
    ours = segment_image(image, load_model(folder), device="cpu").label_array
    assert np.array_equal(ours, expected)


def test_cli_and_converted_package_agree_with_nnunet(folder, ct, tmp_path):
    """`meddinov3 segment` on the folder and on its conversion (model.json says "slicing": "stored") on an
    RAS-stored NIfTI file: nnU-Net's labels, written on the input's grid (also with bf16 RoPE:
    --reference-precision moves only near-ties)."""
    image = CASES["flipped"](ct)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    expected = nnunet_predict(folder, sitk.ReadImage(str(tmp_path / "ct.nii.gz")), tta=False)
    assert main(["convert", str(folder), "-o", str(tmp_path / "pkg")]) == 0
    spec = json.loads((tmp_path / "pkg" / "model.json").read_text())
    assert spec["slicing"] == "stored" and spec["nnunet"]["resampling_data"]["order"] == 3
    for model, extra in ((folder, []), (tmp_path / "pkg", ["--reference-precision"])):
        out = tmp_path / f"{model.name}.nii.gz"
        assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--model", str(model),
                     "--device", "cpu", *extra]) == 0
        labels = sitk.ReadImage(str(out))
        assert labels.GetDirection() == image.GetDirection()
        assert float((sitk.GetArrayFromImage(labels) == expected).mean()) >= 0.999


def test_training_orientation_reorients_other_inputs(folder, ct):
    """Declared training orientation LPS: an input stored RAS (same patient, other voxel order) gets the labels
    nnU-Net gives the LPS-stored file, carried back to the input's own grid."""
    lps = ct  # identity direction: stored LPS
    ras = sitk.DICOMOrient(lps, "RAS")
    assert not np.array_equal(sitk.GetArrayFromImage(ras), sitk.GetArrayFromImage(lps))
    expected_lps = nnunet_predict(folder, lps, tta=False)
    ours = segment_image(ras, load_model(folder), device="cpu", training_orientation="LPS")
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(ours.labels, "LPS"))
    assert float((back == expected_lps).mean()) >= 0.999
    plain = segment_image(ras, load_model(folder), device="cpu").label_array  # as stored: nnU-Net on the RAS array
    assert float((plain == nnunet_predict(folder, ras, tta=False)).mean()) >= 0.999
    assert float((plain == ours.label_array).mean()) < 0.99  # the declaration matters for this network


def test_roi_and_probabilities(folder, ct):
    """A ROI is predicted as nnU-Net predicts that crop; outside it is background; the probabilities' argmax is
    the label map (no post-processing declared)."""
    result = segment_image(ct, load_model(folder), device="cpu", roi=(8, 0, 0, 40, 48, 12), return_probabilities=True)
    labels = result.label_array
    assert not labels[:, :, :8].any() and not labels[:, :, 40:].any()
    expected = nnunet_predict(folder, ct[8:40, :, :], tta=False)
    assert float((labels[:, :, 8:40] == expected).mean()) >= 0.999
    assert result.probabilities.shape == (3, *labels.shape)
    assert float((result.probabilities.argmax(0) == labels).mean()) >= 0.999


def test_training_orientation_options(folder, ct, tmp_path, capsys):
    """`convert --training-orientation` stores the code (its package then reorients like `segment
    --training-orientation`); bad codes and canonical packages are one-line errors."""
    assert main(["convert", str(folder), "-o", str(tmp_path / "pkg"), "--training-orientation", "lps"]) == 0
    assert json.loads((tmp_path / "pkg" / "model.json").read_text())["nnunet"]["training_orientation"] == "LPS"
    ras = sitk.DICOMOrient(ct, "RAS")
    from_package = segment_image(ras, load_model(tmp_path / "pkg"), device="cpu").label_array
    from_option = segment_image(ras, load_model(folder), device="cpu", training_orientation="LPS").label_array
    assert np.array_equal(from_package, from_option)
    capsys.readouterr()
    assert main(["convert", str(folder), "-o", str(tmp_path / "bad"), "--training-orientation", "RAR"]) == 2
    assert "--training-orientation: orientation code 'RAR' must be three letters" in capsys.readouterr().err
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    canonical = tmp_path / "canonical"
    make_package(canonical)
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "x.nii.gz"), "--model", str(canonical),
                 "--training-orientation", "RAS"]) == 2
    assert "--training-orientation is for nnU-Net result folders" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "bad").exists()


def test_checkpoint_mirroring_axes_are_used(folder, tmp_path):
    """`inference_allowed_mirroring_axes` of the checkpoint, not a hard-coded (0, 1)."""
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    for fold in (0, 1):
        path = copy / f"fold_{fold}" / "checkpoint_final.pth"
        ckpt = torch.load(path, weights_only=False)
        ckpt["inference_allowed_mirroring_axes"] = (1,)
        torch.save(ckpt, path)
    assert load_model(copy).spec.mirroring_axes == (1,)


@pytest.mark.parametrize("tile", [(32, 32), (64, 48), (33, 17), (896, 896)])
def test_gaussian_is_nnunets(tile):
    ours = gaussian_weights(tile, nnunet_peak=True)
    theirs = compute_gaussian(tile, sigma_scale=1 / 8, value_scaling_factor=1, dtype=torch.float32,
                              device=torch.device("cpu"))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert np.unravel_index(int(ours.argmax()), tile) == tuple(n // 2 for n in tile)


def test_sliding_window_steps_are_nnunets():
    for size in range(32, 400, 7):
        for tile in (32, 64, 96, 112):
            if size >= tile:
                assert tile_starts(size, tile) == compute_steps_for_sliding_window((size,), (tile,), 0.5)[0]


@pytest.mark.parametrize("spacings", [
    ((2.5, 0.8, 0.8), (2.5, 0.75, 0.75)),  # anisotropic: slice by slice
    ((1.0, 0.9, 0.9), (1.0, 0.75, 0.75)),  # isotropic enough: one 3D spline
    ((0.8, 2.5, 0.8), (0.8, 0.8, 0.8)),  # low resolution along a slice axis: nearest along it
])
@pytest.mark.parametrize("order", [3, 1])
def test_resampling_is_nnunets(spacings, order):
    current, new = spacings
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 6, 20, 24)).astype(np.float32)
    shape = [int(round(c / n * s)) for c, n, s in zip(current, new, data.shape[1:])]
    theirs = resample_data_or_seg_to_shape(data, shape, current, new, is_seg=False, order=order, order_z=0,
                                           force_separate_z=None)
    ours = resample(data, shape, current, new, order=order, order_z=0, force_separate_z=None)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
