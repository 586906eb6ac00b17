"""The last check before a sample is written: the invariants every shard row keeps."""

from __future__ import annotations

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import KVGSample


def check_sample(sample: KVGSample) -> Verdict:
    """A row must name its target, and every answer box must lie inside the image with an area.

    Drops: ``no_target``, ``no_gt_box``, ``gt_box_outside_image``, ``target_not_in_entities``.
    """
    if not sample.target.strip():
        return Verdict.drop("no_target")
    if not sample.gt_boxes:
        return Verdict.drop("no_gt_box")
    for box in sample.gt_boxes:
        inside = 0 <= box.x1 < box.x2 <= sample.width and 0 <= box.y1 < box.y2 <= sample.height
        if not inside:
            return Verdict.drop(
                "gt_box_outside_image", box=box.to_list(), size=[sample.width, sample.height]
            )
    if sample.task == "kvg" and not any(
        e.name == sample.target and e.box in sample.gt_boxes for e in sample.entities
    ):
        return Verdict.drop("target_not_in_entities")
    return Verdict.ok()
