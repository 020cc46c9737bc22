"""Sliding window, TTA, fold averaging, OOM back-off, cancellation, ROI, empty slices, post-processing."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.checkpoints import load_model
from meddinov3.engine import Cancelled, SlicePredictor, gaussian_weights, segment_image, tile_starts
from meddinov3.engine.postprocess import fill_holes, keep_largest_component
from meddinov3.phantom import make_phantom_ct
from Testing.helpers import ThresholdNet, make_package, threshold_model


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_ct((12, 64, 56), spacing=(2.0, 2.0, 5.0), seed=2)[0]


def test_tiles_and_weights():
    assert tile_starts(64, 64) == [0]
    starts = tile_starts(100, 32)
    assert starts[0] == 0 and starts[-1] == 68 and max(np.diff(starts)) <= 16
    g = gaussian_weights((32, 24))
    assert g.shape == (32, 24) and float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0
    assert torch.argmax(g).item() // 24 in (15, 16)


def test_sliding_window_matches_whole_slice(phantom):
    whole = segment_image(phantom, threshold_model(), device="cpu", return_probabilities=True)
    tiled = segment_image(phantom, threshold_model(patch_size=(32, 24)), device="cpu", return_probabilities=True)
    assert tiled.stats["tiles_per_slice"] > 4
    a, b = sitk.GetArrayFromImage(whole.labels), sitk.GetArrayFromImage(tiled.labels)
    assert (a == b).mean() > 0.995
    diff = np.abs(whole.probabilities.astype(np.float32) - tiled.probabilities.astype(np.float32))
    assert np.median(diff) < 1e-3 and diff.mean() < 0.01


def test_small_slices_are_padded(phantom):
    small = segment_image(phantom, threshold_model(patch_size=(96, 96)), device="cpu")
    whole = segment_image(phantom, threshold_model(), device="cpu")
    assert small.stats["tiles_per_slice"] == 1
    assert (sitk.GetArrayFromImage(small.labels) == sitk.GetArrayFromImage(whole.labels)).mean() > 0.995


def test_tta_averages_mirrored_passes(phantom):
    """Mirroring both axes averages the kernel over its flips: equal to one net with the symmetrised kernel."""
    tta = segment_image(phantom, threshold_model(), device="cpu", tta=True, return_probabilities=True)
    sym = ThresholdNet()
    w = sym.conv.weight.data
    sym.conv.weight.data = (w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4
    ref = segment_image(phantom, threshold_model([sym]), device="cpu", return_probabilities=True)
    plain = segment_image(phantom, threshold_model(), device="cpu", return_probabilities=True)
    np.testing.assert_allclose(tta.probabilities.astype(np.float32), ref.probabilities.astype(np.float32), atol=2e-3)
    assert np.abs(tta.probabilities.astype(np.float32) - plain.probabilities.astype(np.float32)).max() > 0.1
    one_axis = segment_image(phantom, threshold_model(mirroring_axes=(1,)), device="cpu", tta=True)
    assert one_axis.stats["slices"] == 12


def test_fold_average_is_mean_of_fold_probabilities(tmp_path, phantom):
    pkg = make_package(tmp_path / "pkg", folds=2, seed=3, spacing=(4.0, 4.0))
    both = segment_image(phantom, str(pkg), device="cpu", return_probabilities=True)
    f0 = segment_image(phantom, str(pkg), device="cpu", folds=["0"], return_probabilities=True)
    f1 = segment_image(phantom, str(pkg), device="cpu", folds=["1"], return_probabilities=True)
    mean = (f0.probabilities.astype(np.float32) + f1.probabilities.astype(np.float32)) / 2
    np.testing.assert_allclose(both.probabilities.astype(np.float32), mean, atol=2e-3)
    assert np.abs(f0.probabilities.astype(np.float32) - f1.probabilities.astype(np.float32)).max() > 0.05
    # a LoadedModel is reused as is, and fold selection works on it too
    loaded = load_model(str(pkg), "cpu")
    again = segment_image(phantom, loaded, device="cpu", folds=["1"], return_probabilities=True)
    np.testing.assert_array_equal(again.probabilities, f1.probabilities)


def test_oom_backoff_halves_batch(monkeypatch, phantom):
    ref = segment_image(phantom, threshold_model(), device="cpu", batch_size=8)
    calls = []
    original = SlicePredictor.run_network

    def flaky(self, net, x):
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return original(self, net, x)

    monkeypatch.setattr(SlicePredictor, "run_network", flaky)
    out = segment_image(phantom, threshold_model(), device="cpu", batch_size=8)
    assert out.stats["oom_backoffs"] == [8, 4]
    assert out.stats["batch_size"] == 2
    assert max(calls[2:]) == 2
    assert np.array_equal(sitk.GetArrayFromImage(out.labels), sitk.GetArrayFromImage(ref.labels))


def test_cancel_between_batches(phantom):
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        segment_image(phantom, threshold_model(), device="cpu", batch_size=2, cancel=ev)
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(Cancelled):
        segment_image(phantom, threshold_model(), device="cpu", batch_size=2, cancel=cancel)
    assert len(seen) == 3


def test_roi_outside_is_background(phantom):
    full = sitk.GetArrayFromImage(segment_image(phantom, threshold_model(), device="cpu").labels)
    res = segment_image(phantom, threshold_model(), device="cpu", roi=(10, 8, 2, 40, 50, 9), return_probabilities=True)
    arr = sitk.GetArrayFromImage(res.labels)
    assert arr.shape == full.shape
    inside = np.zeros_like(arr, bool)
    inside[2:9, 8:50, 10:40] = True
    assert not arr[~inside].any()
    assert np.array_equal(arr[2:9, 10:48, 12:38], full[2:9, 10:48, 12:38])  # away from the ROI border
    assert np.all(res.probabilities[0][~inside] == 1)


def test_skip_empty_slices():
    image, _ = make_phantom_ct((10, 32, 32), spacing=(3.0, 3.0, 5.0), seed=4, noise=0)
    arr = sitk.GetArrayFromImage(image)
    arr[:3] = -1000
    arr[:3, 5:8, 5:8] = 900  # slices 1-2: air with a bright spot, not all air: still segmented
    arr[0] = -1000  # slice 0: all air, skipped (background)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(image)
    out = segment_image(img, threshold_model(skip_empty_slices=True), device="cpu")
    assert out.stats["skipped_slices"] == 1
    labels = sitk.GetArrayFromImage(out.labels)
    assert not labels[0].any() and labels[1:3].any()


def test_postprocessing():
    lab = np.zeros((5, 20, 20), np.uint8)
    lab[1:4, 2:10, 2:10] = 1
    lab[2, 5, 5] = 0  # hole
    lab[2, 15:17, 15:17] = 1  # small island
    lab[1:4, 12:14, 2:4] = 2
    out = keep_largest_component(lab.copy())
    assert out[2, 15, 15] == 0 and out[2, 3, 3] == 1 and (out == 2).sum() == (lab == 2).sum()
    filled = fill_holes(out)
    assert filled[2, 5, 5] == 1


def test_tiny_vit_runs_with_patches(tmp_path, phantom):
    pkg = make_package(tmp_path / "pkg", spacing=(2.0, 2.0), patch_size=(32, 32))
    res = segment_image(phantom, str(pkg), device="cpu", batch_size=3)
    assert res.labels.GetSize() == phantom.GetSize() and res.stats["tiles_per_slice"] == 9
