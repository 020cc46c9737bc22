"""*Complete from painted slices* on a real (headless) MRML scene with a real child process (`--model scratch`):
painted slices kept, unpainted slices completed, other segments untouched, one `beforeModify` (undo) call,
cancel leaves the scene as it was."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

PAINT_EVERY = 6


@pytest.fixture(autouse=True)
def user_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_HOME", str(tmp_path / "meddinov3-home"))


@pytest.fixture(scope="module")
def crop():
    """(CT, truth) (k, j, i) of a 48x64x64 crop of the LiTS case (liver 1, tumour 2)."""
    from meddinov3.phantom import load_liver_ct

    ct, lab = load_liver_ct()
    return (sitk.GetArrayFromImage(ct)[40:88, 32:96, 32:96].copy(),
            sitk.GetArrayFromImage(lab)[40:88, 32:96, 32:96].copy())


@pytest.fixture
def scene_with_painting(headless_slicer, slicer_scene, crop):
    ct, truth = crop
    ijk = np.eye(4)
    ijk[:3, :3] = np.diag([-1.0, -1.0, 1.0])
    volume = slicer.util.addVolumeFromArray(ct, ijk, name="CT")
    seg = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painting")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    painted = np.zeros(len(ct), bool)
    painted[2:46:PAINT_EVERY] = True
    for segment_id, value in (("liver", 1), ("tumour", 2), ("other", None)):
        seg.GetSegmentation().AddEmptySegment(segment_id, segment_id)
        mask = np.zeros(ct.shape, np.uint8)
        if value is None:
            mask[10:20, 5:15, 5:15] = 1  # a segment that is not completed
        else:
            mask[painted] = truth[painted] == value
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, segment_id, volume)
    return volume, seg, painted


@pytest.fixture
def logic(headless_slicer, slicer_scene):
    from MedDINOv3Segment import MedDINOv3SegmentLogic

    return MedDINOv3SegmentLogic()


def segment_array(seg, segment_id, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume).copy()


def test_complete_replaces_only_unpainted_slices_of_chosen_segments(logic, scene_with_painting, crop):
    from MedDINOv3SegmentLib.complete import completeAsync, lpsToRas

    volume, seg, painted = scene_with_painting
    _, truth = crop
    before = {s: segment_array(seg, s, volume) for s in ("liver", "tumour", "other")}
    undo_states, events = [], []
    task = completeAsync(logic, volume, seg, ["liver", "tumour"], model="scratch", device="cpu", timeBudget=2,
                         beforeModify=lambda: undo_states.append(segment_array(seg, "liver", volume)),
                         onProgress=events.append)
    assert task.wait(timeout=300) and task.state == "succeeded", task.error
    assert len(undo_states) == 1 and np.array_equal(undo_states[0], before["liver"])  # saved before any change
    assert np.array_equal(segment_array(seg, "other", volume), before["other"])
    first, last = np.flatnonzero(painted)[[0, -1]]
    between = np.setdiff1d(np.arange(first, last + 1), np.flatnonzero(painted))
    for name, value in (("liver", 1), ("tumour", 2)):
        after = segment_array(seg, name, volume)
        assert np.array_equal(after[painted], before[name][painted])
        assert not after[:first].any() and not after[last + 1:].any()
        hit = (after[between] != 0) & (truth[between] == value)
        assert 2 * hit.sum() / ((after[between] != 0).sum() + (truth[between] == value).sum()) > 0.6
    assert task.leastConfident["slice"] in between.tolist()
    assert len(lpsToRas(task.leastConfident["point"])) == 3
    assert any(e.get("event") == "progress" for e in events)


def test_cancel_leaves_the_segments_as_they_were(logic, scene_with_painting):
    from MedDINOv3SegmentLib.complete import completeAsync

    volume, seg, _ = scene_with_painting
    before = segment_array(seg, "liver", volume)
    called = []
    task = completeAsync(logic, volume, seg, ["liver"], model="scratch", device="cpu", timeBudget=30,
                         beforeModify=lambda: called.append(1))
    time.sleep(0.5)
    task.cancel()
    assert task.state == "cancelled" and not task.process.returncode() is None
    assert np.array_equal(segment_array(seg, "liver", volume), before) and not called


def test_nothing_painted_is_refused(logic, scene_with_painting):
    from MedDINOv3SegmentLib import MedDINOv3SegmentError
    from MedDINOv3SegmentLib.complete import completeAsync

    volume, seg, _ = scene_with_painting
    seg.GetSegmentation().AddEmptySegment("empty", "empty")
    with pytest.raises(MedDINOv3SegmentError, match="empty"):
        completeAsync(logic, volume, seg, ["empty"], model="scratch")
