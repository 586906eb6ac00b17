"""Checks on a teacher rationale before it becomes a CoT-SFT target.

The papers describe no rationale filter; these rules are ours (data engine step 5). A rationale
is ``<think>reasoning</think><answer>box</answer>``. :func:`check_rationale` drops with the first
failing reason, in this order (cheap and structural first, so the reason names the root cause):

1. ``rationale_format``: not one ``<think>`` block then one ``<answer>`` block with only whitespace
   around them, or an empty think block (a text cut short lacks the closing tags and fails here);
2. ``rationale_too_short`` / ``rationale_too_long``: the think text's length out of bounds;
3. ``rationale_leak``: a phrase admitting the answer was given (metrics: ``phrase``, ``part``);
4. ``rationale_no_target``: the target's name is missing from the think text;
5. ``rationale_no_box``: the answer holds no box the codec can read;
6. ``rationale_wrong_box``: the answer's last box misses the target (metrics: ``iou``).

A kept rationale's value is the think text only: the trainer renders the answer box itself, in the
codec of the model it trains. :func:`with_rationale` stores it on the sample as a box template:
the boxes the teacher quoted, in the teacher's frame, become placeholders and pixel boxes, which
the trainer writes in the student's frame like the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from groundforge.filters.verdict import Verdict
from groundforge.schemas.answer import split_think_answer
from groundforge.schemas.codecs import BoxCodec, box_template
from groundforge.schemas.records import Entity, KVGSample

# Phrases that give away that the teacher was handed the names and boxes.
DEFAULT_LEAK_PHRASES = (
    "as provided",
    "as given",
    "the given box",
    "given bounding box",
    "given coordinates",
    "provided box",
    "provided bounding box",
    "provided coordinates",
    "we are told",
    "i was told",
    "the annotation",
    "ground truth",
    "ground-truth",
)


@dataclass(frozen=True)
class RationaleRules:
    """Settings of :func:`check_rationale`. Leak phrases match case-insensitively at a word start,
    with any run of whitespace standing for a space."""

    min_iou: float = 0.5
    min_chars: int = 40
    max_chars: int = 6000
    leak_phrases: tuple[str, ...] = DEFAULT_LEAK_PHRASES
    require_target: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}"
            )
        if not 0 <= self.min_iou <= 1:
            raise ValueError(f"min_iou must be in [0, 1], got {self.min_iou}")


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def find_leak(text: str, phrases: tuple[str, ...]) -> str | None:
    """The first of ``phrases`` (in their order) that ``text`` contains, or None.

    >>> find_leak("The box As\\nProvided fits.", ("ground truth", "as provided"))
    'as provided'
    >>> find_leak("The tail has given way to rust.", ("as given",)) is None
    True
    """
    squashed = _squash(text)
    for phrase in phrases:
        if re.search(r"(?<!\w)" + re.escape(_squash(phrase)), squashed):
            return phrase
    return None


def with_rationale(sample: KVGSample, text: str, codec: BoxCodec, **changes) -> KVGSample:
    """The sample holding the kept rationale ``text`` (written by a teacher with ``codec``) as a
    box template (:func:`groundforge.schemas.codecs.box_template`): ``rationale`` with every box
    as a placeholder, ``rationale_boxes`` those boxes in the sample's pixels; ``changes`` are
    further fields to set.

    >>> from groundforge.schemas.codecs import get_codec
    >>> from groundforge.schemas.records import Provenance
    >>> sample = KVGSample("s", b"", 640, 480, "flag", "kvg", "q", "Chad", (), (), "sft",
    ...                    Provenance())
    >>> kept = with_rationale(sample, "Chad is (100,100),(500,500).", get_codec("norm1000"))
    >>> kept.rationale, kept.rationale_boxes[0].box.to_list()
    ('Chad is ⟦box 0⟧.', [64.0, 48.0, 320.0, 240.0])
    """
    template, boxes, labels = box_template(text, codec, sample.width, sample.height)
    named = tuple(Entity(label or "", box) for box, label in zip(boxes, labels, strict=True))
    return replace(sample, rationale=template, rationale_boxes=named, **changes)


def check_rationale(
    text: str, sample: KVGSample, codec: BoxCodec, rules: RationaleRules = RationaleRules()
) -> Verdict:
    """Keep a teacher rationale for ``sample`` (target box ``sample.gt_boxes[0]``) or drop it.

    Answer boxes are read with ``codec`` in the sample's width and height. Keeps with the think
    text as ``value`` and metrics ``iou``, ``chars`` and ``box`` (the stated box, in pixels).
    """
    if not sample.gt_boxes:
        raise ValueError(f"sample {sample.sample_id}: no target box to check a rationale against")
    parts = split_think_answer(text)
    if parts is None or not parts[0]:
        return Verdict.drop("rationale_format")
    think, answer = parts
    chars = len(think)
    if chars < rules.min_chars:
        return Verdict.drop("rationale_too_short", chars=chars, min_chars=rules.min_chars)
    if chars > rules.max_chars:
        return Verdict.drop("rationale_too_long", chars=chars, max_chars=rules.max_chars)
    for part, body in (("think", think), ("answer", answer)):
        phrase = find_leak(body, rules.leak_phrases)
        if phrase is not None:
            return Verdict.drop("rationale_leak", phrase=phrase, part=part)
    if rules.require_target and _squash(sample.target) not in _squash(think):
        return Verdict.drop("rationale_no_target", target=sample.target)
    box = codec.parse_last(answer, sample.width, sample.height)
    if box is None:
        return Verdict.drop("rationale_no_box", answer=answer[:200])
    iou = box.iou(sample.gt_boxes[0])
    if iou < rules.min_iou:
        return Verdict.drop(
            "rationale_wrong_box", iou=iou, min_iou=rules.min_iou, box=box.to_list()
        )
    return Verdict.ok(think, iou=iou, chars=chars, box=box.to_list())
