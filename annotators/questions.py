"""Turn a record with a trusted box into a KVG sample: the question and its answer."""

from __future__ import annotations

from groundforge.filters.verdict import Verdict
from groundforge.recipe import DEFAULT_QUESTION
from groundforge.schemas.records import Entity, ImageRecord, KVGSample, Provenance, stable_id


def question_for(entity: str, template: str = DEFAULT_QUESTION) -> str:
    """The grounding question for one entity.

    >>> question_for("Chad")
    'Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>'
    """
    return template.replace("{entity}", entity)


def single_entity_sample(
    record: ImageRecord,
    split: str,
    template: str = DEFAULT_QUESTION,
    recipe_hash: str = "",
    version: str = "",
) -> Verdict:
    """One ``kvg`` sample asking for the record's entity. Drops ``no_entity`` and ``no_box``."""
    if not record.entity.strip():
        return Verdict.drop("no_entity", location=record.location)
    if record.box is None:
        return Verdict.drop("no_box")
    question = question_for(record.entity, template)
    box = record.box
    sample = KVGSample(
        sample_id=stable_id("kvg", record.image_id, record.entity, question, box.to_list()),
        image=record.image,
        width=record.width,
        height=record.height,
        domain=record.domain,
        task="kvg",
        question=question,
        target=record.entity,
        entities=(Entity(record.entity, box),),
        gt_boxes=(box,),
        split=split,
        box_source=record.box_source,
        detector_iou=record.box_ious.get("detector"),
        provenance=Provenance(
            source_image_ids=(record.image_id,),
            locations=(record.location,),
            sources=(record.source,),
            licenses=(record.license,),
            authors=(record.author,),
            urls=(record.url,),
            layout="single",
            recipe_hash=recipe_hash,
            version=version,
        ),
    )
    return Verdict.ok(sample)
