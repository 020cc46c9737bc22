"""Sliding window, TTA, fold averaging, OOM back-off, cancellation, ROI, empty slices, post-processing."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.checkpoints import load_model
from meddinov3.engine import Cancelled, SlicePredictor, gaussian_weights, resolve_device, segment_image, tile_starts
from meddinov3.engine.postprocess import fill_holes, keep_largest_component
from meddinov3.phantom import make_phantom_ct
from meddinov3.volumes import InputError, same_geometry
from Testing.helpers import ThresholdNet, make_package, threshold_model


pytestmark = pytest.mark.slicer_python  # the engine under Slicer 5.8's Python

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


def test_fast_mode_runs_every_nth_slice_and_interpolates():
    """--fast on 1 mm slices: every 3rd slice (model's slice_spacing 3 mm) goes through the network, the two between
    get the linear interpolation of their neighbours' probabilities; predicted slices equal the full run's."""
    image, _ = make_phantom_ct((41, 32, 32), spacing=(2.0, 2.0, 1.0), seed=3)
    model = threshold_model(fast={"spacing": [2.0, 2.0], "slice_spacing": 3.0})
    full = segment_image(image, model, device="cpu", return_probabilities=True)
    fast = segment_image(image, model, device="cpu", fast=True, return_probabilities=True)
    assert fast.stats["slice_step"] == 3
    assert fast.stats["predicted_slices"] == 15 and fast.stats["slices"] == 41  # 0, 3, ..., 39 and the last, 40
    pf, pr = full.probabilities.astype(np.float32), fast.probabilities.astype(np.float32)
    predicted = [*range(0, 40, 3), 40]
    np.testing.assert_allclose(pr[:, predicted], pf[:, predicted], atol=1e-3)
    np.testing.assert_allclose(pr[:, 1], (2 * pf[:, 0] + pf[:, 3]) / 3, atol=2e-3)
    np.testing.assert_allclose(pr[:, 38], (pf[:, 36] + 2 * pf[:, 39]) / 3, atol=2e-3)
    assert not np.allclose(pr[:, 38], pf[:, 38], atol=1e-2), "the phantom changes along z: interpolation must show"
    agree = (sitk.GetArrayFromImage(fast.labels) == sitk.GetArrayFromImage(full.labels)).mean()
    assert agree > 0.9
    thick, _ = make_phantom_ct((12, 32, 32), spacing=(2.0, 2.0, 5.0), seed=3)
    assert segment_image(thick, model, device="cpu", fast=True).stats["slice_step"] == 1  # 5 mm: every slice


def test_fast_mode_never_interpolates_across_skipped_air():
    """Runs of slices are handled separately: each run's last slice is predicted, the air gap stays background."""
    from meddinov3.engine.stages import _SliceInterpolator, predicted_slices

    todo = np.array([0, 1, 2, 3, 4, 5, 6, 20, 21, 22, 23])
    run = predicted_slices(todo, 3)
    assert run.tolist() == [0, 3, 6, 20, 23]
    interp = _SliceInterpolator(todo)
    p = torch.arange(len(run), dtype=torch.float32)[:, None, None, None].expand(-1, 2, 1, 1)
    zs, out = interp.fill(run[:2], p[:2])  # batch 1: slices 0 and 3
    zs2, out2 = interp.fill(run[2:], p[2:])  # batch 2: 6 (pairs with 3 across batches), 20 (no pair with 6), 23
    assert zs.tolist() == [0, 1, 2, 3] and zs2.tolist() == [4, 5, 6, 20, 21, 22, 23]
    assert out[1:3, 0, 0, 0].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert out2[:, 0, 0, 0].tolist() == pytest.approx([4 / 3, 5 / 3, 2, 3, 10 / 3, 11 / 3, 4])


def test_numpy_input_with_geometry_and_bad_arguments(phantom):
    model = threshold_model()
    ref = segment_image(phantom, model, device="cpu")
    oblique = sitk.Image(phantom)
    oblique.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # in-plane axes swapped: another result than the identity
    oblique.SetOrigin((5.0, -3.0, 40.0))
    expected = segment_image(oblique, model, device="cpu")
    assert not np.array_equal(expected.label_array, ref.label_array)
    res = segment_image(sitk.GetArrayFromImage(phantom), model, device="cpu", spacing=oblique.GetSpacing(),
                        origin=oblique.GetOrigin(), direction=oblique.GetDirection())
    assert np.array_equal(res.label_array, expected.label_array) and same_geometry(res.labels, oblique)
    with pytest.raises(TypeError, match="SimpleITK.Image or a numpy array .* not str"):
        segment_image("ct.nii.gz", model, device="cpu")
    with pytest.raises(TypeError, match="spacing"):
        segment_image(sitk.GetArrayFromImage(phantom), model, device="cpu")
    for bad in (0, -2, "4"):
        with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer"):
            segment_image(phantom, model, device="cpu", batch_size=bad)


def test_slices_too_large_at_the_model_spacing_are_refused(phantom):
    """64 px at 2 mm resampled to a 0.02 mm model spacing would be 6400 px per side."""
    with pytest.raises(InputError, match=r"<image>: slices of 64x56 voxels .* 6400x5600 pixels"):
        segment_image(phantom, threshold_model(spacing=(0.02, 0.02)), device="cpu")


def test_devices_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS"):
            resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


def test_compiled_network_is_not_recompiled_within_or_across_volumes(phantom, monkeypatch):
    """A compiled graph is specialised on input shape and strides: a first short volume (one padded chunk), then full
    chunks and a padded last chunk must all reuse one graph (a recompile mid-volume cost seconds on the GPU). Real
    torch.compile; only its code generator is the eager backend, which counts the graphs it is handed."""
    from meddinov3.engine import inference

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(inference, "_COMPILED", inference.weakref.WeakKeyDictionary())
    monkeypatch.setattr(inference.torch, "compile",
                        lambda net, dynamic=False: torch._dynamo.optimize(counting_backend, dynamic=dynamic)(net))
    model = threshold_model()
    short = segment_image(phantom[:, :, :2], model, device="cpu", batch_size=5, compile=True)  # 2 of 5: padded
    full = segment_image(phantom, model, device="cpu", batch_size=5, compile=True)  # 12 slices: 5, 5, 2 (padded)
    eager = segment_image(phantom, model, device="cpu", batch_size=5)
    assert len(graphs) == 1
    assert np.array_equal(sitk.GetArrayFromImage(full.labels), sitk.GetArrayFromImage(eager.labels))
    assert short.labels.GetSize()[2] == 2
