"""The YAML recipe: every setting of a run, validated by pydantic.

Relative paths in a recipe are resolved against the recipe file's folder, so a recipe and its data
can move together. Errors name the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from groundforge.yamlfile import describe_errors, read_yaml

DEFAULT_QUESTION = (
    "Find and give the bounding box of <|object_ref_start|>{entity}<|object_ref_end|>"
)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageFolderSourceConfig(_Strict):
    """Images in a folder tree; the entity name comes from the file stem or its folder."""

    kind: Literal["image_folder"]
    path: str
    entity_from: Literal["stem", "parent", "none"] = "stem"
    separators: str = "_"
    case: Literal["title", "lower", "keep"] = "title"
    strip_pattern: str | None = None
    rename: dict[str, str] = {}
    exclude: list[str] = []
    license: str = ""
    author: str = ""
    # A symlink that leads out of `path` is refused (`outside_source`) unless this is set.
    follow_outside_links: bool = False


class HFDatasetSourceConfig(_Strict):
    """A Hugging Face dataset: a folder saved with ``save_to_disk``, data files, or a hub name."""

    kind: Literal["hf_dataset"]
    path: str
    split: str = "train"
    name: str | None = None
    image_column: str = "image"
    entity_column: str | None = None
    domain_column: str | None = None
    box_column: str | None = None
    box_format: Literal["xyxy", "xywh"] = "xyxy"
    box_scale: Literal["pixel", "norm01"] = "pixel"
    id_column: str | None = None
    license: str = ""


class CocoSourceConfig(_Strict):
    """A COCO instances JSON file and the folder holding its images; ``categories`` names the
    categories to keep (all when left out). ``iscrowd`` annotations become ignore regions."""

    kind: Literal["coco"]
    annotations: str
    images: str
    categories: list[str] | None = Field(None, min_length=1)
    license: str = ""


class OdgtSourceConfig(_Strict):
    """A CrowdHuman ``.odgt`` file (one JSON object per line) and the folder of ``<ID>.jpg``
    images; ``box`` picks the ground truth (``fbox``, ``vbox`` or ``hbox``) and ``tag`` the
    annotations read (``mask`` regions are always read, as ignore regions)."""

    kind: Literal["odgt"]
    annotations: str
    images: str
    box: Literal["full", "visible", "head"] = "full"
    tag: str = Field("person", min_length=1)
    license: str = ""


ANNOTATION_SOURCES = (CocoSourceConfig, OdgtSourceConfig)

SourceConfig = Annotated[
    ImageFolderSourceConfig | HFDatasetSourceConfig | CocoSourceConfig | OdgtSourceConfig,
    Field(discriminator="kind"),
]


class PriceConfig(_Strict):
    """What a model's calls cost: ``prompt_per_1k`` and ``completion_per_1k`` (per 1000 tokens
    of the requests actually sent; cached replies cost nothing), or ``gpu_hour`` (per hour of the
    model's busy time)."""

    prompt_per_1k: float | None = Field(None, ge=0)
    completion_per_1k: float | None = Field(None, ge=0)
    gpu_hour: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_way(self) -> PriceConfig:
        tokens = (self.prompt_per_1k, self.completion_per_1k)
        if self.gpu_hour is not None:
            if any(t is not None for t in tokens):
                raise ValueError(
                    "price: give either gpu_hour or prompt_per_1k and completion_per_1k, not both"
                )
        elif None in tokens:
            raise ValueError(
                "price: give prompt_per_1k and completion_per_1k (per 1000 tokens), or gpu_hour "
                "(per hour of model time)"
            )
        return self

    @property
    def per_token(self) -> bool:
        return self.gpu_hour is None

    def cost(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> float:
        """The price of this many tokens (token prices) or busy seconds (``gpu_hour``)."""
        if self.gpu_hour is not None:
            return seconds / 3600 * self.gpu_hour
        return (
            prompt_tokens / 1000 * self.prompt_per_1k
            + completion_tokens / 1000 * self.completion_per_1k
        )


def _hourly_only(price: PriceConfig | None, section: str) -> None:
    if price is not None and price.per_token:
        raise ValueError(
            f"{section}.price: this model reads images and writes no tokens; give gpu_hour"
        )


class BudgetConfig(_Strict):
    """A run's limit on chat requests (grounder, teacher, student): once any limit is reached no
    new request is sent and the items still waiting are dropped as ``<role>_over_budget``.
    ``max_cost`` counts the models with token prices; ``max_tokens`` prompt plus completion
    tokens; ``max_requests`` requests sent (cached replies count for none of them)."""

    max_cost: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_requests: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.max_cost is None and self.max_tokens is None and self.max_requests is None:
            raise ValueError("budget: give at least one of max_cost, max_tokens, max_requests")
        return self

    def limits(self):
        """The limits as the request ledger takes them."""
        from groundforge.annotators.teacher.budget import BudgetLimits

        return BudgetLimits(self.max_cost, self.max_tokens, self.max_requests)


class ImagesConfig(_Strict):
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(64_000_000, ge=1)


class DetectorConfig(_Strict):
    """Grounding DINO: a hub id or a local folder; one joint prompt of the domain's labels."""

    model: str
    labels: dict[str, list[str]] = {}
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    batch_size: int = Field(8, ge=1)
    num_threads: int | None = Field(None, ge=1)
    shortest_edge: int | None = Field(None, ge=32)
    longest_edge: int | None = Field(None, ge=32)
    price: PriceConfig | None = None

    @model_validator(mode="after")
    def _price_hourly(self) -> DetectorConfig:
        _hourly_only(self.price, "boxes.detector")
        return self


class BoxesConfig(_Strict):
    """How the one box of a single-entity image is found and checked.

    A box known from the source always wins. Otherwise ``method`` proposes it; when
    ``agree_with`` names a second method, both must agree at ``agreement_iou``.
    """

    method: Literal["foreground", "detector"] = "foreground"
    agree_with: Literal["foreground", "detector"] | None = None
    agreement_iou: float = Field(0.5, ge=0, le=1)
    detector: DetectorConfig | None = None
    foreground_tolerance: int = Field(12, ge=0, le=255)
    foreground_background: Literal["border", "white"] = "border"
    confident_score: float = Field(0.35, ge=0, le=1)
    require_single: bool = True
    min_area_fraction: float = Field(0.005, ge=0, le=1)
    max_area_fraction: float = Field(1.0, ge=0, le=1)
    max_aspect: float = Field(20.0, ge=1)

    @model_validator(mode="after")
    def _detector_given(self) -> BoxesConfig:
        uses = {self.method, self.agree_with}
        if "detector" in uses and self.detector is None:
            raise ValueError(
                "boxes.detector (at least `model:`) is required when a method is 'detector'"
            )
        if self.agree_with == self.method:
            raise ValueError("boxes.agree_with must name a method other than boxes.method")
        if self.min_area_fraction > self.max_area_fraction:
            raise ValueError("boxes.min_area_fraction is larger than boxes.max_area_fraction")
        return self


CodecName = Literal["pixel", "norm1000", "qwen25vl", "qwen3vl", "norm01"]


class ChatModelConfig(_Strict):
    """A multimodal chat model: an OpenAI-compatible endpoint (``base_url``: vLLM,
    ``transformers serve``, a hosted API), or, without ``base_url``, ``model`` run in this process.

    ``codec`` is the box frame the model reads and writes; ``codec_params`` its settings (for
    ``qwen25vl`` the ``max_pixels`` the serving processor uses). ``api_key_env`` names the
    environment variable holding the key; the key itself never goes in a recipe. ``price``
    makes the run's manifest say what its requests cost.
    """

    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    codec: CodecName = "qwen25vl"
    codec_params: dict[str, int | float | bool] = {}
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)
    seed: int | None = 0
    max_concurrency: int = Field(16, ge=1)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff: float = Field(1.0, ge=0)
    max_backoff: float = Field(60.0, ge=0)
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    cache_dir: str | None = None
    price: PriceConfig | None = None


class RationaleConfig(_Strict):
    """The checks a teacher rationale must pass (``filters/rationale.py``; for ``detect``
    recipes ``filters/detect_rationale.py``: precision and recall of the stated boxes, and a
    look step that covers an uncertain region when there is one)."""

    min_iou: float = Field(0.5, ge=0, le=1)
    min_chars: int = Field(40, ge=0)
    max_chars: int = Field(6000, ge=1)
    leak_phrases: list[str] | None = None
    require_target: bool = True
    min_precision: float = Field(0.8, ge=0, le=1)
    min_recall: float = Field(0.8, ge=0, le=1)
    require_look_uncertain: bool = True

    def _leaks(self) -> dict:
        return {} if self.leak_phrases is None else {"leak_phrases": tuple(self.leak_phrases)}

    def kvg_rules(self):
        """The rules of ``filters/rationale.py`` these settings give."""
        from groundforge.filters.rationale import RationaleRules

        return RationaleRules(
            min_iou=self.min_iou,
            min_chars=self.min_chars,
            max_chars=self.max_chars,
            require_target=self.require_target,
            **self._leaks(),
        )

    def detection_rules(self):
        """The rules of ``filters/detect_rationale.py`` these settings give."""
        from groundforge.filters.detect_rationale import DetectionRules

        return DetectionRules(
            min_precision=self.min_precision,
            min_recall=self.min_recall,
            min_chars=self.min_chars,
            max_chars=self.max_chars,
            require_look_uncertain=self.require_look_uncertain,
            **self._leaks(),
        )


class TeacherConfig(ChatModelConfig):
    """The teacher that writes knowledge-grounded rationales for each sample."""

    # None: kvg_rationale, or detect_rationale in a detect recipe.
    prompt: str | None = None
    system: str | None = None
    knowledge: str | None = None
    rationale: RationaleConfig = RationaleConfig()


class GrounderConfig(ChatModelConfig):
    """An MLLM asked for the entity's box on single-entity images; it must agree with the
    detector (``consistency_iou``) before a box is trusted."""

    prompt: str = "grounding"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(128, ge=1)
    consistency_iou: float = Field(0.5, ge=0, le=1)


class StudentConfig(ChatModelConfig):
    """The model being trained, sampled ``k`` times per sample: its pass rate splits the corpus
    (all right: sft; some right: grpo; none right: ``none_correct``)."""

    k: int = Field(4, ge=1)
    correct_iou: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    reasoning_suffix: str | None = None
    none_correct: Literal["sft", "drop"] = "sft"

    @model_validator(mode="after")
    def _k_samples_can_differ(self) -> StudentConfig:
        # Greedy decoding ignores the seed: k > 1 greedy answers are one answer k times, so
        # every item would be 0/k or k/k and the grpo split would stay empty.
        if self.k > 1 and self.temperature == 0:
            raise ValueError(
                f"temperature 0 (greedy) gives {self.k} identical answers per item; set "
                "temperature > 0 (default 1.0) for pass@k, or k: 1"
            )
        return self


class EmbedConfig(_Strict):
    """The image embedder used for near-duplicates, decontamination and look-alike choice:
    ``color_histogram`` (no model) or a CLIP/SigLIP model id or folder."""

    image: str = "color_histogram"
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    price: PriceConfig | None = None

    @model_validator(mode="after")
    def _price_hourly(self) -> EmbedConfig:
        _hourly_only(self.price, "embed")
        return self


class DedupConfig(_Strict):
    """Duplicates across the whole run; the first in sorted source order is kept.

    Candidates come from pHashes within ``max_hamming`` bits, colour layouts at cosine
    ``layout_cosine`` or more, and (``embedding: true``) embeddings at ``min_cosine``; each is
    then verified by comparing the two images (``max_block_difference``: the largest mean
    difference of a 4x4 block of the aligned 64x64 views). ``scope: entity`` compares
    near-duplicates only among images of the same entity (exact copies are found everywhere).
    """

    enabled: bool = True
    scope: Literal["entity", "all"] = "all"
    exact: bool = True
    perceptual: bool = True
    max_hamming: int = Field(4, ge=0, le=64)
    layout: bool = True
    layout_cosine: float = Field(0.9, ge=-1, le=1)
    embedding: bool = False
    min_cosine: float = Field(0.97, ge=-1, le=1)
    max_block_difference: float = Field(16.0, gt=0)


class DecontaminateConfig(_Strict):
    """Benchmark images (KVG-Bench-format parquet files or image folders) kept out of the data.

    Like dedup, hashes (``max_hamming``), colour layouts (``layout_cosine``) and embeddings
    (``use_embedding``, ``min_cosine``) propose benchmark images, and the pixels decide
    (``max_block_difference``).
    """

    benchmarks: list[str]
    max_hamming: int = Field(6, ge=0, le=64)
    layout_cosine: float = Field(0.9, ge=-1, le=1)
    min_cosine: float = Field(0.95, ge=-1, le=1)
    use_embedding: bool = False
    max_block_difference: float = Field(16.0, gt=0)


# A canvas colour: "auto" (chosen per scene so that every member's outline shows) or RGB.
_Channel = Annotated[int, Field(ge=0, le=255)]
Background = Literal["auto"] | tuple[_Channel, _Channel, _Channel]


class FocusConfig(_Strict):
    """Extra scenes for the entities a student fails (``groundforge refine`` writes it).

    Each entity in ``entities`` is the target, and the only query, of that many scenes more than
    the pool's usual ones, spread over its images. With probability ``hard_fraction`` their
    other members are the entities in ``distractors`` (what the student took it for) and then
    its nearest look-alikes, else random ones. ``k_weights`` and ``layout_weights`` (default:
    the scenes section's) weight their sizes and layouts; ``seed`` seeds them.
    """

    entities: dict[str, Annotated[int, Field(ge=0)]]
    distractors: dict[str, list[str]] = {}
    hard_fraction: float = Field(1.0, ge=0, le=1)
    k_weights: dict[int, float] | None = None
    layout_weights: dict[str, float] | None = None
    seed: str = "focus"

    @model_validator(mode="after")
    def _valid_mix(self) -> FocusConfig:
        self.settings()  # SceneMix checks the weights and says which one is wrong
        return self

    def settings(self, mix=None):
        """The :class:`~groundforge.scenes.focus.Focus` of these settings; ``mix`` is the
        scenes section's :class:`~groundforge.scenes.sampling.SceneMix`, for weights left out."""
        from groundforge.scenes.focus import Focus
        from groundforge.scenes.sampling import SceneMix

        own = None
        if self.k_weights is not None or self.layout_weights is not None:
            base = mix or SceneMix()
            own = SceneMix(
                k_weights=base.k_weights if self.k_weights is None else self.k_weights,
                layout_weights=(
                    base.layout_weights if self.layout_weights is None else self.layout_weights
                ),
            )
        return Focus(
            scenes=self.entities,
            distractors=self.distractors,
            hard_fraction=self.hard_fraction,
            mix=own,
            seed=self.seed,
        )


class ScenesConfig(_Strict):
    """Composite scenes of k look-alike entities of one domain (and one split).

    Each image is the target of ``scenes_per_image`` scenes; the other k-1 entities are its
    nearest look-alikes (``hard``, with probability ``hard_fraction``) or random ones (``easy``).
    ``queries_per_scene`` members of each scene (the target first) become samples.
    """

    enabled: bool = True
    k_weights: dict[int, float] = {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    layout_weights: dict[str, float] = {
        "horizontal": 1.0,
        "vertical": 1.0,
        "grid": 1.0,
        "random": 1.0,
    }
    scenes_per_image: int = Field(1, ge=1)
    queries_per_scene: int = Field(1, ge=1)
    hard_fraction: float = Field(1.0, ge=0, le=1)
    hard_pool: int | None = Field(None, ge=1)
    similarity: Literal["image", "text"] = "image"
    text_model: str | None = None
    cell_size: int = Field(336, ge=16)
    max_side: int = Field(1344, ge=64)
    margin: int = Field(8, ge=0)
    background: Background = "auto"
    seed: str = "groundforge"
    focus: FocusConfig | None = None

    @model_validator(mode="after")
    def _known(self) -> ScenesConfig:
        if any(k < 2 for k in self.k_weights) or not any(self.k_weights.values()):
            raise ValueError("scenes.k_weights: every k must be at least 2, and a weight > 0")
        unknown = set(self.layout_weights) - {"horizontal", "vertical", "grid", "random"}
        if unknown:
            raise ValueError(
                f"scenes.layout_weights: unknown layouts {sorted(unknown)}; "
                "use horizontal, vertical, grid, random"
            )
        return self


class SamplesConfig(_Strict):
    question_template: str = DEFAULT_QUESTION

    @model_validator(mode="after")
    def _has_entity_slot(self) -> SamplesConfig:
        if "{entity}" not in self.question_template:
            raise ValueError("samples.question_template must contain {entity}")
        return self


class CrowdConfig(_Strict):
    """Synthetic crowds for ``detect`` recipes: single-entity images (their trusted boxes cut
    out) pasted many to a canvas with a controlled overlap, so some are partly hidden.

    Per domain and split, ``per_image`` x images crowds are made; each holds ``count`` instances
    (repeating images when there are fewer), whose long side is ``scale`` of the canvas's, with a
    mean covered fraction near ``overlap``; instances less visible than ``min_visible`` become
    ignore regions.
    """

    width: int = Field(640, ge=32)
    height: int = Field(480, ge=32)
    count: tuple[int, int] = (8, 20)
    scale: tuple[float, float] = (0.15, 0.35)
    overlap: float = Field(0.3, ge=0, lt=1)
    min_visible: float = Field(0.1, ge=0, le=1)
    background: Background = "auto"
    per_image: float = Field(0.5, gt=0)
    seed: str = "groundforge"

    def spec(self):
        from groundforge.scenes.crowd import CrowdSpec

        return CrowdSpec(
            width=self.width,
            height=self.height,
            count=self.count,
            scale=self.scale,
            overlap=self.overlap,
            background=self.background,
            min_visible=self.min_visible,
        )

    @model_validator(mode="after")
    def _valid_spec(self) -> CrowdConfig:
        self.spec()  # CrowdSpec checks the ranges and says which one is wrong
        return self


DEFAULT_DETECT_QUESTION = "Find every {label} in the image and give their bounding boxes."


class DetectConfig(_Strict):
    """``task: detect`` samples: every instance of ``label`` in an image (crowd detection)."""

    label: str = Field(min_length=1)
    question_template: str = DEFAULT_DETECT_QUESTION
    # Smaller instances are too small to ask for: they become ignore regions.
    min_box_side: float = Field(8.0, ge=0)
    # Images with more instances give answers too long to train on; they are dropped.
    max_instances: int = Field(100, ge=1)
    # Uncertain regions: truths less visible than this share of their full box are `occluded`;
    # with boxes.detector set, the detector's candidates (score >= uncertain_min_score) matched
    # to the truths mark `missed` (no match at uncertain_match_iou), `weak` (IoU below
    # uncertain_weak_iou) and `false_positive` (a candidate matching no truth) regions.
    occluded_below: float = Field(0.5, ge=0, le=1)
    uncertain_min_score: float = Field(0.3, ge=0, le=1)
    uncertain_match_iou: float = Field(0.5, gt=0, le=1)
    uncertain_weak_iou: float = Field(0.7, gt=0, le=1)

    @model_validator(mode="after")
    def _has_label_slot(self) -> DetectConfig:
        if "{label}" not in self.question_template:
            raise ValueError("detect.question_template must contain {label}")
        return self


class SplitConfig(_Strict):
    """Held-out entities: a stable hash of the entity name sends ``val_fraction`` of them to val;
    every entity of a domain in ``val_domains`` is held out too (unseen-domain evaluation)."""

    val_fraction: float = Field(0.0, ge=0, lt=1)
    val_domains: list[str] = []
    seed: str = "groundforge"

    def split_of(self, key: str, domain: str) -> str:
        """The split of ``key`` (an entity name, or an image id where every image shows the same
        class) in ``domain``."""
        from groundforge.filters.split import entity_split

        return entity_split(key, domain, self.val_fraction, self.seed, self.val_domains)


class OutputConfig(_Strict):
    format: Literal["arrow", "parquet"] = "arrow"
    rows_per_shard: int = Field(1000, ge=1)


class Recipe(_Strict):
    """A whole run: where images come from, how boxes are found, and what is written."""

    name: str
    domain: str
    description: str = ""
    source: SourceConfig
    images: ImagesConfig = ImagesConfig()
    boxes: BoxesConfig = BoxesConfig()
    samples: SamplesConfig = SamplesConfig()
    embed: EmbedConfig = EmbedConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig | None = None
    scenes: ScenesConfig | None = None
    detect: DetectConfig | None = None
    crowd: CrowdConfig | None = None
    grounder: GrounderConfig | None = None
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    split: SplitConfig = SplitConfig()
    output: OutputConfig = OutputConfig()
    budget: BudgetConfig | None = None

    @model_validator(mode="after")
    def _cost_needs_prices(self) -> Recipe:
        if self.budget is None or self.budget.max_cost is None:
            return self
        chat = [getattr(self, role) for role in ("grounder", "teacher", "student")]
        if not any(cfg is not None and cfg.price and cfg.price.per_token for cfg in chat):
            raise ValueError(
                "budget.max_cost counts the cost of chat models with token prices, and no "
                "grounder, teacher or student has `price: {prompt_per_1k: ..., "
                "completion_per_1k: ...}`; add one, or use max_tokens or max_requests"
            )
        return self

    @model_validator(mode="after")
    def _detect_alone(self) -> Recipe:
        if self.crowd is not None and self.detect is None:
            raise ValueError("crowd: synthetic crowds make detect samples; add a detect section")
        if self.detect is None:
            return self
        clash = [
            name
            for name in ("scenes", "grounder", "student")
            if getattr(self, name) is not None and (name != "scenes" or getattr(self, name).enabled)
        ]
        if clash:
            raise ValueError(
                f"detect: detection samples come from annotated instances and cannot be combined "
                f"with {', '.join(clash)} (KVG sections); remove them or the detect section"
            )
        return self

    @model_validator(mode="after")
    def _grounder_needs_detector(self) -> Recipe:
        if self.grounder is not None and self.boxes.method != "detector":
            raise ValueError(
                "grounder: the grounder's box is checked against the detector's candidates, so "
                "boxes.method must be 'detector'"
            )
        return self

    def digest(self) -> str:
        """A short hash of every setting that shapes the data (stored with each sample as
        ``recipe_hash``): prices and the budget are left out, so a rerun with a larger budget
        makes the same samples."""
        blob = json.dumps(
            _without_price(self.model_dump(mode="json", exclude={"budget"})), sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _without_price(value):
    if isinstance(value, dict):
        return {k: _without_price(v) for k, v in value.items() if k != "price"}
    return value


def with_budget(recipe: Recipe, limits: list[str] | tuple[str, ...]) -> Recipe:
    """``recipe`` with its budget's limits replaced by ``NAME=VALUE`` items (``--budget``)."""
    given = dict(recipe.budget.model_dump(exclude_none=True)) if recipe.budget else {}
    for item in limits:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise RecipeError(
                f"--budget {item!r}: write NAME=VALUE, e.g. max_requests=40 (names: "
                "max_cost, max_tokens, max_requests)"
            )
        given[name.strip()] = value.strip()
    data = recipe.model_dump(mode="json")
    data["budget"] = given
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"--budget: {describe_errors(err)}") from None


def _local(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _is_uri(value: str) -> bool:
    """A location with a scheme (``gs://``, ``s3://``, ``https://``): never a local path."""
    return "://" in value


def _resolved(value: str, base: Path) -> str:
    """A local path made absolute against the recipe's folder; a URI as written."""
    return value if _is_uri(value) else str(_local(value, base).resolve())


def _resolve_model_section(section: dict, base: Path) -> dict:
    section = dict(section)
    model = section.get("model")
    if isinstance(model, str) and not _is_uri(model) and _local(model, base).exists():
        section["model"] = _resolved(model, base)
    for key in ("knowledge", "cache_dir"):
        if isinstance(section.get(key), str):
            section[key] = _resolved(section[key], base)
    prompt = section.get("prompt")
    # A prompt is a built-in template name unless it looks like a file.
    if isinstance(prompt, str) and ("/" in prompt or Path(prompt).suffix):
        section["prompt"] = _resolved(prompt, base)
    return section


def _resolve_paths(data: dict, base: Path) -> dict:
    data = dict(data)
    source = data.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        path = source["path"]
        # A hub name ("org/name") has no local folder: keep it as written.
        if _is_uri(path) or _local(path, base).exists() or source.get("kind") == "image_folder":
            data["source"] = {**source, "path": _resolved(path, base)}
    if isinstance(source, dict) and source.get("kind") in ("coco", "odgt"):
        data["source"] = {
            **source,
            **{
                key: _resolved(source[key], base)
                for key in ("annotations", "images")
                if isinstance(source.get(key), str)
            },
        }
    boxes = data.get("boxes")
    if isinstance(boxes, dict) and isinstance(boxes.get("detector"), dict):
        data["boxes"] = {**boxes, "detector": _resolve_model_section(boxes["detector"], base)}
    for name in ("grounder", "teacher", "student"):
        if isinstance(data.get(name), dict):
            data[name] = _resolve_model_section(data[name], base)
    embed = data.get("embed")
    if isinstance(embed, dict) and isinstance(embed.get("image"), str):
        local = _local(embed["image"], base)
        if local.exists():
            data["embed"] = {**embed, "image": str(local.resolve())}
    scenes = data.get("scenes")
    if isinstance(scenes, dict) and isinstance(scenes.get("text_model"), str):
        local = _local(scenes["text_model"], base)
        if local.exists():
            data["scenes"] = {**scenes, "text_model": str(local.resolve())}
    decon = data.get("decontaminate")
    if isinstance(decon, dict) and isinstance(decon.get("benchmarks"), list):
        paths = [_resolved(p, base) if isinstance(p, str) else p for p in decon["benchmarks"]]
        data["decontaminate"] = {**decon, "benchmarks": paths}
    return data


def parse_recipe(data: dict, base: Path, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict; relative paths resolve against ``base``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(_resolve_paths(data, base))
    except ValidationError as err:
        raise RecipeError(f"{origin}: invalid recipe\n{describe_errors(err)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    data = read_yaml(path, RecipeError, "recipe")
    return parse_recipe(data, path.parent, str(path))
