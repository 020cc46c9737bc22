"""Geometry: output grid equals input grid; any axis order / flips / oblique cosines give the same labels in patient space."""


import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.engine import segment_image
from meddinov3.phantom import make_phantom_ct, oblique_direction
from meddinov3.volumes import Orientation, reoriented, same_geometry
from Testing.helpers import ThresholdNet, threshold_model


@pytest.fixture(scope="module")
def phantom():
    image, _ = make_phantom_ct((20, 40, 36), spacing=(2.5, 3.0, 4.0), seed=1)
    return image


def on_grid(labels: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Labels resampled (nearest) onto `reference`'s grid: same physical space, so only a voxel reordering."""
    out = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out)


def test_threshold_net_is_orientation_sensitive():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4:, :] = 800.0
    net = ThresholdNet()
    a = net(x).argmax(1)
    b = net(x.flip(-2)).argmax(1).flip(-2)
    assert not torch.equal(a, b), "test model must not be flip invariant, or orientation bugs would go unseen"


@pytest.mark.parametrize("perm,flip", [((0, 1, 2), (True, False, False)), ((2, 0, 1), (False, True, False)),
                                       ((1, 2, 0), (True, True, True)), ((0, 2, 1), (False, False, True))])
def test_orientation_round_trip(phantom, perm, flip):
    moved = reoriented(phantom, perm, flip)
    o = Orientation.of(moved)
    canon = o.to_canonical(sitk.GetArrayFromImage(moved))
    assert np.array_equal(canon, sitk.GetArrayFromImage(phantom))
    assert np.array_equal(o.from_canonical(canon), sitk.GetArrayFromImage(moved))
    assert o.canonical_spacing(moved.GetSpacing()) == (4.0, 3.0, 2.5)


def test_reoriented_copies_give_same_labels(phantom):
    model = threshold_model()
    ref = segment_image(phantom, model, device="cpu").labels
    ref_arr = sitk.GetArrayFromImage(ref)
    assert same_geometry(ref, phantom)
    assert set(np.unique(ref_arr)) == {0, 1, 2}
    for perm, flip in [((2, 0, 1), (True, False, True)), ((1, 0, 2), (False, True, False)),
                       ((0, 2, 1), (True, True, True))]:
        moved = reoriented(phantom, perm, flip)
        out = segment_image(moved, model, device="cpu").labels
        assert same_geometry(out, moved)
        assert np.array_equal(on_grid(out, phantom), ref_arr), (perm, flip)


def test_without_reorientation_labels_would_differ(phantom):
    """Guard for the test above: segmenting the raw (non-canonical) slices of a permuted copy differs."""
    moved = reoriented(phantom, (2, 0, 1), (False, False, False))
    arr = torch.from_numpy(sitk.GetArrayFromImage(moved).astype(np.float32))[:, None]
    raw = ThresholdNet()(arr).argmax(1).numpy().astype(np.uint8)
    raw_img = sitk.GetImageFromArray(raw)
    raw_img.CopyInformation(moved)
    ref = sitk.GetArrayFromImage(segment_image(phantom, threshold_model(), device="cpu").labels)
    assert not np.array_equal(on_grid(raw_img, phantom), ref)


def test_oblique_direction(phantom):
    image = sitk.Image(phantom)
    image.SetDirection(oblique_direction(12.0, "z"))
    model = threshold_model()
    ref = segment_image(image, model, device="cpu").labels
    assert same_geometry(ref, image)
    moved = reoriented(image, (1, 0, 2), (True, False, True))
    out = segment_image(moved, model, device="cpu").labels
    assert same_geometry(out, moved)
    o = Orientation.of(moved)
    assert np.array_equal(o.to_canonical(sitk.GetArrayFromImage(out)), sitk.GetArrayFromImage(ref))


def test_resampling_to_model_spacing_keeps_grid(phantom):
    """Model spacing differs from the image (anisotropic): output on the input grid, labels close to native run."""
    native = sitk.GetArrayFromImage(segment_image(phantom, threshold_model(), device="cpu").labels)
    result = segment_image(phantom, threshold_model(spacing=(1.5, 1.25)), device="cpu", return_probabilities=True)
    assert same_geometry(result.labels, phantom)
    assert result.stats["model_shape"] == [round(40 * 3.0 / 1.5), round(36 * 2.5 / 1.25)]
    arr = sitk.GetArrayFromImage(result.labels)
    assert (arr == native).mean() > 0.97
    assert result.probabilities.shape == (3,) + arr.shape
    fast = segment_image(phantom, threshold_model(spacing=(1.5, 1.25)), device="cpu", fast=True)
    assert fast.stats["spacing"] == [3.0, 2.5]
    assert same_geometry(fast.labels, phantom)


def test_transpose_in_plane(phantom):
    """A net trained on transposed slices, run with transpose_in_plane, equals the plain net on plain slices."""
    plain = segment_image(phantom, threshold_model(), device="cpu").labels
    transposed = segment_image(phantom, threshold_model([ThresholdNet(transpose=True)], transpose_in_plane=True),
                               device="cpu").labels
    wrong = segment_image(phantom, threshold_model([ThresholdNet(transpose=True)]), device="cpu").labels
    assert np.array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(transposed))
    assert not np.array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(wrong))


def test_label_values_written_in_place_of_class_indices(phantom):
    """Labels go straight into the output array through the reoriented view; values that are not the class indices
    (background not first, a value above 255) are looked up, and outside a ROI stays 0 whatever the orientation."""
    from meddinov3.checkpoints import ClassInfo

    arr = sitk.GetArrayFromImage(phantom)
    arr[0] = -1000  # an all-air slice, skipped: background
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(phantom)
    ref = sitk.GetArrayFromImage(segment_image(image, threshold_model(), device="cpu").labels)  # indices 0, 1, 2
    classes = [ClassInfo(7, "below 100 HU"), ClassInfo(0, "background"), ClassInfo(300, "bright")]
    model = threshold_model(classes=classes, skip_empty_slices=True)
    expected = np.array([7, 0, 300])[ref]
    expected[0] = 0
    roi = (3, 4, 2, 30, 33, 15)  # x0, y0, z0, x1, y1, z1 of the reoriented image
    for perm, flip in [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))]:
        moved = reoriented(image, perm, flip)
        out = segment_image(moved, model, device="cpu").labels
        assert out.GetPixelID() == sitk.sitkUInt16 and same_geometry(out, moved)
        assert np.array_equal(on_grid(out, image), expected), (perm, flip)

        cropped = sitk.GetArrayFromImage(segment_image(moved, model, device="cpu", roi=roi).labels)
        inside = np.zeros(cropped.shape, bool)
        inside[2:15, 4:33, 3:30] = True
        assert not cropped[~inside].any()
        assert set(np.unique(cropped[inside])) == {0, 7, 300}
