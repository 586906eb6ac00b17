"""Uncertain regions of a crowded image: where a detector and the ground truth disagree.

DIP-R1 teaches a model to look closely at the ambiguous parts of a crowd before it answers; the
places a detector gets wrong are a cheap, model-free stand-in for "ambiguous". The detector's
confident candidates (score >= ``min_score``) are matched one-to-one to the truths (the
non-ignore instances) by :func:`groundforge.schemas.box.match_boxes` at IoU >= ``match_iou``.
Each truth then gets at most one reason, the first that applies in this order:

1. ``missed``: no confident candidate matched it;
2. ``weak``: its match has IoU < ``weak_iou`` (found, but badly outlined);
3. ``occluded``: its visible box covers less than ``occluded_below`` of its full box's area
   (only when the instance has both boxes).

The order puts what a detector visibly got wrong first: a hidden person the detector missed is
a miss, which is what the look step must recover. A confident candidate that matched no truth is
a ``false_positive``, unless more than half of its area lies inside one ignore region (a crowd
too dense to box, where a detection is neither right nor wrong). Truth regions come first in
truth order (the truth's box), then false positives in candidate order (the candidate's box).

:func:`attach_uncertain_regions` is the stage check for ``detect`` samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from groundforge.filters.verdict import Verdict
from groundforge.schemas.box import Box, coverage_matrix, match_boxes
from groundforge.schemas.records import Detection, Instance, KVGSample, UncertainRegion

MISSED, WEAK, OCCLUDED, FALSE_POSITIVE = "missed", "weak", "occluded", "false_positive"
REASONS = (MISSED, WEAK, OCCLUDED, FALSE_POSITIVE)


def uncertain_regions(
    instances: Sequence[Instance],
    candidates: Sequence[Detection],
    *,
    min_score: float = 0.3,
    match_iou: float = 0.5,
    weak_iou: float = 0.7,
    occluded_below: float = 0.5,
) -> tuple[UncertainRegion, ...]:
    """Where the detector's ``candidates`` and the annotated ``instances`` disagree (see the
    module docstring for the rules and the order).

    >>> truths = [Instance(Box(0, 0, 10, 20)), Instance(Box(20, 0, 30, 20))]
    >>> found = [Detection(Box(0, 0, 10, 20), 0.9), Detection(Box(50, 0, 60, 20), 0.8)]
    >>> [(r.reason, r.box.x1) for r in uncertain_regions(truths, found)]
    [('missed', 20.0), ('false_positive', 50.0)]
    """
    if not 0 < match_iou <= 1:
        raise ValueError(f"match_iou must be in (0, 1], got {match_iou}")
    for name, value in (("weak_iou", weak_iou), ("occluded_below", occluded_below)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    truths = [i for i in instances if not i.ignore]
    ignored = [i.box for i in instances if i.ignore]
    confident = [d.box for d in candidates if d.score >= min_score]
    matches = match_boxes(confident, [t.box for t in truths], match_iou)
    iou_of = {t: iou for _, t, iou in matches}
    regions = []
    for index, truth in enumerate(truths):
        if index not in iou_of:
            reason = MISSED
        elif iou_of[index] < weak_iou:
            reason = WEAK
        elif truth.visible_share < occluded_below:
            reason = OCCLUDED
        else:
            continue
        regions.append(UncertainRegion(truth.box, reason))
    matched = {p for p, _, _ in matches}
    inside = coverage_matrix(ignored, confident)
    for index, box in enumerate(confident):
        if index not in matched and not (inside[:, index] > 0.5).any():
            regions.append(UncertainRegion(box, FALSE_POSITIVE))
    return tuple(regions)


def attach_uncertain_regions(
    sample: KVGSample,
    annotator: str = "detector",
    instances: Sequence[Instance] = (),
    **settings: Any,
) -> Verdict:
    """Keep ``sample`` with its ``uncertain_regions`` set from ``annotator``'s candidates.

    The truths are the sample's ``gt_boxes`` and its ``ignore_regions`` are ignore instances. A
    sample stores no full or visible boxes, so nothing is ``occluded`` unless ``instances`` (the
    source's annotated instances, e.g. the record's) are given: a truth then takes the full and
    visible boxes of the non-ignore instance with the same box. ``occluded`` regions the sample
    already holds (found when it was made from its annotations) stay, after the detector's, for
    the truths the detector did not flag. ``settings`` go to :func:`uncertain_regions`.
    Metrics: the number of regions per reason. Raises ``ValueError``
    when the sample has no candidates from ``annotator`` (it did not run, which is not the same as
    finding nothing).

    >>> from groundforge.schemas.records import Provenance
    >>> sample = KVGSample("s", b"", 64, 48, "person", "detect", "q", "person", (),
    ...                    (Box(0, 0, 10, 20),), "sft", Provenance(), candidates={"detector": ()})
    >>> verdict = attach_uncertain_regions(sample)
    >>> verdict.value.uncertain_regions, verdict.metrics["missed"]
    ((UncertainRegion(box=Box(x1=0.0, y1=0.0, x2=10.0, y2=20.0), reason='missed'),), 1)
    """
    if annotator not in sample.candidates:
        raise ValueError(
            f"sample {sample.sample_id}: no candidates from {annotator!r} "
            f"(has: {', '.join(sample.candidates) or 'none'}); run that annotator first"
        )
    annotated: dict[Box, Instance] = {}
    for instance in instances:
        if not instance.ignore:
            annotated.setdefault(instance.box, instance)
    truths = [annotated.get(box, Instance(box)) for box in sample.gt_boxes]
    ignored = [Instance(box, ignore=True) for box in sample.ignore_regions]
    regions = uncertain_regions(truths + ignored, sample.candidates[annotator], **settings)
    flagged = {r.box for r in regions}
    regions += tuple(
        r for r in sample.uncertain_regions if r.reason == OCCLUDED and r.box not in flagged
    )
    counts = {reason: sum(r.reason == reason for r in regions) for reason in REASONS}
    return Verdict.ok(replace(sample, uncertain_regions=regions), **counts)
