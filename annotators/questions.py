"""Turn a record with a trusted box into a KVG sample: the question and its answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from groundforge.filters.verdict import Verdict
from groundforge.recipe import DEFAULT_QUESTION
from groundforge.scenes.compose import remap_box
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
        candidates=record.candidates,
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


def scene_samples(
    scene,
    plan,
    members: Sequence[ImageRecord],
    template: str = DEFAULT_QUESTION,
    recipe_hash: str = "",
    version: str = "",
) -> list[KVGSample]:
    """One ``kvg`` sample per query of a composed scene: the question names one member's entity,
    ``entities`` lists every member with its box on the canvas.

    ``scene`` is a :class:`groundforge.scenes.compose.Scene`, ``plan`` its
    :class:`groundforge.scenes.plan.ScenePlan`, ``members`` the records in canvas order.
    """
    provenance = Provenance(
        source_image_ids=tuple(scene.source_image_ids),
        locations=tuple(m.location for m in members),
        sources=tuple(m.source for m in members),
        licenses=tuple(m.license for m in members),
        authors=tuple(m.author for m in members),
        urls=tuple(m.url for m in members),
        layout=scene.layout,
        recipe_hash=recipe_hash,
        version=version,
    )
    samples = []
    for query, similarity in zip(plan.queries, plan.similarities, strict=True):
        target, member = scene.entities[query], members[query]
        size, placement = (member.width, member.height), scene.placements[query]
        candidates = {
            name: tuple(replace(d, box=remap_box(d.box, size, placement)) for d in found)
            for name, found in member.candidates.items()
        }
        question = question_for(target.name, template)
        samples.append(
            KVGSample(
                sample_id=stable_id("kvg-scene", plan.scene_id, query, question),
                image=scene.image,
                width=scene.width,
                height=scene.height,
                domain=plan.domain,
                task="kvg",
                question=question,
                target=target.name,
                entities=tuple(scene.entities),
                gt_boxes=(target.box,),
                split=plan.split,
                box_source=member.box_source,
                detector_iou=member.box_ious.get("detector"),
                candidates=candidates,
                provenance=provenance,
                distractors=plan.distractors,
                distractor_similarity=similarity,
            )
        )
    return samples
