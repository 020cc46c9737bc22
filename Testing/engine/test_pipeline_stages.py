"""The stages of `segment_image`, each on its own: plan -> slice stream -> finish (`engine.stages`).

A phantom CT and the deterministic `ThresholdNet` (a 5x5 convolution on HU) make every expected value computable
here: what the plan decides (shapes, spacings, slices, batches), what the stream writes (the network's argmax per
slice), what the finish returns (label values, ROI re-embedding, geometry).
"""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.checkpoints import ClassInfo
from meddinov3.engine import Cancelled, segment_image
from meddinov3.engine.stages import LabelOutput, SliceStream, background_index, plan_slices, predicted_slices
from meddinov3.options import SegmentOptions
from meddinov3.phantom import make_phantom_ct
from meddinov3.volumes import Orientation, same_geometry
from Testing.helpers import ThresholdNet, threshold_model

pytestmark = pytest.mark.slicer_python  # the engine under Slicer 5.8's Python

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def phantom():
    """(12, 64, 56) voxels (z, y, x) at 2 x 2 x 5 mm, identity direction: the canonical view is the array."""
    return make_phantom_ct((12, 64, 56), spacing=(2.0, 2.0, 5.0), seed=2)[0]


def _plan(image, model, **options):
    return plan_slices(image, model.networks, model.spec, CPU, SegmentOptions(device="cpu", **options))


def _argmax_of(net, volume: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(volume.astype(np.float32))[:, None]).argmax(1).numpy()


def test_plan_at_the_image_spacing_runs_every_slice_in_order(phantom):
    plan = _plan(phantom, threshold_model(), batch_size=5)
    assert plan.shape == (12, 64, 56) and plan.spacing == (5.0, 2.0, 2.0)
    assert plan.target == (2.0, 2.0) and plan.model_hw == (64, 56) and plan.tiles_per_slice == 1
    assert plan.step == 1 and list(plan.todo) == list(range(12)) and list(plan.run_z) == list(range(12))
    assert [len(b) for b in plan.batches] == [5, 5, 2]
    assert np.concatenate(plan.batches).tolist() == list(range(12))
    stats = plan.stats()
    assert stats["slices"] == 12 and stats["skipped_slices"] == 0 and stats["model_shape"] == [64, 56]


def test_plan_resamples_to_the_model_spacing_and_skips_air(phantom):
    air = sitk.GetArrayFromImage(phantom)
    air[:3] = -1000  # three slices of air
    image = sitk.GetImageFromArray(air)
    image.CopyInformation(phantom)
    plan = _plan(image, threshold_model(spacing=(4.0, 4.0), skip_empty_slices=True))
    assert plan.target == (4.0, 4.0) and plan.model_hw == (32, 28)
    assert plan.todo.tolist() == list(range(3, 12)) and plan.stats()["skipped_slices"] == 3
    assert np.concatenate(plan.batches).tolist() == list(range(3, 12))


def test_fast_plan_predicts_every_nth_thin_slice(phantom):
    thin = sitk.Image(phantom)
    thin.SetSpacing((2.0, 2.0, 1.0))  # 1 mm slices, fast in-plane spacing 4 mm: every 4th slice is predicted
    plan = _plan(thin, threshold_model(), fast=True)
    assert plan.target == (4.0, 4.0) and plan.step == 4
    assert plan.run_z.tolist() == [0, 4, 8, 11] == predicted_slices(plan.todo, 4).tolist()


def test_plan_of_a_reoriented_image_is_the_canonical_view(phantom):
    """An image stored right-to-left (x flipped): the plan's volume is the canonical (S, P, L) view of it."""
    flipped = sitk.Flip(phantom, [True, False, False])
    plan = _plan(flipped, threshold_model())
    np.testing.assert_array_equal(plan.volume, sitk.GetArrayViewFromImage(phantom))
    assert plan.orient == Orientation.of(flipped)


def test_stream_writes_the_networks_argmax_and_probabilities(phantom):
    net = ThresholdNet()
    plan = _plan(phantom, threshold_model([net]), batch_size=4)
    index = np.full(plan.shape, 255, dtype=np.uint8)
    probs = np.zeros((3, *plan.shape), dtype=np.float16)
    seen = []

    class Progress:
        def update(self, done, total, stage):
            seen.append((done, total, stage))

    seconds = SliceStream(plan, CPU, index, probs).run(progress=Progress())
    np.testing.assert_array_equal(index, _argmax_of(net, plan.volume))
    np.testing.assert_array_equal(probs.astype(np.float32).argmax(0), index)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert seen[0] == (0, 12, "segmenting") and seen[-1] == (12, 12, "segmenting") and len(seen) == 4
    assert seconds > 0


def test_stream_fills_only_the_planned_slices(phantom):
    air = sitk.GetArrayFromImage(phantom)
    air[:3] = -1000
    image = sitk.GetImageFromArray(air)
    image.CopyInformation(phantom)
    plan = _plan(image, threshold_model(skip_empty_slices=True))
    index = np.full(plan.shape, 7, dtype=np.uint8)
    SliceStream(plan, CPU, index).run()
    assert (index[:3] == 7).all()  # untouched: the caller's background
    np.testing.assert_array_equal(index[3:], _argmax_of(ThresholdNet(), plan.volume[3:]))


def test_stream_cancel_stops_before_any_batch_and_ends_its_threads(phantom):
    plan = _plan(phantom, threshold_model(), batch_size=1)
    index = np.zeros(plan.shape, dtype=np.uint8)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        SliceStream(plan, CPU, index).run(cancel=stop)
    assert not index.any()
    assert not [t for t in threading.enumerate() if t.name in ("meddinov3-read", "meddinov3-write") and t.is_alive()]


def test_label_output_views_the_roi_and_finishes_to_label_values(phantom):
    classes = [ClassInfo(0, "background"), ClassInfo(5, "liver"), ClassInfo(7, "tumour")]
    box = ((10, 8, 2), (40, 50, 9))
    output = LabelOutput.allocate(phantom, box, classes)
    assert output.array.shape == (12, 64, 56) and output.roi.shape == (7, 42, 30) and output.bg_index == 0
    assert np.shares_memory(output.roi, output.array)
    output.roi[...] = 2  # class index 2 everywhere in the ROI
    probs = np.zeros((3, 7, 42, 30), dtype=np.float16)
    probs[2] = 1.0
    orient = Orientation.of(phantom)
    labels, full_probs, steps = output.finish(orient, probs, threshold_model().spec, (5.0, 2.0, 2.0),
                                              SegmentOptions(postprocess=False))
    array = sitk.GetArrayFromImage(labels)
    assert same_geometry(labels, phantom) and steps == []
    assert (array[2:9, 8:50, 10:40] == 7).all() and array.sum() == 7 * 7 * 42 * 30  # label value, ROI only
    assert full_probs.shape == (3, 12, 64, 56)
    assert (full_probs[0, 0] == 1).all() and (full_probs[2, 2:9, 8:50, 10:40] == 1).all()


def test_finish_lists_the_post_processing_it_applied(phantom):
    output = LabelOutput.allocate(phantom, (None, None), threshold_model().spec.classes)
    output.roi[4, 10:20, 10:20] = 1
    output.roi[4, 30:32, 30:32] = 1  # a second, smaller component of class 1
    _, probs, steps = output.finish(Orientation.of(phantom), None, threshold_model().spec, (5.0, 2.0, 2.0),
                                    SegmentOptions(keep_largest=True, fill_holes=True))
    assert probs is None and steps == [{"step": "keep_largest"}, {"step": "fill_holes"}]
    assert output.roi.sum() == 100  # the small component is gone


def test_background_index_is_the_channel_of_label_zero():
    assert background_index([ClassInfo(3, "a"), ClassInfo(0, "background")]) == 1
    assert background_index([ClassInfo(3, "a"), ClassInfo(4, "b")]) == 0


def test_segment_image_is_its_stages(phantom):
    """plan -> stream -> finish by hand gives `segment_image`'s labels; options as an object or as keywords."""
    net = ThresholdNet()
    model = threshold_model([net])
    result = segment_image(phantom, model, SegmentOptions(device="cpu", batch_size=3))
    assert result.stats["batch_size"] == 3 and result.stats["postprocessing"] == []
    by_keywords = segment_image(phantom, model, device="cpu", batch_size=3)
    np.testing.assert_array_equal(result.label_array, by_keywords.label_array)
    np.testing.assert_array_equal(result.label_array, _argmax_of(net, sitk.GetArrayViewFromImage(phantom)))
    with pytest.raises(TypeError):
        segment_image(phantom, model, devcie="cpu")  # a misspelt option is an error, not ignored
