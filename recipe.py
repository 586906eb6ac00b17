"""The YAML recipe: every setting of a run, validated by pydantic.

Relative paths in a recipe are resolved against the recipe file's folder, so a recipe and its data
can move together. Errors name the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


SourceConfig = Annotated[
    ImageFolderSourceConfig | HFDatasetSourceConfig, Field(discriminator="kind")
]


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


class SamplesConfig(_Strict):
    question_template: str = DEFAULT_QUESTION

    @model_validator(mode="after")
    def _has_entity_slot(self) -> SamplesConfig:
        if "{entity}" not in self.question_template:
            raise ValueError("samples.question_template must contain {entity}")
        return self


class SplitConfig(_Strict):
    """Held-out entities: a stable hash of the entity name sends ``val_fraction`` of them to val."""

    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: str = "groundforge"


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
    split: SplitConfig = SplitConfig()
    output: OutputConfig = OutputConfig()

    def digest(self) -> str:
        """A short hash of every setting (stored with each sample as ``recipe_hash``)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resolve_paths(data: dict, base: Path) -> dict:
    source = data.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        p = Path(source["path"]).expanduser()
        # A hub name ("org/name") has no local folder: keep it as written.
        local = p if p.is_absolute() else base / p
        if p.is_absolute() or local.exists() or source.get("kind") == "image_folder":
            source = {**source, "path": str(local.resolve())}
            data = {**data, "source": source}
    boxes = data.get("boxes")
    detector = boxes.get("detector") if isinstance(boxes, dict) else None
    if isinstance(detector, dict) and isinstance(detector.get("model"), str):
        local = base / Path(detector["model"]).expanduser()
        if local.exists():
            data = {**data, "boxes": {**boxes, "detector": {**detector, "model": str(local)}}}
    return data


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_recipe(data: dict, base: Path, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict; relative paths resolve against ``base``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(_resolve_paths(data, base))
    except ValidationError as err:
        raise RecipeError(f"{origin}: invalid recipe\n{_describe(err)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    return parse_recipe(data, path.parent, str(path))
