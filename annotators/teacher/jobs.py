"""Chat jobs for each role, and the verdict on what came back.

A job builder turns a record into the :class:`ChatJob` its role sends; :func:`reply_verdict`
turns the answered job into ``(record, text)`` or a drop named ``<role>_<failure kind>``.
"""

from __future__ import annotations

from apache_beam.ml.inference.base import PredictionResult

from groundforge.annotators.teacher.handler import ChatJob
from groundforge.annotators.teacher.prompts import (
    PromptTemplate,
    detection_rationale_prompt,
    grounding_prompt,
    rationale_prompt,
)
from groundforge.annotators.teacher.types import TeacherRequest
from groundforge.filters.verdict import Verdict
from groundforge.pixels import image_bytes
from groundforge.schemas.records import ImageRecord, KVGSample, sha256_hex, stable_id


def grounding_job(record: ImageRecord, template: PromptTemplate, codec) -> ChatJob:
    """Ask for the box of the record's entity in its (single-entity) image."""
    prompt = grounding_prompt(
        record.entity, record.domain, codec, template, record.width, record.height
    )
    image = image_bytes(record)
    request = TeacherRequest(
        item_id=record.image_id,
        prompt=prompt,
        images=(image,),
        image_ids=(sha256_hex(image),),
        template_hash=template.hash,
    )
    return ChatJob(record.image_id, (request,), context=record)


def _teacher_job(
    sample: KVGSample, prompt: str, template: PromptTemplate, system: str | None
) -> ChatJob:
    image = image_bytes(sample)
    request = TeacherRequest(
        item_id=sample.sample_id,
        prompt=prompt,
        images=(image,),
        image_ids=(sha256_hex(image),),
        template_hash=template.hash,
        system=system,
    )
    return ChatJob(sample.sample_id, (request,), context=sample)


def rationale_job(
    sample: KVGSample, template: PromptTemplate, codec, knowledge=None, system: str | None = None
) -> ChatJob:
    """Ask the teacher for the reasoning that finds the sample's target."""
    prompt = rationale_prompt(sample, codec, template, knowledge)
    return _teacher_job(sample, prompt, template, system)


def detection_rationale_job(
    sample: KVGSample, template: PromptTemplate, codec, system: str | None = None
) -> ChatJob:
    """Ask the teacher for the think / look / answer reasoning that finds every instance of a
    ``detect`` sample's class."""
    prompt = detection_rationale_prompt(sample, codec, template)
    return _teacher_job(sample, prompt, template, system)


def student_job(sample: KVGSample, k: int, suffix: str | None = None) -> ChatJob:
    """``k`` samples of the student answering the sample's question (pass@k)."""
    prompt = sample.question if not suffix else f"{sample.question}{suffix}"
    image = image_bytes(sample)
    image_id = sha256_hex(image)
    template_hash = stable_id("student", suffix or "")
    requests = tuple(
        TeacherRequest(
            item_id=f"{sample.sample_id}#{i}",
            prompt=prompt,
            images=(image,),
            image_ids=(image_id,),
            template_hash=template_hash,
            sample_index=i,
        )
        for i in range(k)
    )
    return ChatJob(sample.sample_id, requests, context=sample)


def reply_verdict(result: PredictionResult, role: str) -> Verdict:
    """Keep ``(record, texts)`` when every request of the job was answered; otherwise drop with
    ``<role>_<kind>`` of the first failure (the item cannot be judged on part of its answers)."""
    job, replies = result.example, result.inference
    for reply in replies:
        if not reply.ok:
            return Verdict.drop(
                f"{role}_{reply.error}", detail=reply.detail, attempts=reply.attempts
            )
    return Verdict.ok(
        (job.context, tuple(r.text for r in replies)), cached=sum(r.cached for r in replies)
    )
