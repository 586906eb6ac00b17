"""The KVG graph: source -> read -> validate image -> boxes -> box checks -> samples
-> [teacher rationale -> rationale checks] -> [student pass@k -> split] -> shards.

Wiring only: every decision is a plain function from ``filters/``, ``annotators/`` or
``sources/``, wrapped by :func:`groundforge.pipelines.stage.apply_check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult, RunInference

from groundforge import __version__
from groundforge.annotators.foreground import ForegroundAnnotator
from groundforge.annotators.questions import single_entity_sample
from groundforge.annotators.teacher.handler import ChatBackendSettings, ChatModelHandler
from groundforge.annotators.teacher.jobs import (
    grounding_job,
    rationale_job,
    reply_verdict,
    student_job,
)
from groundforge.annotators.teacher.knowledge import load_knowledge
from groundforge.annotators.teacher.prompts import load_template
from groundforge.annotators.teacher.types import TeacherReply
from groundforge.filters.consistency import check_consistency
from groundforge.filters.detection import check_agreement, check_box_bounds, resolve_box
from groundforge.filters.difficulty import SplitRule, count_correct, split_by_difficulty
from groundforge.filters.image import ImageLimits, check_image
from groundforge.filters.rationale import RationaleRules, check_rationale
from groundforge.filters.split import holdout_split
from groundforge.filters.verdict import Verdict
from groundforge.outputs.rejections import WriteRejections
from groundforge.outputs.shards import WriteShards
from groundforge.pipelines.stage import apply_check
from groundforge.recipe import (
    DetectorConfig,
    HFDatasetSourceConfig,
    ImageFolderSourceConfig,
    Recipe,
)
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import ImageRecord
from groundforge.sources.read import read_item

SHARDS_DIR = "shards"
REJECTIONS_FILE = "rejections.parquet"
CACHE_DIR = "cache"


def make_source(recipe: Recipe):
    """The source object a recipe names (see ``sources/``)."""
    cfg = recipe.source
    if isinstance(cfg, ImageFolderSourceConfig):
        from groundforge.sources.image_folder import ImageFolderSource, NamingRule

        naming = NamingRule(
            entity_from=cfg.entity_from,
            separators=cfg.separators,
            case=cfg.case,
            strip_pattern=cfg.strip_pattern,
            rename=dict(cfg.rename),
        )
        return ImageFolderSource(
            root=cfg.path,
            domain=recipe.domain,
            naming=naming,
            exclude=tuple(cfg.exclude),
            license=cfg.license,
            author=cfg.author,
        )
    if isinstance(cfg, HFDatasetSourceConfig):
        from groundforge.sources.hf_dataset import HFDatasetSource

        return HFDatasetSource(
            path=cfg.path,
            split=cfg.split,
            name=cfg.name,
            image_column=cfg.image_column,
            entity_column=cfg.entity_column,
            domain=recipe.domain,
            domain_column=cfg.domain_column,
            box_column=cfg.box_column,
            box_format=cfg.box_format,
            box_scale=cfg.box_scale,
            id_column=cfg.id_column,
            license=cfg.license,
        )
    raise TypeError(f"no source for {type(cfg).__name__}")


def splits_for(recipe: Recipe) -> list[str]:
    """The splits a recipe can produce (each exists in the output, possibly empty)."""
    splits = ["sft"]
    if recipe.student is not None:
        splits.append("grpo")
    if recipe.split.val_fraction > 0:
        splits.append("val")
    return splits


def detector_handler(cfg: DetectorConfig, num_threads: int | None):
    from groundforge.annotators.detector import GroundingDinoHandler

    return GroundingDinoHandler(
        model=cfg.model,
        labels={k: list(v) for k, v in cfg.labels.items()},
        box_threshold=cfg.box_threshold,
        text_threshold=cfg.text_threshold,
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads or num_threads,
        shortest_edge=cfg.shortest_edge,
        longest_edge=cfg.longest_edge,
    )


@dataclass(frozen=True)
class DetectorFailure:
    """A batch the detector raised on; its records are rejected, not lost."""

    error: str


def _failed_batch(failure):
    batch, error = failure
    for record in batch:
        yield PredictionResult(record, DetectorFailure(f"{type(error).__name__}: {error}"))


def attach_detections(prediction: PredictionResult) -> Verdict:
    """Put the detector's candidates on the record. Drops ``detector_failed`` (the image could
    not be run) and ``detector_error`` (the whole batch raised)."""
    record, dets = prediction.example, prediction.inference
    if isinstance(dets, DetectorFailure):
        return Verdict.drop("detector_error", error=dets.error)
    if dets is None:
        return Verdict.drop("detector_failed")
    return Verdict.ok(replace(record, candidates={**record.candidates, "detector": tuple(dets)}))


def _failed_jobs(failure):
    batch, error = failure
    detail = f"{type(error).__name__}: {error}"
    for job in batch:
        replies = tuple(
            TeacherReply(r.item_id, error="backend_error", detail=detail) for r in job.requests
        )
        yield PredictionResult(job, replies)


def attach_rationale(pair, codec, rules: RationaleRules, model: str) -> Verdict:
    """Keep the sample with the teacher's rationale when it passes the rationale checks."""
    sample, (text,) = pair
    verdict = check_rationale(text, sample, codec, rules)
    if not verdict.keep:
        return verdict
    return Verdict.ok(
        replace(
            sample,
            rationale=verdict.value,
            teacher_model=model,
            teacher_iou=verdict.metrics.get("iou"),
        ),
        **verdict.metrics,
    )


def attach_difficulty(pair, codec, k: int, min_iou: float, rule: SplitRule) -> Verdict:
    """Store the student's pass@k and move the sample to the split its difficulty asks for.

    Held-out (``val``) samples stay in val whatever their difficulty.
    """
    sample, texts = pair
    target = sample.gt_boxes[0]
    correct = count_correct(texts, target, sample.width, sample.height, codec, min_iou)
    scored = replace(sample, student_k=k, student_correct=correct)
    if sample.split == "val":
        return Verdict.ok(scored, correct=correct, k=k)
    verdict = split_by_difficulty(correct, k, rule)
    if not verdict.keep:
        return verdict
    return Verdict.ok(replace(scored, split=verdict.value), **verdict.metrics)


def _consistency(pair, codec, min_iou: float, min_score: float) -> Verdict:
    record, (text,) = pair
    return check_consistency(
        record, text, codec, min_iou=min_iou, method="detector", min_score=min_score
    )


def ground_known(record: ImageRecord):
    """A record whose box the source knows needs no grounder: pass it on with no answer."""
    return record, ("",)


def make_sample(record: ImageRecord, recipe: Recipe, recipe_hash: str) -> Verdict:
    split = holdout_split(record.entity, recipe.split.val_fraction, recipe.split.seed)
    return single_entity_sample(
        record,
        split,
        template=recipe.samples.question_template,
        recipe_hash=recipe_hash,
        version=__version__,
    )


@dataclass
class KVGGraph:
    """Builds the graph on a pipeline and remembers its stages in order (the funnel's rows).

    ``model_threads`` caps torch threads of in-process models (1 with several worker processes).
    """

    recipe: Recipe
    out_dir: str
    model_threads: int | None = None
    stages: list[str] = field(default_factory=list)
    chat_roles: list[str] = field(default_factory=list)
    _rejected: list = field(default_factory=list)

    def _stage(self, pcoll, name, check):
        kept, rejected = apply_check(pcoll, name, check)
        self.stages.append(name)
        self._rejected.append(rejected)
        return kept

    def _detect(self, records):
        handler = detector_handler(self.recipe.boxes.detector, self.model_threads)
        main, other = records | "detector" >> RunInference(handler).with_exception_handling()
        failed = other.failed_inferences | "failed batches" >> beam.FlatMap(_failed_batch)
        predictions = (main, failed) | "detector results" >> beam.Flatten()
        return self._stage(predictions, "detect", attach_detections)

    def _chat(self, jobs, role: str, cfg):
        """Send chat jobs through the role's model; keep ``(record, answers)``."""
        settings = ChatBackendSettings.from_config(
            role, cfg, FileSystems.join(self.out_dir, CACHE_DIR), self.model_threads
        )
        handler = ChatModelHandler(settings)
        main, other = jobs | f"{role} model" >> RunInference(handler).with_exception_handling()
        failed = other.failed_inferences | f"{role} failed batches" >> beam.FlatMap(_failed_jobs)
        answered = (main, failed) | f"{role} results" >> beam.Flatten()
        self.chat_roles.append(role)
        return self._stage(answered, role, partial(reply_verdict, role=role))

    def _ground(self, records):
        cfg, boxes = self.recipe.grounder, self.recipe.boxes
        codec = get_codec(cfg.codec, **cfg.codec_params)
        template = load_template(cfg.prompt)
        known, unknown = records | "known boxes" >> beam.Partition(
            lambda r, _: 0 if r.boxes else 1, 2
        )
        jobs = unknown | "grounding jobs" >> beam.Map(grounding_job, template, codec)
        answered = self._chat(jobs, "grounder", cfg)
        passed = known | "no grounding needed" >> beam.Map(ground_known)
        pairs = (answered, passed) | "grounded" >> beam.Flatten()
        return self._stage(
            pairs,
            "consistency",
            partial(
                _consistency,
                codec=codec,
                min_iou=cfg.consistency_iou,
                min_score=boxes.confident_score,
            ),
        )

    def _teach(self, samples):
        cfg = self.recipe.teacher
        codec = get_codec(cfg.codec, **cfg.codec_params)
        knowledge = load_knowledge(cfg.knowledge) if cfg.knowledge else None
        jobs = samples | "rationale jobs" >> beam.Map(
            rationale_job, load_template(cfg.prompt), codec, knowledge, cfg.system
        )
        answered = self._chat(jobs, "teacher", cfg)
        r = cfg.rationale
        rules = RationaleRules(
            min_iou=r.min_iou,
            min_chars=r.min_chars,
            max_chars=r.max_chars,
            require_target=r.require_target,
            **({"leak_phrases": tuple(r.leak_phrases)} if r.leak_phrases is not None else {}),
        )
        return self._stage(
            answered,
            "rationale",
            partial(attach_rationale, codec=codec, rules=rules, model=cfg.model),
        )

    def _examine(self, samples):
        cfg = self.recipe.student
        codec = get_codec(cfg.codec, **cfg.codec_params)
        jobs = samples | "student jobs" >> beam.Map(student_job, cfg.k, cfg.reasoning_suffix)
        answered = self._chat(jobs, "student", cfg)
        return self._stage(
            answered,
            "difficulty",
            partial(
                attach_difficulty,
                codec=codec,
                k=cfg.k,
                min_iou=cfg.correct_iou,
                rule=SplitRule(none_correct=cfg.none_correct),
            ),
        )

    def build(self, p: beam.Pipeline) -> list[str]:
        recipe, boxes = self.recipe, self.recipe.boxes
        source = make_source(recipe)
        items = (
            p
            | "partitions" >> beam.Create(source.partitions())
            | "spread" >> beam.Reshuffle()
            | "list items" >> beam.FlatMap(source.items)
        )
        records = self._stage(items, "read", read_item)
        limits = ImageLimits(min_side=recipe.images.min_side, max_pixels=recipe.images.max_pixels)
        records = self._stage(records, "image", partial(check_image, limits=limits))

        methods = {boxes.method, boxes.agree_with} - {None}
        if "foreground" in methods:
            annotate = ForegroundAnnotator(
                tolerance=boxes.foreground_tolerance, background=boxes.foreground_background
            )
            records = records | "foreground box" >> beam.Map(annotate)
        if "detector" in methods:
            records = self._detect(records)

        if recipe.grounder is not None:
            records = self._ground(records)
        else:
            records = self._stage(
                records,
                "box",
                partial(
                    resolve_box,
                    method=boxes.method,
                    min_score=boxes.confident_score,
                    require_single=boxes.require_single,
                ),
            )
        if boxes.agree_with:
            records = self._stage(
                records,
                "agreement",
                partial(
                    check_agreement,
                    other=boxes.agree_with,
                    min_iou=boxes.agreement_iou,
                    min_score=boxes.confident_score,
                ),
            )
        records = self._stage(
            records,
            "box_bounds",
            partial(
                check_box_bounds,
                min_area_fraction=boxes.min_area_fraction,
                max_area_fraction=boxes.max_area_fraction,
                max_aspect=boxes.max_aspect,
            ),
        )
        samples = self._stage(
            records, "sample", partial(make_sample, recipe=recipe, recipe_hash=recipe.digest())
        )
        if recipe.teacher is not None:
            samples = self._teach(samples)
        if recipe.student is not None:
            samples = self._examine(samples)
        _ = samples | "write shards" >> WriteShards(
            FileSystems.join(self.out_dir, SHARDS_DIR),
            recipe.output.format,
            recipe.output.rows_per_shard,
        )
        _ = (
            self._rejected
            | "all rejections" >> beam.Flatten()
            | "write rejections" >> WriteRejections(FileSystems.join(self.out_dir, REJECTIONS_FILE))
        )
        return self.stages
