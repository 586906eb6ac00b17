"""Turn records into samples: a KVG question about one entity (single images and scenes), or a
detection question about every instance of a class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from groundforge.filters.verdict import Verdict
from groundforge.recipe import DEFAULT_QUESTION
from groundforge.scenes.compose import remap_box
from groundforge.schemas.records import (
    Entity,
    ImageRecord,
    KVGSample,
    Provenance,
    UncertainRegion,
    stable_id,
)

DETECT_TASK = "detect"


def question_for(entity: str, template: str = DEFAULT_QUESTION) -> str:
    """The grounding question for one entity.

    >>> question_for("Chad")
    'Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>'
    """
    return template.replace("{entity}", entity)


def record_provenance(record: ImageRecord, recipe_hash: str, version: str) -> Provenance:
    """Where a sample made of one whole image came from."""
    return Provenance(
        source_image_ids=(record.image_id,),
        locations=(record.location,),
        sources=(record.source,),
        licenses=(record.license,),
        authors=(record.author,),
        urls=(record.url,),
        layout="single",
        recipe_hash=recipe_hash,
        version=version,
    )


def members_provenance(
    members: Sequence[ImageRecord], layout: str, recipe_hash: str, version: str
) -> Provenance:
    """Where a sample made of several images (a scene, a crowd) came from, member by member."""
    return Provenance(
        source_image_ids=tuple(m.image_id for m in members),
        locations=tuple(m.location for m in members),
        sources=tuple(m.source for m in members),
        licenses=tuple(m.license for m in members),
        authors=tuple(m.author for m in members),
        urls=tuple(m.url for m in members),
        layout=layout,
        recipe_hash=recipe_hash,
        version=version,
    )


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
        image_ref=record.image_ref,
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
        provenance=record_provenance(record, recipe_hash, version),
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
    provenance = members_provenance(members, scene.layout, recipe_hash, version)
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


def detection_sample(
    record: ImageRecord,
    split: str,
    label: str,
    template: str,
    min_box_side: float = 0.0,
    max_instances: int = 100,
    occluded_below: float = 0.0,
    recipe_hash: str = "",
    version: str = "",
    provenance: Provenance | None = None,
) -> Verdict:
    """One ``detect`` sample asking for every instance of ``label`` in the record's image.

    Truths are the record's non-ignore instances; ignore instances, and truths with a side below
    ``min_box_side``, become ``ignore_regions`` (neither to be found nor false positives). Drops
    ``no_instances`` (nothing left to find) and ``too_many_instances``. Truths whose visible box
    covers less than ``occluded_below`` of their full box become ``occluded`` uncertain regions.
    ``provenance`` replaces the record's own (a crowd composed of several images).
    """
    truths, ignore, occluded = [], [], []
    for inst in record.instances:
        small = min(inst.box.width, inst.box.height) < min_box_side
        (ignore if inst.ignore or small else truths).append(inst.box)
        if not (inst.ignore or small) and inst.visible_share < occluded_below:
            occluded.append(UncertainRegion(inst.box, "occluded"))
    if not truths:
        return Verdict.drop("no_instances", ignored=len(ignore))
    if len(truths) > max_instances:
        return Verdict.drop("too_many_instances", count=len(truths), max_instances=max_instances)
    question = template.replace("{label}", label)
    sample = KVGSample(
        sample_id=stable_id(DETECT_TASK, record.image_id, question),
        image=record.image,
        image_ref=record.image_ref,
        width=record.width,
        height=record.height,
        domain=record.domain,
        task=DETECT_TASK,
        question=question,
        target=label,
        entities=tuple(Entity(label, box) for box in truths),
        gt_boxes=tuple(truths),
        split=split,
        box_source="known",
        candidates=record.candidates,
        ignore_regions=tuple(ignore),
        uncertain_regions=tuple(occluded),
        provenance=provenance or record_provenance(record, recipe_hash, version),
        dropped_instances=record.dropped_instances,
    )
    return Verdict.ok(sample, instances=len(truths), ignored=len(ignore), occluded=len(occluded))
