"""Box decisions for single-entity images: which box to trust, and whether it is plausible.

Each function is a filter: ``record -> Verdict``. The box a record ends up with is set by
:func:`resolve_box`; the others only look at it.
"""

from __future__ import annotations

from dataclasses import replace

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import Detection, ImageRecord


def confident(dets: tuple[Detection, ...], min_score: float) -> list[Detection]:
    """The detections at or above ``min_score``, best first."""
    return sorted((d for d in dets if d.score >= min_score), key=lambda d: -d.score)


def resolve_box(
    record: ImageRecord,
    method: str,
    min_score: float = 0.35,
    require_single: bool = True,
) -> Verdict:
    """Choose the record's box: a box known from the source wins, else ``method``'s candidate.

    Drops: ``multiple_known_boxes`` (the source gives several boxes for a single-entity image),
    ``no_<method>_box`` (no candidate at or above ``min_score``), ``multiple_<method>_boxes``
    (more than one confident candidate while ``require_single``).
    """
    if record.boxes:
        if len(record.boxes) > 1:
            return Verdict.drop("multiple_known_boxes", count=len(record.boxes))
        return Verdict.ok(replace(record, box=record.boxes[0], box_source="known"))
    found = confident(record.candidates.get(method, ()), min_score)
    if not found:
        return Verdict.drop(f"no_{method}_box", min_score=min_score)
    if require_single and len(found) > 1:
        return Verdict.drop(
            f"multiple_{method}_boxes",
            count=len(found),
            scores=[round(d.score, 4) for d in found],
        )
    best = found[0]
    return Verdict.ok(replace(record, box=best.box, box_source=method), score=best.score)


def check_agreement(record: ImageRecord, other: str, min_iou: float, min_score: float) -> Verdict:
    """The trusted box must overlap ``other``'s best candidate at IoU >= ``min_iou``.

    A box known from the source is trusted and passes unchecked. The IoU is kept on the record
    (``box_ious[other]``) so the sample can report it. Drops: ``no_<other>_box`` and
    ``boxes_disagree``.
    """
    if record.box is None:
        raise ValueError("check_agreement needs a record whose box was resolved first")
    if record.box_source == "known":
        return Verdict.ok(skipped="known box")
    found = confident(record.candidates.get(other, ()), min_score)
    if not found:
        return Verdict.drop(f"no_{other}_box", min_score=min_score)
    iou = max(record.box.iou(d.box) for d in found)
    if iou < min_iou:
        return Verdict.drop("boxes_disagree", iou=round(iou, 4), min_iou=min_iou, other=other)
    return Verdict.ok(replace(record, box_ious={**record.box_ious, other: iou}), iou=iou)


def check_box_bounds(
    record: ImageRecord,
    min_area_fraction: float = 0.005,
    max_area_fraction: float = 1.0,
    max_aspect: float = 20.0,
) -> Verdict:
    """The box must cover a sensible share of the image and not be a sliver.

    Drops: ``box_too_small``, ``box_too_large``, ``box_aspect``.
    """
    box = record.box
    if box is None:
        raise ValueError("check_box_bounds needs a record whose box was resolved first")
    fraction = box.area / float(record.width * record.height)
    if fraction < min_area_fraction:
        return Verdict.drop("box_too_small", area_fraction=round(fraction, 6))
    if fraction > max_area_fraction:
        return Verdict.drop("box_too_large", area_fraction=round(fraction, 6))
    short, long = sorted((box.width, box.height))
    aspect = long / short if short > 0 else float("inf")
    if aspect > max_aspect:
        return Verdict.drop("box_aspect", aspect=round(aspect, 3))
    return Verdict.ok(area_fraction=fraction)
