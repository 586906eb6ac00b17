from groundforge.filters.detection import check_agreement, check_box_bounds, resolve_box
from groundforge.filters.split import entity_bucket, holdout_split
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord


def record(**kw):
    base = dict(image_id="id", image=b"", width=100, height=50, domain="flag", entity="Chad")
    return ImageRecord(**{**base, **kw})


def test_known_box_wins_over_candidates():
    det = Detection(Box(0, 0, 50, 50), 0.9)
    r = record(boxes=(Box(1, 1, 9, 9),), candidates={"detector": (det,)})
    v = resolve_box(r, "detector")
    assert v.keep and v.value.box == Box(1, 1, 9, 9) and v.value.box_source == "known"


def test_several_known_boxes_are_dropped():
    v = resolve_box(record(boxes=(Box(0, 0, 1, 1), Box(2, 2, 3, 3))), "foreground")
    assert (v.keep, v.reason, v.metrics["count"]) == (False, "multiple_known_boxes", 2)


def test_exactly_one_confident_detection():
    low = Detection(Box(0, 0, 10, 10), 0.2)
    hi = Detection(Box(10, 10, 40, 40), 0.8)
    hi2 = Detection(Box(50, 0, 90, 40), 0.6)
    assert resolve_box(record(candidates={"detector": (low,)}), "detector").reason == (
        "no_detector_box"
    )
    v = resolve_box(record(candidates={"detector": (low, hi)}), "detector", min_score=0.35)
    assert v.keep and v.value.box == hi.box and v.value.box_source == "detector"
    v = resolve_box(record(candidates={"detector": (hi2, hi)}), "detector")
    assert v.reason == "multiple_detector_boxes" and v.metrics["scores"] == [0.8, 0.6]
    v = resolve_box(record(candidates={"detector": (hi2, hi)}), "detector", require_single=False)
    assert v.value.box == hi.box
    assert resolve_box(record(), "foreground").reason == "no_foreground_box"


def test_agreement():
    r = record(
        box=Box(0, 0, 10, 10),
        box_source="foreground",
        candidates={"detector": (Detection(Box(0, 0, 10, 20), 0.9),)},
    )
    v = check_agreement(r, "detector", min_iou=0.5, min_score=0.35)
    assert v.keep and v.value.box_ious == {"detector": 0.5}
    v = check_agreement(r, "detector", min_iou=0.6, min_score=0.35)
    assert (v.reason, v.metrics["iou"]) == ("boxes_disagree", 0.5)
    assert check_agreement(r, "detector", 0.5, min_score=0.95).reason == "no_detector_box"
    known = record(box=Box(0, 0, 1, 1), box_source="known")
    assert check_agreement(known, "detector", 0.5, 0.35).keep


def test_box_bounds():
    assert check_box_bounds(record(box=Box(0, 0, 100, 50))).keep
    v = check_box_bounds(record(box=Box(0, 0, 5, 5)), min_area_fraction=0.01)
    assert v.reason == "box_too_small" and v.metrics["area_fraction"] == 0.005
    assert check_box_bounds(record(box=Box(0, 0, 100, 50)), max_area_fraction=0.9).reason == (
        "box_too_large"
    )
    assert check_box_bounds(record(box=Box(0, 0, 100, 2)), max_aspect=20).reason == "box_aspect"


def test_holdout_split_is_stable_and_by_entity():
    names = [f"entity {i}" for i in range(2000)]
    val = [n for n in names if holdout_split(n, 0.1, "seed") == "val"]
    assert 150 < len(val) < 250  # about 10%
    assert val == [n for n in names if holdout_split(n, 0.1, "seed") == "val"]
    assert holdout_split("Chad", 0.1, "s") == holdout_split(" chad ", 0.1, "s")
    assert entity_bucket("Chad", "a") != entity_bucket("Chad", "b")
