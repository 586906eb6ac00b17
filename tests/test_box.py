import doctest
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groundforge.schemas import box as box_module
from groundforge.schemas.box import Box, as_array, coverage_matrix, iou_matrix, match_boxes
from groundforge.trainer import evaluate, rewards

coords = st.floats(min_value=-500, max_value=2000, allow_nan=False, allow_infinity=False)


def test_doctests():
    assert doctest.testmod(box_module).failed == 0


def test_iou_exact_values():
    a = Box(0, 0, 10, 10)
    assert a.iou(a) == 1.0
    assert a.iou(Box(10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert a.iou(Box(5, 5, 15, 15)) == 25 / 175
    assert Box(3, 3, 3, 9).iou(Box(3, 3, 3, 9)) == 0.0  # degenerate


def test_clip_scale_shift():
    b = Box(-10, 5, 50, 80).clip(40, 60)
    assert b == Box(0, 5, 40, 60)
    assert Box(1, 2, 3, 4).scale(2, 10) == Box(2, 20, 6, 40)
    assert Box(1, 2, 3, 4).scale(3) == Box(3, 6, 9, 12)
    assert Box(1, 2, 3, 4).shift(10, -2) == Box(11, 0, 13, 2)
    assert Box.from_xywh(5, 6, 10, 20) == Box(5, 6, 15, 26)


def test_from_list_rejects_wrong_length():
    try:
        Box.from_list([1, 2, 3])
    except ValueError as err:
        assert "4 values" in str(err)
    else:
        raise AssertionError("a 3-value box was accepted")


@given(coords, coords, coords, coords, coords, coords, coords, coords)
def test_iou_matrix_matches_scalar(a1, a2, a3, a4, b1, b2, b3, b4):
    a = Box.from_corners(a1, a2, a3, a4)
    b = Box.from_corners(b1, b2, b3, b4)
    m = iou_matrix([a, b], [b, a])
    assert np.allclose(m, [[a.iou(b), a.iou(a)], [b.iou(b), b.iou(a)]])
    assert 0.0 <= a.iou(b) <= 1.0
    assert a.iou(b) == b.iou(a)


def test_empty_inputs():
    assert as_array([]).shape == (0, 4)
    assert iou_matrix([], [Box(0, 0, 1, 1)]).shape == (0, 1)


# ---------------------------------------------------------------------------- matching


def brute_force(pred, truth, min_iou):
    """Best (number of matches, total IoU) over every one-to-one matching of allowed pairs."""
    ious = iou_matrix(pred, truth)
    best = (0, 0.0)
    for k in range(1, min(len(pred), len(truth)) + 1):
        for rows in itertools.combinations(range(len(pred)), k):
            for cols in itertools.permutations(range(len(truth)), k):
                values = [ious[r, c] for r, c in zip(rows, cols, strict=True)]
                if min(values) >= min_iou:
                    best = max(best, (k, sum(values)))
    return best


small_box = st.builds(
    lambda x, y, w, h: Box(x, y, x + w, y + h),
    st.integers(0, 10),
    st.integers(0, 4),
    st.integers(1, 6),
    st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@given(
    pred=st.lists(small_box, max_size=4),
    truth=st.lists(small_box, max_size=4),
    min_iou=st.sampled_from([0.1, 0.3, 0.5, 0.7]),
)
def test_match_boxes_is_optimal_against_brute_force(pred, truth, min_iou):
    matches = match_boxes(pred, truth, min_iou)
    ious = iou_matrix(pred, truth)
    assert len({p for p, _, _ in matches}) == len({t for _, t, _ in matches}) == len(matches)
    for p, t, value in matches:
        assert value == ious[p, t] >= min_iou
    assert [m[0] for m in matches] == sorted(m[0] for m in matches)
    count, total = brute_force(pred, truth, min_iou)
    assert len(matches) == count
    assert sum(v for _, _, v in matches) == pytest.approx(total, abs=1e-9)


def test_match_boxes_prefers_more_matches_over_more_total_iou():
    pred = [Box(6, 2, 12, 6), Box(4, 0, 9, 3), Box(6, 3, 11, 5)]
    truth = [Box(8, 2, 12, 6), Box(9, 2, 11, 6), Box(2, 0, 8, 4)]
    # 3 matches (1/3 + 4/9 + 3/10 = 1.078) beat 2 matches of a larger total (2/3 + 4/9 = 1.111)
    assert match_boxes(pred, truth, 0.3) == [
        (0, 1, pytest.approx(1 / 3)),
        (1, 2, pytest.approx(4 / 9)),
        (2, 0, pytest.approx(0.3)),
    ]


def test_match_boxes_threshold_is_inclusive_and_sub_threshold_pairs_never_block():
    assert match_boxes([Box(0, 0, 5, 10)], [Box(0, 0, 10, 10)], 0.5) == [(0, 0, 0.5)]
    # a plain max-total-IoU assignment picks p0-t1 (1/3) + p1-t0 (3/7) = 0.76 over p0-t0 (2/3)
    # and then keeps no pair at 0.5; sub-threshold pairs must not block the allowed one
    pred = [Box(9, 0, 14, 1), Box(6, 0, 11, 1)]
    truth = [Box(8, 0, 13, 1), Box(11, 0, 18, 1)]
    assert match_boxes(pred, truth, 0.5) == [(0, 0, pytest.approx(2 / 3))]
    assert match_boxes([Box(0, 0, 10, 10)], [Box(0, 0, 10, 10)], 1.0) == [(0, 0, 1.0)]
    assert match_boxes([], [Box(0, 0, 1, 1)]) == [] and match_boxes([Box(0, 0, 1, 1)], []) == []
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="min_iou"):
            match_boxes([], [], bad)


def test_the_trainer_scores_with_the_one_matcher():
    assert rewards.match_boxes is evaluate.match_boxes is match_boxes
    assert rewards.coverage_matrix is coverage_matrix


def test_coverage_is_the_share_of_each_box_a_region_covers():
    regions = [Box(0, 0, 5, 10), Box(0, 0, 100, 100)]
    boxes = [Box(0, 0, 10, 10), Box(20, 0, 30, 10), Box(3, 3, 3, 9)]
    assert coverage_matrix(regions, boxes).tolist() == [[0.5, 0.0, 0.0], [1.0, 1.0, 0.0]]
    assert coverage_matrix([], boxes).shape == (0, 3)
    assert coverage_matrix(regions, []).shape == (2, 0)
