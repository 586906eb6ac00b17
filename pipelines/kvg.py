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
from groundforge.annotators.embed import ImageEmbeddingHandler, make_image_embedder
from groundforge.annotators.foreground import ForegroundAnnotator
from groundforge.annotators.questions import (
    scene_samples,
    single_entity_sample,
)
from groundforge.annotators.teacher.handler import ChatBackendSettings, ChatModelHandler
from groundforge.annotators.teacher.jobs import (
    detection_rationale_job,
    grounding_job,
    rationale_job,
    reply_verdict,
    student_job,
)
from groundforge.annotators.teacher.knowledge import load_knowledge
from groundforge.annotators.teacher.prompts import load_template
from groundforge.annotators.teacher.types import TeacherReply
from groundforge.filters.consistency import check_consistency
from groundforge.filters.decontaminate import CandidateSettings, ContaminationCheck
from groundforge.filters.dedup import DedupSettings
from groundforge.filters.detection import check_agreement, check_box_bounds, resolve_box
from groundforge.filters.difficulty import SplitRule, count_correct, split_by_difficulty
from groundforge.filters.image import ImageLimits, check_image
from groundforge.filters.output import check_sample
from groundforge.filters.rationale import RationaleRules, check_rationale, with_rationale
from groundforge.filters.references import check_reference, rank_references
from groundforge.filters.sameimage import SameSettings
from groundforge.filters.verdict import Verdict
from groundforge.outputs.previews import PREVIEWS_FILE, WritePreviews
from groundforge.outputs.rejections import WriteRejections
from groundforge.outputs.shards import WriteShards
from groundforge.pipelines.aliases import TallyAliases
from groundforge.pipelines.crowd import (
    attach_detection_rationale,
    compose_planned_crowd,
    crowd_detection_sample,
    make_detection_sample,
    mark_uncertain,
)
from groundforge.pipelines.dedup import JoinFindings, dedup_check
from groundforge.pipelines.metrics import (
    TallyEntities,
    TallyProvenance,
    counted_instances,
    model_namespace,
)
from groundforge.pipelines.plans import (
    PlanCrowds,
    PlanScenes,
    claimed_records,
    gather_members,
    route_members,
    wanted_members,
)
from groundforge.pipelines.selection import Selection, SelectItems
from groundforge.pipelines.stage import apply_check
from groundforge.pixels import PixelStore
from groundforge.recipe import (
    ANNOTATION_SOURCES,
    CocoSourceConfig,
    DetectorConfig,
    HFDatasetSourceConfig,
    ImageFolderSourceConfig,
    OdgtSourceConfig,
    Recipe,
)
from groundforge.scenes.compose import compose_scene
from groundforge.scenes.layout import CanvasSpec
from groundforge.scenes.plan import PlanSettings, PoolItem
from groundforge.scenes.sampling import SceneMix
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import ImageRecord, record_key
from groundforge.sources.read import read_item

SHARDS_DIR = "shards"
CACHE_DIR = "cache"
# What a run keeps only while it runs (parked pixels); removed when it has finished.
WORK_DIR = "_work"
REJECTION_PARTS = "rejections"


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
            follow_outside_links=cfg.follow_outside_links,
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
    if isinstance(cfg, CocoSourceConfig):
        from groundforge.sources.annotations import CocoSource

        categories = tuple(cfg.categories) if cfg.categories is not None else None
        return CocoSource(
            annotations=cfg.annotations,
            images=cfg.images,
            domain=recipe.domain,
            categories=categories,
            license=cfg.license,
        )
    if isinstance(cfg, OdgtSourceConfig):
        from groundforge.sources.annotations import OdgtSource

        return OdgtSource(
            annotations=cfg.annotations,
            images=cfg.images,
            domain=recipe.domain,
            box=cfg.box,
            tag=cfg.tag,
            license=cfg.license,
        )
    raise TypeError(f"no source for {type(cfg).__name__}")


def needs_embedding(recipe: Recipe) -> bool:
    """Image vectors are computed only for a step that uses them."""
    scenes = recipe.scenes is not None and recipe.scenes.enabled
    return (
        (recipe.dedup.enabled and recipe.dedup.embedding)
        or (recipe.decontaminate is not None and recipe.decontaminate.use_embedding)
        or (scenes and recipe.scenes.similarity == "image")
    )


def splits_for(recipe: Recipe) -> list[str]:
    """The splits a recipe can produce (each exists in the output, possibly empty)."""
    splits = ["sft"]
    if recipe.student is not None:
        splits.append("grpo")
    if recipe.split.val_fraction > 0 or recipe.split.val_domains:
        splits.append("val")
    return splits


def detector_handler(cfg: DetectorConfig, num_threads: int | None, progress=None):
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
        progress=progress,
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
        # The reply itself, so the rejections table and the report show what was refused.
        return Verdict.drop(verdict.reason, **verdict.metrics, reply=text)
    return Verdict.ok(
        with_rationale(
            sample,
            verdict.value,
            codec,
            teacher_model=model,
            teacher_iou=verdict.metrics.get("iou"),
            teacher_box=Box.from_list(verdict.metrics["box"]),
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


def attach_embedding(prediction: PredictionResult) -> Verdict:
    """Put the embedder's vector on the record; ``embed_failed`` when it had none."""
    if prediction.inference is None:
        return Verdict.drop("embed_failed")
    return Verdict.ok(replace(prediction.example, embedding=tuple(prediction.inference)))


def in_a_plan(claim: tuple[ImageRecord, bool], reason: str) -> Verdict:
    """Keep the images some plan uses (``claim`` is ``(record, wanted)``). In scenes every image
    is the target of its own scenes unless its pool (domain and split) holds fewer than two
    entities; crowds draw from their pool at random, so some images may stay out."""
    record, wanted = claim
    if wanted:
        return Verdict.ok(record)
    return Verdict.drop(reason)


def pool_item(record: ImageRecord, recipe: Recipe) -> PoolItem:
    return PoolItem(
        key=record_key(record),
        image_id=record.image_id,
        domain=record.domain,
        split=split_of(record, recipe),
        entity=record.entity,
        embedding=record.embedding,
    )


def plan_all(settings: PlanSettings, cfg) -> PlanScenes:
    """The scene planning of a recipe: per target image, from per-pool entity tables whose
    vectors are mean image vectors or, with ``similarity: text``, embedded entity names."""
    return PlanScenes(settings, text=cfg.similarity == "text", text_model=cfg.text_model)


def compose_planned(keyed, spec: CanvasSpec) -> Verdict:
    """Compose one planned scene from its member records."""
    gathered = gather_members(keyed, "scene_member_missing")
    if not gathered.keep:
        return gathered
    plan, members = gathered.value
    return Verdict.ok((compose_scene(members, plan.layout, spec, plan.seed), plan, members))


def _consistency(pair, codec, min_iou: float, min_score: float) -> Verdict:
    record, (text,) = pair
    return check_consistency(
        record, text, codec, min_iou=min_iou, method="detector", min_score=min_score
    )


def ground_known(record: ImageRecord):
    """A record whose box the source knows needs no grounder: pass it on with no answer."""
    return record, ("",)


def split_of(record: ImageRecord, recipe: Recipe) -> str:
    return recipe.split.split_of(record.entity, record.domain)


def make_sample(record: ImageRecord, recipe: Recipe, recipe_hash: str) -> Verdict:
    split = split_of(record, recipe)
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

    ``model_threads`` caps torch threads of in-process models (1 with several worker processes);
    with ``progress_dir`` every stage writes its live counts there. Replies are cached in
    ``cache_dir`` (default ``out_dir/cache``). With ``selection`` only the items it chooses
    are read (see :mod:`groundforge.pipelines.selection`).
    """

    recipe: Recipe
    out_dir: str
    model_threads: int | None = None
    cache_dir: str | None = None
    progress_dir: str | None = None
    selection: Selection | None = None
    # The run's request ledger (annotators/teacher/budget.py) when the recipe has a budget.
    budget: object | None = None
    stages: list[str] = field(default_factory=list)
    chat_roles: list[str] = field(default_factory=list)
    # A model stage -> the stage whose kept items it receives (for its live time estimate).
    feeders: dict[str, str] = field(default_factory=dict)
    # Model stages that are no chat role (detector, embedder), in graph order.
    model_stages: list[str] = field(default_factory=list)
    # Every model stage -> its recipe price (or None).
    prices: dict[str, object] = field(default_factory=dict)
    _rejected: list = field(default_factory=list)
    _previews: list = field(default_factory=list)

    @property
    def pixels(self) -> PixelStore:
        """Where checked images and composed scenes wait (records carry only the reference)."""
        return PixelStore(FileSystems.join(self.out_dir, WORK_DIR, "pixels"))

    def _stage(self, pcoll, name, check, **side_inputs):
        out = apply_check(pcoll, name, check, self.progress_dir, **side_inputs)
        self.stages.append(name)
        self._rejected.append(out.rejected)
        self._previews.append(out.previews)
        return out.kept

    def _model_stage(self, stage: str, price):
        """Note the model feeding ``stage`` (its feeder and price); return its live request
        meter, or None when nobody watches."""
        self.prices[stage] = price
        if self.stages:
            self.feeders[stage] = self.stages[-1]
        if not self.progress_dir:
            return None
        from groundforge.pipelines.progress import ModelProgress

        return ModelProgress(self.progress_dir, stage)

    def _detect(self, records, stage: str = "detect"):
        """Grounding DINO candidates on each record (or detect sample), at ``stage``."""
        cfg = self.recipe.boxes.detector
        handler = detector_handler(cfg, self.model_threads, self._model_stage(stage, cfg.price))
        self.model_stages.append(stage)
        main, other = (
            records
            | f"{stage} detector"
            >> RunInference(
                handler, metrics_namespace=model_namespace(stage)
            ).with_exception_handling()
        )
        failed = other.failed_inferences | f"{stage} failed batches" >> beam.FlatMap(_failed_batch)
        predictions = (main, failed) | f"{stage} detector results" >> beam.Flatten()
        return self._stage(predictions, stage, attach_detections)

    def _chat(self, jobs, role: str, cfg):
        """Send chat jobs through the role's model; keep ``(record, answers)``."""
        settings = ChatBackendSettings.from_config(
            role,
            cfg,
            self.cache_dir or FileSystems.join(self.out_dir, CACHE_DIR),
            self.model_threads,
        )
        handler = ChatModelHandler(settings, self._model_stage(role, cfg.price), self.budget)
        main, other = (
            jobs
            | f"{role} model"
            >> RunInference(
                handler, metrics_namespace=model_namespace(role)
            ).with_exception_handling()
        )
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
        """Teacher rationales: KVG ones (think / answer) or, for detect samples, think / look /
        answer; each checked by its filter."""
        cfg = self.recipe.teacher
        codec = get_codec(cfg.codec, **cfg.codec_params)
        if self.recipe.detect is not None:
            template = load_template(cfg.prompt or "detect_rationale")
            jobs = samples | "rationale jobs" >> beam.Map(
                detection_rationale_job, template, codec, cfg.system
            )
            attach = partial(
                attach_detection_rationale,
                codec=codec,
                rules=cfg.rationale.detection_rules(),
                model=cfg.model,
            )
        else:
            knowledge = load_knowledge(cfg.knowledge) if cfg.knowledge else None
            template = load_template(cfg.prompt or "kvg_rationale")
            jobs = samples | "rationale jobs" >> beam.Map(
                rationale_job, template, codec, knowledge, cfg.system
            )
            attach = partial(
                attach_rationale, codec=codec, rules=cfg.rationale.kvg_rules(), model=cfg.model
            )
        return self._stage(self._chat(jobs, "teacher", cfg), "rationale", attach)

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

    def _embed(self, records):
        cfg = self.recipe.embed
        embedder = (
            make_image_embedder(cfg.image)
            if cfg.image.startswith("color_histogram")
            else make_image_embedder(
                cfg.image,
                device=cfg.device,
                batch_size=cfg.batch_size,
                num_threads=self.model_threads,
            )
        )
        handler = ImageEmbeddingHandler(embedder, self._model_stage("embed", cfg.price))
        self.model_stages.append("embed")
        main, other = (
            records
            | "embedder"
            >> RunInference(
                handler, metrics_namespace=model_namespace("embed")
            ).with_exception_handling()
        )
        failed = other.failed_inferences | "embed failed batches" >> beam.FlatMap(
            lambda failure: (PredictionResult(r, None) for r in failure[0])
        )
        predictions = (main, failed) | "embeddings" >> beam.Flatten()
        return self._stage(predictions, "embed", attach_embedding)

    def _decontaminate(self, records):
        cfg, embed = self.recipe.decontaminate, self.recipe.embed
        check = ContaminationCheck(
            benchmarks=tuple(cfg.benchmarks),
            candidates=CandidateSettings(
                max_hamming=cfg.max_hamming,
                layout_cosine=cfg.layout_cosine,
                min_cosine=cfg.min_cosine,
            ),
            same=SameSettings(max_block_difference=cfg.max_block_difference),
            embedder=embed.image if cfg.use_embedding else None,
        )
        return self._stage(records, "decontaminate", check)

    def _references(self, records):
        """One record per source location (:mod:`groundforge.filters.references`)."""
        located = records | "located" >> beam.Filter(lambda r: bool(r.location))
        unlocated = (
            records
            | "unlocated" >> beam.Filter(lambda r: not r.location)
            | "nothing shared" >> beam.Map(lambda r: (r, None))
        )
        ranked = (
            located
            | "key by location" >> beam.Map(lambda r: (r.location, r))
            | "records per location" >> beam.GroupByKey()
            | "rank references" >> beam.FlatMap(lambda kv: rank_references(kv[1]))
        )
        pairs = (ranked, unlocated) | "all references" >> beam.Flatten()
        return self._stage(pairs, "reference", check_reference)

    def _dedup(self, records):
        cfg = self.recipe.dedup
        settings = DedupSettings(
            exact=cfg.exact,
            perceptual=cfg.perceptual,
            max_hamming=cfg.max_hamming,
            embedding=cfg.embedding,
            min_cosine=cfg.min_cosine,
            layout=cfg.layout,
            layout_cosine=cfg.layout_cosine,
        )
        same = SameSettings(max_block_difference=cfg.max_block_difference)
        joined = records | "dedup join" >> JoinFindings(settings, scope=cfg.scope)
        kept = self._stage(joined, "dedup", partial(dedup_check, settings=same))
        _ = kept | "tally aliases" >> TallyAliases(self._rejected[-1])
        return kept

    def _scenes(self, records):
        recipe, cfg = self.recipe, self.recipe.scenes
        mix = SceneMix(k_weights=cfg.k_weights, layout_weights=cfg.layout_weights)
        settings = PlanSettings(
            mix=mix,
            scenes_per_image=cfg.scenes_per_image,
            queries_per_scene=cfg.queries_per_scene,
            hard_fraction=cfg.hard_fraction,
            hard_pool=cfg.hard_pool,
            seed=cfg.seed,
            focus=None if cfg.focus is None else cfg.focus.settings(mix),
        )
        plans = (
            records
            | "pool items" >> beam.Map(pool_item, recipe=recipe)
            | "plan scenes" >> plan_all(settings, cfg)
        )
        members = self._join_plans(records, plans, "scene_pool", "scene_pool_too_small")
        by_scene = plans | "key plans" >> beam.Map(lambda plan: (plan.scene_id, plan))
        spec = CanvasSpec(
            cell_size=cfg.cell_size,
            max_side=cfg.max_side,
            margin=cfg.margin,
            background=cfg.background,
        )
        scenes = self._stage(
            {"plan": by_scene, "members": members} | "gather scenes" >> beam.CoGroupByKey(),
            "compose",
            partial(compose_planned, spec=spec),
        )
        return scenes | "queries" >> beam.FlatMap(
            lambda composed: scene_samples(
                *composed,
                template=recipe.samples.question_template,
                recipe_hash=recipe.digest(),
                version=__version__,
            )
        )

    def _boxes(self, records):
        """The trusted box of each single-entity image: annotators, then the box checks."""
        recipe, boxes = self.recipe, self.recipe.boxes
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
        return records

    def _join_plans(self, records, plans, pool_stage: str, unused: str):
        """Route each record to the plans (scenes, crowds) that use it, joined by record key;
        count the unused ones as drops at ``pool_stage``. Yields ``(plan_id, (slot, record))``."""
        # Planning has taken what it needs of the vectors: records cross the joins without them.
        keyed = records | f"{pool_stage} key records" >> beam.Map(
            lambda r: (record_key(r), replace(r, embedding=None))
        )
        wanted = plans | f"{pool_stage} wanted members" >> beam.FlatMap(wanted_members)
        joined = {"record": keyed, "want": wanted} | f"{pool_stage} join members" >> (
            beam.CoGroupByKey()
        )
        # The stage only counts: the kept records travel on through the routing below.
        self._stage(
            joined | f"{pool_stage} claims" >> beam.FlatMap(claimed_records),
            pool_stage,
            partial(in_a_plan, reason=unused),
        )
        return joined | f"{pool_stage} route members" >> beam.FlatMap(route_members)

    def _crowds(self, records):
        """Synthetic crowds of the boxed records, one detect sample each."""
        recipe, cfg = self.recipe, self.recipe.crowd
        spec = cfg.spec()
        plans = (
            records
            | "crowd pool items" >> beam.Map(pool_item, recipe=recipe)
            | "plan crowds" >> PlanCrowds(spec, cfg.per_image, cfg.seed)
        )
        members = self._join_plans(records, plans, "crowd_pool", "not_in_a_crowd")
        by_crowd = plans | "key crowds" >> beam.Map(lambda plan: (plan.scene_id, plan))
        crowds = self._stage(
            {"plan": by_crowd, "members": members} | "gather crowds" >> beam.CoGroupByKey(),
            "compose_crowd",
            partial(compose_planned_crowd, spec=spec, label=recipe.detect.label),
        )
        return self._stage(
            crowds,
            "detect_sample",
            partial(crowd_detection_sample, recipe=recipe, recipe_hash=recipe.digest()),
        )

    def _kvg_samples(self, records):
        """KVG samples (single images or scenes) of boxed records, then teacher and student."""
        recipe = self.recipe
        if recipe.scenes is not None and recipe.scenes.enabled:
            samples = self._scenes(records)
        else:
            samples = self._stage(
                records, "sample", partial(make_sample, recipe=recipe, recipe_hash=recipe.digest())
            )
        samples = samples | "park samples" >> beam.Map(self.pixels.parked)
        if recipe.teacher is not None:
            samples = self._teach(samples)
        if recipe.student is not None:
            samples = self._examine(samples)
        return samples

    def build(self, p: beam.Pipeline) -> list[str]:
        recipe = self.recipe
        source = make_source(recipe)
        partitions = (
            p | "partitions" >> beam.Create(source.partitions()) | "spread" >> beam.Reshuffle()
        )
        if self.selection is None:
            items = partitions | "list items" >> beam.FlatMap(source.items)
        else:
            items = partitions | "select items" >> SelectItems(source, self.selection)
        records = self._stage(items, "read", read_item)
        limits = ImageLimits(min_side=recipe.images.min_side, max_pixels=recipe.images.max_pixels)
        records = self._stage(records, "image", partial(check_image, limits=limits))
        # From here on records hold a reference: pixels never cross a shuffle or a side input.
        records = records | "park pixels" >> beam.Map(self.pixels.parked)
        records = self._references(records)
        if isinstance(recipe.source, ANNOTATION_SOURCES):
            records = self._stage(records, "instances", counted_instances)
        if needs_embedding(recipe):
            records = self._embed(records)
        if recipe.decontaminate is not None:
            records = self._decontaminate(records)
        if recipe.dedup.enabled:
            records = self._dedup(records)
        if recipe.detect is not None:
            if recipe.crowd is not None:
                samples = self._crowds(self._boxes(records))
            else:
                samples = self._stage(
                    records,
                    "detect_sample",
                    partial(make_detection_sample, recipe=recipe, recipe_hash=recipe.digest()),
                )
            samples = samples | "park samples" >> beam.Map(self.pixels.parked)
            if recipe.boxes.detector is not None:
                samples = self._stage(
                    self._detect(samples, "candidates"),
                    "uncertain",
                    partial(mark_uncertain, cfg=recipe.detect),
                )
            if recipe.teacher is not None:
                samples = self._teach(samples)
        else:
            samples = self._kvg_samples(self._boxes(records))
        samples = self._stage(samples, "output", check_sample)
        _ = samples | "tally provenance" >> beam.ParDo(TallyProvenance())
        _ = samples | "tally entities" >> TallyEntities()
        _ = samples | "write shards" >> WriteShards(
            FileSystems.join(self.out_dir, SHARDS_DIR),
            recipe.output.format,
            recipe.output.rows_per_shard,
        )
        _ = (
            self._rejected
            | "all rejections" >> beam.Flatten()
            | "write rejections"
            >> WriteRejections(FileSystems.join(self.out_dir, WORK_DIR, REJECTION_PARTS))
        )
        _ = (
            self._previews
            | "all drop examples" >> beam.Flatten()
            | "write previews" >> WritePreviews(FileSystems.join(self.out_dir, PREVIEWS_FILE))
        )
        return self.stages
