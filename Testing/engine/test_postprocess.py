"""Package-declared post-processing: largest region of a label group after cutting thin bridges (in mm)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.checkpoints.package import read_spec
from meddinov3.checkpoints.safe_load import CheckpointError
from meddinov3.cli.main import main as cli_main
from meddinov3.engine import segment_image
from meddinov3.engine.postprocess import apply_postprocessing, largest_region
from meddinov3.phantom import make_phantom_ct
from Testing.helpers import make_package, threshold_model


def two_cubes_with_bridge(bridge_thickness: int = 1) -> np.ndarray:
    """A 16^3 'organ' and a 6^3 'false positive' joined by a thin bar (z, y, x)."""
    m = np.zeros((30, 30, 50), bool)
    m[5:21, 5:21, 2:18] = True
    m[10:16, 10:16, 30:36] = True
    m[12:12 + bridge_thickness, 12:12 + bridge_thickness, 18:30] = True
    return m


def test_opening_cuts_a_thin_bridge_and_keeps_the_organ_whole():
    m = two_cubes_with_bridge()
    assert largest_region(m).sum() == m.sum()  # plain connectivity: the bridge joins everything
    kept = largest_region(m, (1.0, 1.0, 1.0), opening_mm=2.0)
    organ = np.zeros_like(m)
    organ[5:21, 5:21, 2:18] = True
    assert not kept[10:16, 10:16, 30:36].any()  # the island behind the bridge is gone
    assert (kept & organ).sum() == organ.sum()  # every voxel of the organ, corners and faces included, stays
    assert (kept & ~organ).sum() <= 2 * 2  # at most the bridge's stub within the opening radius


def test_opening_is_in_millimetres_along_each_axis():
    """A bridge 2 voxels thick is 1 mm at 0.5 mm spacing (cut by a 1 mm opening) but 4 mm at 2 mm (kept)."""
    m = two_cubes_with_bridge(bridge_thickness=2)
    assert not largest_region(m, (0.5, 0.5, 0.5), opening_mm=1.0)[10:16, 10:16, 30:36].any()
    assert largest_region(m, (2.0, 2.0, 2.0), opening_mm=1.0)[10:16, 10:16, 30:36].all()


def test_opening_work_is_bounded_at_absurdly_fine_spacing():
    """A 2 mm opening at 0.001 mm spacing would need a 4001^3 structuring element (476 GiB): it is capped at
    MAX_OPENING_VOXELS per axis, so the 16^3 'organ' is thinner than the opening and connectivity decides."""
    m = two_cubes_with_bridge()
    assert np.array_equal(largest_region(m, (0.001, 0.001, 0.001), opening_mm=2.0), m)


def test_group_keeps_lesions_inside_the_organ_and_drops_the_rest():
    labels = two_cubes_with_bridge().astype(np.uint8)  # 1 = liver
    labels[8:12, 8:12, 8:12] = 2  # tumour inside the liver
    labels[11:15, 11:15, 31:35] = 2  # tumour inside the false positive
    labels[25:28, 25:28, 40:44] = 2  # a lone tumour blob
    steps = [{"step": "largest_component", "labels": [1, 2], "opening_mm": 2.0}]
    out = apply_postprocessing(labels.copy(), steps, [0, 1, 2], (1.0, 1.0, 1.0))
    assert (out[8:12, 8:12, 8:12] == 2).all()
    assert not out[10:16, 10:16, 30:36].any() and not out[25:28, 25:28, 40:44].any()
    assert (out == 1).sum() >= 16**3 - 4**3


@pytest.mark.parametrize("steps, message", [
    ({"step": "largest_component"}, "must be a list"),
    ([{"step": "smooth", "labels": [1]}], "unknown step"),
    ([{"step": "largest_component", "labels": [0]}], "foreground label values"),
    ([{"step": "largest_component", "labels": [7]}], "foreground label values"),
    ([{"step": "largest_component", "labels": [1], "opening_mm": -1}], "opening_mm"),
    ([{"step": "largest_component", "labels": [1], "radius": 2}], "unknown keys"),
])
def test_bad_postprocessing_in_model_json_is_refused(tmp_path, steps, message):
    pkg = make_package(tmp_path / "pkg")
    meta = json.loads((pkg / "model.json").read_text())
    meta["postprocessing"] = steps
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as err:
        read_spec(pkg)
    assert "model.json" in str(err.value)


def test_engine_and_cli_apply_the_package_steps_unless_told_not_to(tmp_path):
    """The threshold model labels everything above 100 HU: a bright cube and a bright bar touching it; the
    package step (opening 3 mm) keeps the cube only; `postprocess=False` / `--no-postprocessing` keep both."""
    arr = np.full((20, 40, 60), -50, np.int16)
    arr[4:16, 8:32, 4:28] = 200  # the organ
    arr[9:11, 19:21, 28:50] = 200  # a 2-voxel (2 mm) bar leading away from it
    image = sitk.GetImageFromArray(arr)
    step = [{"step": "largest_component", "labels": [1, 2], "opening_mm": 3.0}]
    model = threshold_model(postprocessing=step)
    with_pp = sitk.GetArrayFromImage(segment_image(image, model, device="cpu").labels)
    without = sitk.GetArrayFromImage(segment_image(image, model, device="cpu", postprocess=False).labels)
    assert without[10, 20, 40] == 1 and with_pp[10, 20, 40] == 0
    assert (with_pp[4:16, 8:32, 4:28] == 1).all()

    pkg = make_package(tmp_path / "pkg")  # the CLI path: the declared steps travel through model.json
    meta = json.loads((pkg / "model.json").read_text())
    meta["postprocessing"] = [{"step": "largest_component", "labels": [1], "opening_mm": 1.0}]
    (pkg / "model.json").write_text(json.dumps(meta))
    assert read_spec(pkg).postprocessing == meta["postprocessing"]
    ct, _ = make_phantom_ct((8, 48, 48), spacing=(2.0, 2.0, 4.0), seed=1)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    for flag, name in (([], "pp"), (["--no-postprocessing"], "raw")):
        assert cli_main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / f"{name}.nii.gz"),
                         "--model", str(pkg), "--device", "cpu", "--save-probabilities",
                         str(tmp_path / f"{name}.npz"), *flag]) == 0
    # the probabilities are the model's: they say which steps the labels had after it
    assert json.loads(str(np.load(tmp_path / "pp.npz")["postprocessing"])) == meta["postprocessing"]
    raw_npz = np.load(tmp_path / "raw.npz")
    assert json.loads(str(raw_npz["postprocessing"])) == []
    p = np.sort(raw_npz["probabilities"].astype(np.float32), axis=0)
    clear = p[-1] - p[-2] > 2e-3  # float16 keeps the argmax wherever the top two differ by more than its step
    assert clear.mean() > 0.99
    pp = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp.nii.gz")))
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw.nii.gz")))
    argmax = raw_npz["probabilities"].argmax(0)
    assert np.array_equal(argmax[clear], raw[clear]) and (argmax == raw).mean() > 0.999
    cc_pp = largest_region(pp == 1, (4.0, 2.0, 2.0), 1.0)
    assert np.array_equal(pp == 1, cc_pp)  # post-processed output is already one region
    assert ((raw == 1) & ~(pp == 1)).sum() == ((raw == 1) & ~largest_region(raw == 1, (4.0, 2.0, 2.0), 1.0)).sum()
