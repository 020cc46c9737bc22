"""The shape prior on its own: structures are followed between painted slices, as Fill between slices does."""

from __future__ import annotations

import numpy as np

from meddinov3.complete.prior import ShapePrior, signed_distance


def disk(centre: tuple[float, float], radius: float, shape=(64, 64)) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def test_a_moving_structure_is_followed_not_faded():
    """A lesion (radius 8 px) that moves 12 px between slices 0 and 10: halfway it is a whole disk halfway along.
    Blending the two signed distances in place (the earlier prior) leaves a shrunken lens where they overlap."""
    labels = np.zeros((11, 64, 64), np.uint8)
    labels[0], labels[10] = disk((20, 20), 8), disk((20, 32), 8)
    prior = ShapePrior(labels, [0, 10], [1], (2.0, 1.0, 1.0))
    middle = prior.labels_at(5) == 1
    assert abs(int(middle.sum()) - int(labels[0].sum())) <= 0.15 * labels[0].sum()
    np.testing.assert_allclose(centroid(middle), (20, 26), atol=0.6)
    quarter = prior.labels_at(3) == 1  # 30 % of the way
    np.testing.assert_allclose(centroid(quarter), (20, 20 + 0.3 * 12), atol=0.6)
    blended = 0.5 * signed_distance(labels[0] == 1, (1.0, 1.0)) + 0.5 * signed_distance(labels[10] == 1, (1.0, 1.0))
    assert (blended > 0).sum() < 0.7 * (middle.sum())


def test_a_structure_on_one_slice_ends_in_the_gap_as_a_cone():
    """Seen on slice 0 only (slice 8 holds another, far away structure): it shrinks slice by slice and is gone at
    slice 8; the other one grows from nothing the same way. Each is its own structure."""
    labels = np.zeros((9, 64, 64), np.uint8)
    labels[0], labels[8] = disk((16, 16), 8), disk((48, 48), 8)
    prior = ShapePrior(labels, [0, 8], [1], (1.0, 1.0, 1.0))
    near = [int((prior.labels_at(z)[:32, :32] == 1).sum()) for z in range(9)]
    far = [int((prior.labels_at(z)[32:, 32:] == 1).sum()) for z in range(9)]
    assert near[0] > near[2] > near[4] > near[6] > 0 and near[8] == 0
    assert far == near[::-1]


def test_leave_one_out_uses_the_next_painted_slices():
    """Slice 5 left out: its prior is the structure moving from slice 0 to slice 10, not its own truth."""
    labels = np.zeros((11, 64, 64), np.uint8)
    labels[0], labels[5], labels[10] = disk((20, 20), 8), disk((44, 44), 6), disk((20, 32), 8)
    prior = ShapePrior(labels, [0, 5, 10], [1], (1.0, 1.0, 1.0))
    assert (prior.labels_at(5) == labels[5]).all()
    left_out = prior.at(5, exclude=5)[0] > 0
    np.testing.assert_allclose(centroid(left_out), (20, 26), atol=0.6)
    assert prior.distance(5, exclude=5) == 5.0
