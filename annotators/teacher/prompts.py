"""Prompt templates for the teacher (rationales) and the grounder (single-entity boxes).

Templates are Jinja2 with ``StrictUndefined`` (a misspelt variable fails loudly instead of
vanishing from the prompt), no autoescaping (prompts are not HTML) and ``trim_blocks``. The
built-in ones live in ``prompts/*.j2`` next to this module; a recipe may name a file instead.
A template's :attr:`PromptTemplate.hash` (sha256 of its source) goes into the teacher cache key,
so editing a template re-asks the teacher rather than serving stale answers.

Variables of ``kvg_rationale``: ``domain``, ``question``, ``width``, ``height``, ``codec_name``,
``codec_hint``, ``entities`` (list of ``{index, name, box, known}``; ``known`` is False for an
entity without a name, whose ``name`` is then ``unknown object N``), ``target`` (``{name, box}``)
and ``knowledge`` (list of ``{name, description, attributes}``, empty when none is given).
Variables of ``detect_rationale``: ``domain``, ``label`` (the class), ``question``, ``width``,
``height``, ``codec_name``, ``codec_hint``, ``boxes`` (list of ``{index, box}``, every truth),
``uncertain`` (list of ``{index, box, reason}``, ``reason`` one of ``missed``, ``weak``,
``occluded``, ``false_positive``), ``ignore_regions`` (list of boxes) and ``answer`` (every truth
as the answer is written: one list, each box labelled with the class).
Variables of ``grounding``: ``entity``, ``domain``, ``codec_name``, ``codec_hint``.
A codec's hint (:func:`codec_hint`, all of them in :data:`CODEC_HINTS`) describes its box format
in words.
Boxes are the codec's own text (:meth:`BoxCodec.render`, unlabelled).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from groundforge.annotators.teacher.knowledge import Knowledge, KnowledgeEntry
from groundforge.schemas.codecs import BoxCodec
from groundforge.schemas.records import KVGSample

BUILTIN_TEMPLATES = ("kvg_rationale", "detect_rationale", "grounding")

# How each codec writes a box, in words the model can follow. ``{extent}`` is filled with the
# frame's size in pixels when the image size is known (pixel frames only).
CODEC_HINTS = {
    "pixel": (
        "a JSON list [x1, y1, x2, y2] of integer pixel coordinates of the top-left and "
        "bottom-right corners{extent}"
    ),
    "norm1000": (
        "<|box_start|>(x1,y1),(x2,y2)<|box_end|> with the top-left and bottom-right corners as "
        "integers from 0 to 1000, relative to the image width and height"
    ),
    "norm1000_plain": (
        "(x1,y1),(x2,y2) with the top-left and bottom-right corners as integers from 0 to 1000, "
        "relative to the image width and height"
    ),
    "qwen25vl": (
        'JSON [{{"bbox_2d": [x1, y1, x2, y2], "label": "name"}}] with the top-left and '
        "bottom-right corners in absolute pixel coordinates of the image as you see it{extent}"
    ),
    "qwen3vl": (
        'JSON [{{"bbox_2d": [x1, y1, x2, y2], "label": "name"}}] with the top-left and '
        "bottom-right corners as integers from 0 to 1000, relative to the image width and height"
    ),
    "norm01": (
        "a JSON list [x1, y1, x2, y2] with the top-left and bottom-right corners as fractions "
        "of the image width and height between 0 and 1, three decimals"
    ),
}

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)


class PromptTemplateError(ValueError):
    """A template that cannot be found or compiled; the message names it and the line."""


@dataclass(frozen=True)
class PromptTemplate:
    """A compiled template, its name (built-in name or file path) and the sha256 of its source.

    >>> t = PromptTemplate("hello", "Find {{ entity }}.")
    >>> t.render(entity="the Boeing 757")
    'Find the Boeing 757.'
    >>> t.hash == hashlib.sha256(b"Find {{ entity }}.").hexdigest()
    True
    """

    name: str
    source: str
    hash: str = field(init=False)
    _template: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", hashlib.sha256(self.source.encode("utf-8")).hexdigest())
        try:
            compiled = _ENV.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptTemplateError(
                f"prompt template {self.name}, line {exc.lineno}: {exc.message}"
            ) from exc
        object.__setattr__(self, "_template", compiled)

    def render(self, **variables: Any) -> str:
        """The prompt text; a variable the template uses but ``variables`` lacks raises."""
        return self._template.render(**variables)

    def __reduce__(self):
        # Compiled Jinja templates do not pickle; Beam ships stages to workers by pickling,
        # so a template travels as its name and source and compiles again on arrival.
        return (PromptTemplate, (self.name, self.source))


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A built-in template by name (:data:`BUILTIN_TEMPLATES`), or the template in a file.

    A bare built-in name always means the built-in, even if a file of that name exists.

    >>> load_template("grounding").name
    'grounding'
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_TEMPLATES:
        resource = resources.files(__package__) / "prompts" / f"{name_or_path}.j2"
        return PromptTemplate(name_or_path, resource.read_text(encoding="utf-8"))
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import read_text

    path = str(name_or_path)
    if not FileSystems.exists(path) or (Path(path).is_dir() and "://" not in path):
        raise PromptTemplateError(
            f"prompt template {str(name_or_path)!r} is neither a built-in "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    try:
        source = read_text(path)
    except Exception as exc:
        raise PromptTemplateError(f"prompt template {path}: cannot read: {exc}") from exc
    return PromptTemplate(path, source)


def codec_hint(codec: BoxCodec, width: int | None = None, height: int | None = None) -> str:
    """How ``codec`` writes a box, in words; pixel frames state their size when it is known.

    >>> from groundforge.schemas.codecs import get_codec
    >>> codec_hint(get_codec("pixel"), 640, 480)
    'a JSON list [x1, y1, x2, y2] of integer pixel coordinates of the top-left and \
bottom-right corners, in an image of 640 x 480 pixels'
    """
    key = codec.name
    if key == "norm1000" and not getattr(codec, "tokens", True):
        key = "norm1000_plain"
    if key not in CODEC_HINTS:
        raise ValueError(f"no prompt hint for box codec {codec.name!r}; add one to CODEC_HINTS")
    extent = ""
    if width is not None and height is not None:
        frame_w, frame_h = codec.frame(width, height)
        extent = f", in an image of {frame_w:g} x {frame_h:g} pixels"
    return CODEC_HINTS[key].format(extent=extent)


def rationale_prompt(
    sample: KVGSample,
    codec: BoxCodec,
    template: PromptTemplate,
    knowledge: Mapping[str, KnowledgeEntry] | None = None,
) -> str:
    """The teacher prompt asking for the rationale that finds ``sample.target`` in the scene.

    Every entity is listed with its box; an entity without a name becomes ``unknown object N``
    (N counts the unnamed ones from 1) and gets no knowledge. The target's box is
    ``sample.gt_boxes[0]``.
    """
    if not sample.target.strip():
        raise ValueError(f"sample {sample.sample_id}: a rationale needs a named target")
    if not sample.gt_boxes:
        raise ValueError(f"sample {sample.sample_id}: a rationale needs the target's box")
    width, height = sample.width, sample.height
    if knowledge is not None and not isinstance(knowledge, Knowledge):
        knowledge = Knowledge(knowledge)
    entities, snippets, unknown = [], {}, 0
    for index, entity in enumerate(sample.entities, start=1):
        name = entity.name.strip()
        known = bool(name)
        if not known:
            unknown += 1
            name = f"unknown object {unknown}"
        elif knowledge is not None and name not in snippets:
            entry = knowledge.get(name)
            if entry is not None and not entry.is_empty:
                snippets[name] = {
                    "name": name,
                    "description": entry.description,
                    "attributes": entry.attributes,
                }
        box = codec.render(entity.box, width, height)
        entities.append({"index": index, "name": name, "box": box, "known": known})
    return template.render(
        domain=sample.domain,
        question=sample.question,
        width=width,
        height=height,
        codec_name=codec.name,
        codec_hint=codec_hint(codec, width, height),
        entities=entities,
        target={
            "name": sample.target.strip(),
            "box": codec.render(sample.gt_boxes[0], width, height),
        },
        knowledge=list(snippets.values()),
    )


def detection_rationale_prompt(sample: KVGSample, codec: BoxCodec, template: PromptTemplate) -> str:
    """The teacher prompt asking for the think / look / answer rationale that finds every
    instance of a ``detect`` sample's class (``sample.target``): every truth, the uncertain
    regions with their reasons and the ignore regions, each rendered with ``codec``.

    >>> from groundforge.schemas.box import Box
    >>> from groundforge.schemas.codecs import get_codec
    >>> from groundforge.schemas.records import Provenance, UncertainRegion
    >>> sample = KVGSample("s", b"", 640, 480, "person", "detect", "Find every person.",
    ...                    "person", (), (Box(64, 48, 128, 240),), "sft", Provenance(),
    ...                    uncertain_regions=(UncertainRegion(Box(64, 48, 128, 240), "weak"),))
    >>> prompt = detection_rationale_prompt(sample, get_codec("pixel"),
    ...                                     load_template("detect_rationale"))
    >>> "- [64, 48, 128, 240]: hard to outline" in prompt
    True
    """
    label = sample.target.strip()
    if not label:
        raise ValueError(f"sample {sample.sample_id}: a detection rationale needs the class name")
    width, height = sample.width, sample.height
    return template.render(
        domain=sample.domain,
        label=label,
        question=sample.question,
        width=width,
        height=height,
        codec_name=codec.name,
        codec_hint=codec_hint(codec, width, height),
        boxes=[
            {"index": index, "box": codec.render(box, width, height)}
            for index, box in enumerate(sample.gt_boxes, start=1)
        ],
        uncertain=[
            {
                "index": index,
                "box": codec.render(region.box, width, height),
                "reason": region.reason,
            }
            for index, region in enumerate(sample.uncertain_regions, start=1)
        ],
        ignore_regions=[codec.render(box, width, height) for box in sample.ignore_regions],
        answer=codec.render_many(sample.gt_boxes, width, height, [label] * len(sample.gt_boxes)),
    )


def grounding_prompt(
    entity: str,
    domain: str,
    codec: BoxCodec,
    template: PromptTemplate,
    width: int | None = None,
    height: int | None = None,
) -> str:
    """The grounder prompt asking for the box of ``entity`` in a ``domain`` image.

    Given the image size, a pixel-frame codec's hint states the frame's size in pixels.

    >>> from groundforge.schemas.codecs import get_codec
    >>> grounding_prompt("Chad", "flag", get_codec("norm1000"), load_template("grounding"))
    'Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>'
    """
    return template.render(
        entity=entity.strip(),
        domain=domain,
        codec_name=codec.name,
        codec_hint=codec_hint(codec, width, height),
    )
