"""Grounding consistency: known-box bypass, each drop reason, the candidate chosen by IoU."""

from __future__ import annotations

import pytest

from groundforge.filters.consistency import check_consistency
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import Detection, ImageRecord

NORM1000 = get_codec("norm1000")
# In a 200 x 100 image, (100,100),(500,500) in 0..1000 is the pixel box (20, 10, 100, 50).
GROUNDED = "<answer><|box_start|>(100,100),(500,500)<|box_end|></answer>"
EXACT = Detection(Box(20, 10, 100, 50), 0.5)  # IoU 1 with the grounder's box
SHIFTED = Detection(Box(60, 10, 140, 50), 0.9)  # IoU 1600 / 4800 = 1/3
CLOSE = Detection(Box(25, 10, 105, 50), 0.6)  # IoU 3000 / 3400 = 15/17
FAINT = Detection(Box(30, 10, 110, 50), 0.2)  # IoU 2800 / 3600 = 7/9, below the default score


def record(**kw):
    base = dict(image_id="id", image=b"", width=200, height=100, domain="aircraft", entity="B757")
    return ImageRecord(**{**base, **kw})


def test_a_known_box_is_kept_unchecked():
    r = record(boxes=(Box(1, 1, 9, 9),), candidates={"detector": (SHIFTED,)})
    for text in (GROUNDED, "garbage", None):
        v = check_consistency(r, text, NORM1000)
        assert v.keep and v.metrics == {}
        assert (v.value.box, v.value.box_source, v.value.box_ious) == (Box(1, 1, 9, 9), "known", {})


def test_several_known_boxes_are_dropped():
    r = record(boxes=(Box(1, 1, 9, 9), Box(2, 2, 8, 8)))
    v = check_consistency(r, GROUNDED, NORM1000)
    assert (v.keep, v.reason, v.metrics) == (False, "multiple_known_boxes", {"count": 2})


@pytest.mark.parametrize("text", [None, "", "I cannot find it.", "<answer></answer>", "[1, 2,"])
def test_an_unparsable_grounder_answer_is_dropped(text):
    v = check_consistency(record(candidates={"detector": (EXACT,)}), text, NORM1000)
    assert (v.keep, v.reason) == (False, "grounder_unparsable")


def test_no_confident_candidate_is_dropped():
    for candidates in ({}, {"detector": ()}, {"detector": (FAINT,)}, {"foreground": (EXACT,)}):
        v = check_consistency(record(candidates=candidates), GROUNDED, NORM1000)
        assert (v.reason, v.metrics) == ("no_candidate", {"method": "detector", "min_score": 0.35})


def test_a_disagreeing_grounder_is_dropped_with_the_best_iou():
    v = check_consistency(record(candidates={"detector": (SHIFTED, FAINT)}), GROUNDED, NORM1000)
    assert (v.keep, v.reason) == (False, "grounder_disagrees")
    assert v.metrics == {
        "iou": 1 / 3,
        "min_iou": 0.5,
        "grounder_box": [20.0, 10.0, 100.0, 50.0],
        "candidate_box": [60.0, 10.0, 140.0, 50.0],
    }
    v = check_consistency(record(candidates={"detector": (CLOSE,)}), GROUNDED, NORM1000, 0.9)
    assert (v.reason, v.metrics["iou"]) == ("grounder_disagrees", 15 / 17)


def test_the_candidate_closest_to_the_grounder_is_kept_not_the_best_scored():
    r = record(candidates={"detector": (SHIFTED, CLOSE)}, box_ious={"foreground": 0.7})
    v = check_consistency(r, GROUNDED, NORM1000)
    assert v.keep and v.metrics == {"iou": 15 / 17, "score": 0.6}
    kept = v.value
    assert (kept.box, kept.box_source) == (CLOSE.box, "detector")
    assert kept.box_ious == {"foreground": 0.7, "grounder": 15 / 17}
    # the detector's box is kept, not the grounder's
    assert kept.box != Box(20, 10, 100, 50)


def test_min_score_and_min_iou_are_inclusive():
    r = record(candidates={"detector": (SHIFTED, FAINT)})
    v = check_consistency(r, GROUNDED, NORM1000, min_score=0.2)
    assert v.keep and v.value.box == FAINT.box and v.metrics["iou"] == 7 / 9
    assert check_consistency(r, GROUNDED, NORM1000, min_iou=7 / 9, min_score=0.2).keep


def test_equal_ious_go_to_the_higher_score():
    twin = Detection(EXACT.box, 0.95)
    v = check_consistency(record(candidates={"detector": (EXACT, twin)}), GROUNDED, NORM1000)
    assert v.metrics == {"iou": 1.0, "score": 0.95}


def test_the_last_grounder_box_counts_in_any_codec():
    r = record(candidates={"detector": (SHIFTED, EXACT)})
    v = check_consistency(r, "[60, 10, 140, 50] no, [20, 10, 100, 50]", get_codec("pixel"))
    assert v.value.box == EXACT.box and v.metrics["iou"] == 1.0
    v = check_consistency(r, "[20, 10, 100, 50] no, [60, 10, 140, 50]", get_codec("pixel"))
    assert v.value.box == SHIFTED.box
    # Qwen2.5-VL frame of a 200 x 100 image: 196 x 112
    text = '[{"bbox_2d": [19.6, 11.2, 98, 56], "label": "B757"}]'
    v = check_consistency(r, text, get_codec("qwen25vl"))
    assert v.value.box == EXACT.box and v.metrics["iou"] == pytest.approx(1.0)


def test_another_method():
    r = record(candidates={"detector": (SHIFTED,), "foreground": (EXACT,)})
    v = check_consistency(r, GROUNDED, NORM1000, method="foreground")
    assert (v.value.box, v.value.box_source) == (EXACT.box, "foreground")
