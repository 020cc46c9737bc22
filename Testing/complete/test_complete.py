"""`meddinov3 complete` / `complete_image` on a crop of the real LiTS CT: painted slices kept, filling only between
each label's painted slices, geometry, .seg.nrrd names/colours, reoriented files, backbone-feature cache, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.checkpoints.loader import has_decoder, load_model, resolve
from meddinov3.cli.demo import DEMO_MODEL
from meddinov3.cli.main import main
from meddinov3.complete import complete_image
from meddinov3.complete.features import decoder_probabilities
from meddinov3.engine import segment_image
from meddinov3.options import SegmentOptions
from meddinov3.volumes import Orientation, reoriented, same_geometry
from Testing.helpers import load_liver_ct, make_package

PAINT_EVERY = 6


@pytest.fixture(scope="module")
def liver_crop():
    """(CT, truth, sparse) of a 64x64x48 crop of LiTS case 117: liver and tumour painted on every 6th axial slice."""
    ct, lab = load_liver_ct()
    box = ([32, 32, 40], [64, 64, 48])  # start (x, y, z), size
    ct, lab = (sitk.RegionOfInterest(im, box[1], box[0]) for im in (ct, lab))
    truth = sitk.GetArrayFromImage(lab)
    sparse = np.zeros_like(truth)
    sparse[2:46:PAINT_EVERY] = truth[2:46:PAINT_EVERY]
    sp = sitk.GetImageFromArray(sparse)
    sp.CopyInformation(lab)
    return ct, lab, sp


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_api_keeps_painted_slices_and_fills_between(liver_crop):
    ct, truth_img, sparse_img = liver_crop
    result = complete_image(ct, sparse_img, model="scratch", time_budget_s=3)
    out, truth, sparse = (sitk.GetArrayFromImage(i) for i in (result.labels, truth_img, sparse_img))
    assert same_geometry(result.labels, ct)
    painted = np.flatnonzero(sparse.reshape(len(sparse), -1).any(1))
    assert np.array_equal(out[painted], sparse[painted])  # voxel for voxel
    first, last = painted[0], painted[-1]
    assert not out[:first].any() and not out[last + 1:].any()  # nothing beyond the painted slices
    unpainted = np.setdiff1d(np.arange(first, last + 1), painted)
    assert dice(out[unpainted] == 1, truth[unpainted] == 1) > 0.85
    assert dice(out[unpainted] == 2, truth[unpainted] == 2) > 0.6
    assert result.least_confident["slice"] in unpainted
    assert [c.value for c in result.classes] == [0, 1, 2]


def test_label_range_is_per_label(liver_crop):
    """A label painted on fewer slices than another is filled only between its own first and last one."""
    ct, _, sparse_img = liver_crop
    sparse = sitk.GetArrayFromImage(sparse_img)
    sparse[sparse == 2] = 1
    for z in (20, 26, 32):  # label 3: the liver of slices 20, 26 and 32 (only the prior tells it from label 1)
        sparse[z][sparse[z] == 1] = 3
    sp = sitk.GetImageFromArray(sparse)
    sp.CopyInformation(sparse_img)
    out = sitk.GetArrayFromImage(complete_image(ct, sp, model="scratch", time_budget_s=2).labels)
    three = np.flatnonzero((out == 3).reshape(len(out), -1).any(1))
    liver = np.flatnonzero((out == 1).reshape(len(out), -1).any(1))
    assert three[0] == 20 and three[-1] == 32 and len(three) > 6
    assert liver[0] == 2 and liver[-1] == 44


def test_slices_follow_the_patient_axis(liver_crop, tmp_path):
    """Stored with S-I along the file's first axis: painted slices are still the axial ones, and the output is on the
    file's own grid."""
    ct, _, sparse_img = liver_crop
    perm, flip = (2, 0, 1), (False, True, False)
    ct_r, sp_r = reoriented(ct, perm, flip), reoriented(sparse_img, perm, flip)
    assert Orientation.of(ct_r).perm != (0, 1, 2)
    img, lab, out = tmp_path / "ct.nrrd", tmp_path / "sparse.nii.gz", tmp_path / "out.nii.gz"
    sitk.WriteImage(ct_r, str(img))
    sitk.WriteImage(sp_r, str(lab))
    assert main(["complete", str(img), "--labels", str(lab), "-o", str(out), "--model", "scratch",
                 "--time-budget", "2", "--device", "cpu"]) == 0
    result = sitk.ReadImage(str(out))
    assert same_geometry(result, ct_r)
    back = sitk.GetArrayFromImage(sitk.Resample(result, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
    sparse = sitk.GetArrayFromImage(sparse_img)
    painted = np.flatnonzero(sparse.reshape(len(sparse), -1).any(1))
    assert np.array_equal(back[painted], sparse[painted])
    assert back[painted[0] + 1: painted[1]].any()  # axial slices between were filled


def test_seg_nrrd_names_and_colours_kept(liver_crop, tmp_path, capsys):
    import slicerio

    from meddinov3.checkpoints.package import ClassInfo
    from meddinov3.engine.outputs import write_labels

    ct, _, sparse_img = liver_crop
    img, lab, out = tmp_path / "ct.nii.gz", tmp_path / "painted.seg.nrrd", tmp_path / "done.seg.nrrd"
    sitk.WriteImage(ct, str(img))
    classes = [ClassInfo(0, "background"), ClassInfo(1, "my liver", (10, 200, 30)), ClassInfo(2, "lesion", (250, 5, 5))]
    write_labels(sparse_img, lab, classes)
    assert main(["complete", str(img), "--labels", str(lab), "-o", str(out), "--model", "scratch",
                 "--time-budget", "2", "--device", "cpu", "--json-progress"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finished = next(e for e in events if e["event"] == "finished")
    assert "scratch" in finished["model"] and finished["least_confident"]["point"]
    seg = slicerio.read_segmentation(str(out))
    by_value = {s["labelValue"]: s for s in seg["segments"]}
    assert by_value[1]["name"] == "my liver" and by_value[2]["name"] == "lesion"
    assert np.allclose(by_value[1]["color"], [10 / 255, 200 / 255, 30 / 255], atol=1e-3)


def test_extrapolate_grows_a_single_painted_slice(liver_crop):
    ct, _, sparse_img = liver_crop
    sparse = sitk.GetArrayFromImage(sparse_img)
    one = np.zeros_like(sparse)
    one[26] = sparse[26]
    sp = sitk.GetImageFromArray(one)
    sp.CopyInformation(sparse_img)
    out = sitk.GetArrayFromImage(complete_image(ct, sp, model="scratch", time_budget_s=2, extrapolate=True).labels)
    assert np.array_equal(out[26], one[26])
    assert out[25].any() and out[27].any()


def test_backbone_features_are_cached_per_volume(liver_crop, tmp_path):
    """A model package's backbone (tiny, random: the official one is not offline here) gives the features; the
    second run on the same volume reads them from the cache."""
    ct, _, sparse_img = liver_crop
    pkg = make_package(tmp_path / "pkg", seed=1)
    voxels = sitk.GetArrayFromImage(ct)
    first = complete_image(ct, sparse_img, model=str(pkg), time_budget_s=1)
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), voxels)  # the caller's image is left as it was
    second = complete_image(ct, sparse_img, model=str(pkg), time_budget_s=1)
    assert not first.stats["features_cached"] and second.stats["features_cached"]
    assert same_geometry(second.labels, ct)


def test_a_model_packages_decoder_gives_the_head_its_classes(liver_crop, tmp_path):
    """A model package (the shipped demo model) contributes its own segmentation: its class probabilities, in the
    canonical layout whatever the file's axis order, become inputs of the head; the second run reads them from the
    cache. A bare backbone has no decoder and contributes none."""
    ct, _, sparse_img = liver_crop
    perm, flip = (2, 0, 1), (False, True, False)
    ct_r, sp_r = reoriented(ct, perm, flip), reoriented(sparse_img, perm, flip)
    demo = str(resolve(DEMO_MODEL, offline=True))
    first = complete_image(ct_r, sp_r, model=demo, time_budget_s=1)
    second = complete_image(ct_r, sp_r, model=demo, time_budget_s=1)
    assert first.stats["decoder_classes"] == ["liver", "tumour"] and not first.stats["decoder_cached"]
    assert second.stats["decoder_cached"] and same_geometry(second.labels, ct_r)

    orient = Orientation.of(ct_r)
    probs, names, _ = decoder_probabilities(ct_r, orient.to_canonical, demo, torch.device("cpu"), "", use_cache=False)
    engine = segment_image(ct_r, load_model(demo), SegmentOptions(device="cpu", postprocess=False))
    expected = orient.to_canonical(engine.label_array)
    background = 255 - probs.astype(np.int32).sum(0)
    from_probs = np.argmax(np.concatenate([background[None], probs.astype(np.int32)]), axis=0)
    assert probs.dtype == np.uint8 and probs.shape == (2, *expected.shape)
    assert (from_probs == expected).mean() > 0.99 and (expected > 0).any()

    backbone = str(make_package(tmp_path / "backbone", kind="backbone"))
    assert has_decoder(demo) and not has_decoder(backbone)  # from model.json, no weights read
    assert decoder_probabilities(ct_r, orient.to_canonical, backbone, torch.device("cpu"), "")[:2] == (None, [])


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def _with(sparse_img, array):
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(sparse_img)
    return out


@pytest.mark.parametrize("case, message", [
    ("other_grid", "another grid"),
    ("nothing_painted", "no painted slice"),
    ("one_slice", "only one painted slice"),
    ("value_too_large", "cannot hold"),
    ("fractional", "whole numbers"),
    ("unreadable_image", "unreadable"),
])
def test_bad_input_one_error_nothing_written(liver_crop, tmp_path, capsys, case, message):
    ct, _, sparse_img = liver_crop
    sparse = sitk.GetArrayFromImage(sparse_img)
    img = _write(ct, tmp_path / "ct.nii.gz")
    if case == "other_grid":
        lab = _write(sitk.RegionOfInterest(sparse_img, [64, 64, 40], [0, 0, 0]), tmp_path / "l.nii.gz")
    elif case == "nothing_painted":
        lab = _write(_with(sparse_img, np.zeros_like(sparse)), tmp_path / "l.nii.gz")
    elif case == "one_slice":
        one = np.zeros_like(sparse)
        one[20] = sparse[20]
        lab = _write(_with(sparse_img, one), tmp_path / "l.nii.gz")
    elif case == "value_too_large":
        lab = _write(_with(sparse_img, sparse.astype(np.uint32) * 40000), tmp_path / "l.nrrd")
    elif case == "fractional":
        lab = _write(_with(sparse_img, sparse.astype(np.float32) * 0.5), tmp_path / "l.nrrd")
    else:
        lab = _write(sparse_img, tmp_path / "l.nii.gz")
        img = tmp_path / "broken.nii.gz"
        img.write_bytes(b"not an image")
    out = tmp_path / "out.seg.nrrd"
    code = main(["complete", str(img), "--labels", str(lab), "-o", str(out), "--model", "scratch",
                 "--time-budget", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert str(img if case == "unreadable_image" else lab) in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_existing_output_needs_overwrite(liver_crop, tmp_path, capsys):
    ct, _, sparse_img = liver_crop
    img, lab = _write(ct, tmp_path / "ct.nii.gz"), _write(sparse_img, tmp_path / "l.nii.gz")
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"mine")
    assert main(["complete", str(img), "--labels", str(lab), "-o", str(out), "--model", "scratch"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"


def test_default_model_is_scratch_when_the_official_backbone_is_not_here(tmp_path, monkeypatch):
    """No official backbone offline (empty model store and Hugging Face cache): scratch, and the reason is given."""
    from meddinov3.complete.features import OFFICIAL_BACKBONE, choose_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ref, note = choose_model(None)
    assert ref is None and "scratch" in note and OFFICIAL_BACKBONE in note
    assert choose_model("scratch")[0] is None and choose_model("some/package")[0] == "some/package"


def test_repeat_after_a_correction_starts_from_the_last_head(liver_crop):
    """Complete, paint one more slice (a correction), Complete again: the second fit continues from the cached head
    with half the budget; painted slices, the corrected one included, are kept."""
    ct, truth_img, sparse_img = liver_crop
    first = complete_image(ct, sparse_img, model="scratch", time_budget_s=2)
    sparse, truth = sitk.GetArrayFromImage(sparse_img), sitk.GetArrayFromImage(truth_img)
    sparse[first.least_confident["slice"]] = truth[first.least_confident["slice"]]
    corrected = sitk.GetImageFromArray(sparse)
    corrected.CopyInformation(sparse_img)
    second = complete_image(ct, corrected, model="scratch", time_budget_s=2)
    assert not first.stats["fit"]["warm_start"] and second.stats["fit"]["warm_start"]
    assert second.stats["fit"]["seconds"] <= 1.5
    out = sitk.GetArrayFromImage(second.labels)
    painted = np.flatnonzero(sparse.reshape(len(sparse), -1).any(1))
    assert np.array_equal(out[painted], sparse[painted])
    assert not complete_image(ct, corrected, model="scratch", time_budget_s=1, use_cache=False).stats["fit"]["warm_start"]
