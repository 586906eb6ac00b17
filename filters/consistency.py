"""Grounding consistency: a detector candidate and the MLLM grounder must agree on the box.

For a single-entity image the detector (Grounding DINO, prompted with the super-category) finds
*an* object tightly but cannot tell which fine-grained entity it is; the MLLM grounder names the
entity but draws looser boxes. A box is trusted only where both agree (data engine step 2), and
the box kept is the detector's: it carries the tighter localisation, while the grounder's role is
to pick which candidate is the entity.
"""

from __future__ import annotations

from dataclasses import replace

from groundforge.filters.detection import confident
from groundforge.filters.verdict import Verdict
from groundforge.schemas.codecs import BoxCodec
from groundforge.schemas.records import ImageRecord


def check_consistency(
    record: ImageRecord,
    grounder_text: str | None,
    codec: BoxCodec,
    min_iou: float = 0.5,
    method: str = "detector",
    min_score: float = 0.35,
) -> Verdict:
    """Keep ``record`` with the ``method`` candidate the grounder's box agrees with.

    A box known from the source wins unchecked (``box_source`` ``"known"``). Otherwise the last
    box of ``grounder_text`` (read with ``codec`` in the record's size) is matched against the
    confident candidates (score >= ``min_score``) and the one with the highest IoU is kept, with
    ``box_ious["grounder"]`` set to that IoU. Drops, in order: ``multiple_known_boxes``,
    ``grounder_unparsable``, ``no_candidate``, ``grounder_disagrees`` (best IoU < ``min_iou``).
    """
    if record.boxes:
        if len(record.boxes) > 1:
            return Verdict.drop("multiple_known_boxes", count=len(record.boxes))
        return Verdict.ok(replace(record, box=record.boxes[0], box_source="known"))
    grounded = codec.parse_last(grounder_text, record.width, record.height)
    if grounded is None:
        return Verdict.drop("grounder_unparsable", text=(grounder_text or "")[:200])
    found = confident(record.candidates.get(method, ()), min_score)
    if not found:
        return Verdict.drop("no_candidate", method=method, min_score=min_score)
    # ``found`` is best score first and max() keeps the first of equals: ties go to the score.
    best = max(found, key=lambda d: grounded.iou(d.box))
    iou = grounded.iou(best.box)
    if iou < min_iou:
        return Verdict.drop(
            "grounder_disagrees",
            iou=iou,
            min_iou=min_iou,
            grounder_box=grounded.to_list(),
            candidate_box=best.box.to_list(),
        )
    kept = replace(
        record,
        box=best.box,
        box_source=method,
        box_ious={**record.box_ious, "grounder": iou},
    )
    return Verdict.ok(kept, iou=iou, score=best.score)
