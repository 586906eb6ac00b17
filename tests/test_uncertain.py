"""Uncertain regions from constructed detector outputs whose answers are known by hand."""

from __future__ import annotations

import doctest
from dataclasses import replace

import pytest

import groundforge.filters.uncertain as uncertain_module
from groundforge.filters.uncertain import attach_uncertain_regions, uncertain_regions
from groundforge.schemas.box import Box
from groundforge.schemas.records import (
    Detection,
    Instance,
    KVGSample,
    Provenance,
    UncertainRegion,
)

# A 200 x 100 street: four people, an ignore region bottom right.
FOUND = Box(0, 0, 20, 40)  # matched exactly
MISSED = Box(30, 0, 50, 40)  # only a low-score candidate
WEAK = Box(60, 0, 80, 40)  # matched at IoU 0.65
HIDDEN = Box(90, 0, 110, 40)  # matched exactly; visible 600 of a full 1600 px
IGNORE = Box(120, 50, 200, 100)

TRUTHS = (
    Instance(FOUND),
    Instance(MISSED),
    Instance(WEAK),
    Instance(HIDDEN, full=Box(90, 0, 110, 80), visible=Box(90, 0, 110, 30)),
    Instance(IGNORE, ignore=True),
)
GHOST = Box(150, 0, 170, 40)  # a confident candidate over nothing
HALF_IN = Box(110, 60, 130, 90)  # exactly half of its area inside IGNORE: still counts
DETECTIONS = (
    Detection(GHOST, 0.8),
    Detection(Box(130, 60, 150, 90), 0.9),  # wholly inside IGNORE: absorbed
    Detection(Box(60, 0, 80, 26), 0.7),  # IoU 520 / 800 with WEAK
    Detection(MISSED, 0.1),
    Detection(HIDDEN, 0.95),
    Detection(FOUND, 0.9),
    Detection(HALF_IN, 0.5),
)


def test_doctests():
    assert doctest.testmod(uncertain_module).failed == 0


def test_every_reason_in_truth_then_candidate_order():
    assert uncertain_regions(TRUTHS, DETECTIONS) == (
        UncertainRegion(MISSED, "missed"),
        UncertainRegion(WEAK, "weak"),
        UncertainRegion(HIDDEN, "occluded"),
        UncertainRegion(GHOST, "false_positive"),
        UncertainRegion(HALF_IN, "false_positive"),
    )


def test_empty_inputs():
    assert uncertain_regions([], []) == ()
    assert uncertain_regions(TRUTHS[:2], []) == (
        UncertainRegion(FOUND, "missed"),
        UncertainRegion(MISSED, "missed"),
    )
    assert uncertain_regions([], [Detection(GHOST, 0.9)]) == (
        UncertainRegion(GHOST, "false_positive"),
    )
    # only an ignore region, and a detection inside it: nothing to say
    assert uncertain_regions([TRUTHS[-1]], [Detection(Box(130, 60, 150, 90))]) == ()


def test_an_ignore_region_absorbs_only_what_lies_mostly_inside_it():
    ignore = [Instance(IGNORE, ignore=True)]
    inside = Detection(Box(112, 60, 132, 90))  # 360 of its 600 px inside IGNORE
    assert uncertain_regions(ignore, [inside]) == ()
    assert uncertain_regions(ignore, [Detection(HALF_IN)]) == (
        UncertainRegion(HALF_IN, "false_positive"),
    )
    # two ignore regions each holding half of a candidate do not add up
    halves = [Instance(Box(0, 0, 10, 10), ignore=True), Instance(Box(10, 0, 20, 10), ignore=True)]
    straddling = Detection(Box(0, 0, 20, 10))
    assert uncertain_regions(halves, [straddling]) == (
        UncertainRegion(straddling.box, "false_positive"),
    )


def test_one_reason_per_truth_missed_then_weak_then_occluded():
    full, visible = Box(0, 0, 20, 80), Box(0, 0, 20, 10)  # 1/8 visible
    hidden_and_missed = Instance(Box(0, 0, 20, 40), full=full, visible=visible)
    assert uncertain_regions([hidden_and_missed], []) == (
        UncertainRegion(Box(0, 0, 20, 40), "missed"),
    )
    weakly = [Detection(Box(0, 0, 20, 26))]  # IoU 0.65
    assert uncertain_regions([hidden_and_missed], weakly) == (
        UncertainRegion(Box(0, 0, 20, 40), "weak"),
    )
    exact = [Detection(Box(0, 0, 20, 40))]
    assert uncertain_regions([hidden_and_missed], exact) == (
        UncertainRegion(Box(0, 0, 20, 40), "occluded"),
    )


def test_occlusion_needs_both_boxes_and_a_ratio_under_the_bound():
    exact = [Detection(HIDDEN)]
    half = Instance(HIDDEN, full=Box(90, 0, 110, 80), visible=Box(90, 0, 110, 40))
    assert uncertain_regions([half], exact) == ()  # 0.5 is not under 0.5
    assert uncertain_regions([half], exact, occluded_below=0.6) == (
        UncertainRegion(HIDDEN, "occluded"),
    )
    assert uncertain_regions([replace(TRUTHS[3], full=None)], exact) == ()
    assert uncertain_regions([replace(TRUTHS[3], visible=None)], exact) == ()
    assert uncertain_regions([TRUTHS[3]], exact, occluded_below=0.0) == ()


def test_matching_is_one_to_one_and_thresholds_are_inclusive():
    # a second box on a found person is a false positive, not a second match
    twice = [Detection(FOUND, 0.9), Detection(Box(0, 0, 20, 36), 0.8)]
    assert uncertain_regions([Instance(FOUND)], twice) == (
        UncertainRegion(Box(0, 0, 20, 36), "false_positive"),
    )
    # the match goes to the pairing that finds most people, not to the best single IoU
    left, right = Box(0, 0, 100, 100), Box(60, 0, 160, 100)
    between, on_left = Detection(Box(30, 0, 130, 100)), Detection(Box(0, 0, 90, 100))
    assert uncertain_regions([Instance(left), Instance(right)], [between, on_left]) == (
        UncertainRegion(right, "weak"),  # IoU 0.54 with `between`
    )
    assert uncertain_regions([Instance(MISSED)], [Detection(MISSED, 0.3)]) == ()
    assert uncertain_regions([Instance(MISSED)], [Detection(MISSED, 0.3)], min_score=0.31) == (
        UncertainRegion(MISSED, "missed"),
    )
    weak = [Detection(Box(60, 0, 80, 26))]  # IoU 0.65
    assert uncertain_regions([Instance(WEAK)], weak, weak_iou=0.65) == ()
    assert uncertain_regions([Instance(WEAK)], weak, match_iou=0.7) == (
        UncertainRegion(WEAK, "missed"),
        UncertainRegion(weak[0].box, "false_positive"),
    )


@pytest.mark.parametrize(
    "setting", [{"match_iou": 0.0}, {"weak_iou": 1.5}, {"occluded_below": -0.1}]
)
def test_bad_settings_raise(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        uncertain_regions(TRUTHS, DETECTIONS, **setting)


# --- the stage check on samples -----------------------------------------------------------------

SAMPLE = KVGSample(
    sample_id="crowd-1",
    image=b"png",
    width=200,
    height=100,
    domain="person",
    task="detect",
    question="Find every person.",
    target="person",
    entities=(),
    gt_boxes=(FOUND, MISSED, WEAK, HIDDEN),
    split="sft",
    provenance=Provenance(),
    candidates={"detector": DETECTIONS, "other": (Detection(FOUND),)},
    ignore_regions=(IGNORE,),
)


def test_attach_sets_the_regions_and_counts_them():
    verdict = attach_uncertain_regions(SAMPLE)
    assert verdict.keep
    assert verdict.value == replace(
        SAMPLE,
        uncertain_regions=(
            UncertainRegion(MISSED, "missed"),
            UncertainRegion(WEAK, "weak"),
            UncertainRegion(GHOST, "false_positive"),
            UncertainRegion(HALF_IN, "false_positive"),
        ),
    )
    assert verdict.metrics == {"missed": 1, "weak": 1, "occluded": 0, "false_positive": 2}


def test_attach_takes_occlusion_from_the_annotated_instances():
    # instances of the source, in their own order; the ignore one and unknown boxes are skipped
    annotated = (TRUTHS[4], Instance(Box(1, 1, 2, 2)), TRUTHS[3], TRUTHS[0])
    verdict = attach_uncertain_regions(SAMPLE, instances=annotated)
    assert [r.reason for r in verdict.value.uncertain_regions] == [
        "missed",
        "weak",
        "occluded",
        "false_positive",
        "false_positive",
    ]
    assert verdict.metrics["occluded"] == 1


def test_attach_keeps_the_occlusion_the_sample_was_made_with():
    # HIDDEN is found by the detector but was occluded in the annotations; MISSED was occluded
    # too, and the detector's "missed" wins for it.
    made = replace(
        SAMPLE,
        uncertain_regions=(
            UncertainRegion(MISSED, "occluded"),
            UncertainRegion(HIDDEN, "occluded"),
        ),
    )
    verdict = attach_uncertain_regions(made)
    assert verdict.value.uncertain_regions == (
        UncertainRegion(MISSED, "missed"),
        UncertainRegion(WEAK, "weak"),
        UncertainRegion(GHOST, "false_positive"),
        UncertainRegion(HALF_IN, "false_positive"),
        UncertainRegion(HIDDEN, "occluded"),
    )
    assert verdict.metrics == {"missed": 1, "weak": 1, "occluded": 1, "false_positive": 2}


def test_attach_reads_the_named_annotator_and_passes_settings_on():
    other = attach_uncertain_regions(SAMPLE, "other")
    assert [r.reason for r in other.value.uncertain_regions] == ["missed", "missed", "missed"]
    lenient = attach_uncertain_regions(SAMPLE, weak_iou=0.6, min_score=0.0)
    assert lenient.value.uncertain_regions == (
        UncertainRegion(GHOST, "false_positive"),
        UncertainRegion(HALF_IN, "false_positive"),
    )
    found_nothing = replace(SAMPLE, candidates={"detector": ()})
    assert attach_uncertain_regions(found_nothing).metrics["missed"] == 4


def test_attach_without_the_annotators_candidates_raises():
    with pytest.raises(ValueError, match="crowd-1: no candidates from 'grounder'.*detector, other"):
        attach_uncertain_regions(SAMPLE, "grounder")
