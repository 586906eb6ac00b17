import doctest

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from groundforge.schemas import box as box_module
from groundforge.schemas.box import Box, as_array, iou_matrix

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
