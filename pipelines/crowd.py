"""The ``detect`` task's steps (crowded-scene detection, DIP-R1): a sample per image with
every instance, synthetic crowds, uncertain regions and the teacher's think / look / answer
rationale. :class:`groundforge.pipelines.kvg.KVGGraph` wires them when a recipe has ``detect``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from groundforge import __version__
from groundforge.annotators.questions import detection_sample, members_provenance
from groundforge.filters.detect_rationale import DetectionRules, check_detection_rationale
from groundforge.filters.rationale import with_rationale
from groundforge.filters.uncertain import attach_uncertain_regions
from groundforge.filters.verdict import Verdict
from groundforge.pipelines.plans import gather_members
from groundforge.recipe import Recipe
from groundforge.scenes.crowd import compose_crowd
from groundforge.schemas.records import ImageRecord


def attach_detection_rationale(pair, codec, rules: DetectionRules, model: str) -> Verdict:
    """Keep the detect sample with the teacher's think and look steps when they pass."""
    sample, (text,) = pair
    verdict = check_detection_rationale(text, sample, codec, rules)
    if not verdict.keep:
        return verdict
    return Verdict.ok(
        with_rationale(sample, verdict.value, codec, teacher_model=model), **verdict.metrics
    )


def compose_planned_crowd(keyed, spec, label: str) -> Verdict:
    """Compose one planned crowd: ``(crowd record, plan, the members it shows)``."""
    gathered = gather_members(keyed, "crowd_member_missing")
    if not gathered.keep:
        return gathered
    plan, members = gathered.value
    crowd = compose_crowd(members, spec, plan.scene_id, label)
    record = crowd.to_record(plan.domain, label, f"crowd:{plan.scene_id}")
    # A crowd may draw fewer instances than it was offered: credit only the images it shows.
    shown = set(crowd.source_image_ids)
    painted = tuple(m for m in members if m.image_id in shown)
    # What its images' annotation files could not describe may be in the crowd too.
    lost: Counter = Counter()
    for member in painted:
        lost.update(member.dropped_instances)
    record = replace(record, dropped_instances=dict(sorted(lost.items())))
    return Verdict.ok((record, plan, painted), instances=len(crowd.instances))


def _detection_sample(record, split: str, recipe: Recipe, recipe_hash: str, provenance=None):
    cfg = recipe.detect
    return detection_sample(
        record,
        split,
        label=cfg.label,
        template=cfg.question_template,
        min_box_side=cfg.min_box_side,
        max_instances=cfg.max_instances,
        occluded_below=cfg.occluded_below,
        recipe_hash=recipe_hash,
        version=__version__,
        provenance=provenance,
    )


def crowd_detection_sample(composed, recipe: Recipe, recipe_hash: str) -> Verdict:
    """The detect sample of a composed crowd, in its plan's split, credited to its members."""
    record, plan, members = composed
    provenance = members_provenance(members, "crowd", recipe_hash, __version__)
    return _detection_sample(record, plan.split, recipe, recipe_hash, provenance)


def make_detection_sample(record: ImageRecord, recipe: Recipe, recipe_hash: str) -> Verdict:
    """The detect sample of an annotated image."""
    # Every image of a crowd holds the same class: split by image, not by entity.
    split = recipe.split.split_of(record.image_id, record.domain)
    return _detection_sample(record, split, recipe, recipe_hash)


def mark_uncertain(sample, cfg) -> Verdict:
    """Where the detector hesitates on a detect sample (missed, weak, false positive), beside the
    occluded truths the sample was made with."""
    return attach_uncertain_regions(
        sample,
        "detector",
        min_score=cfg.uncertain_min_score,
        match_iou=cfg.uncertain_match_iou,
        weak_iou=cfg.uncertain_weak_iou,
    )
