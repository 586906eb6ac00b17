"""Checks on a teacher's crowd-detection rationale (DIP-R1) before it becomes a CoT-SFT target.

A rationale is ``<think>scene</think><look>regions</look><answer>boxes</answer>``. The rules are
ours, in the style of :mod:`groundforge.filters.rationale`. :func:`check_detection_rationale`
drops with the first failing reason, in this order (structural first, so the reason names the
root cause):

1. ``rationale_format``: not what the GRPO format reward pays for
   (:func:`groundforge.schemas.answer.parse_detection_reply`: one think, one look and one answer
   block in that order with only whitespace around, a non-blank think part, at least one region
   in the look part, an answer that is a box list, ``[]`` allowed);
2. ``rationale_too_short`` / ``rationale_too_long``: the think and look texts together out of
   bounds (metrics: ``chars``);
3. ``rationale_leak``: a phrase admitting the boxes were given, or naming the detector behind
   the uncertain regions (metrics: ``phrase``, ``part``);
4. ``detect_low_precision``, then ``detect_low_recall``: the answer's boxes, matched one-to-one
   to ``gt_boxes`` at IoU >= ``match_iou`` (:func:`groundforge.schemas.box.match_boxes`), give a
   precision or recall under its minimum. Precision goes first: over-predicting is the common
   failure of detection trainers, and a rationale that pads its answer teaches exactly that.
   An empty answer has precision 1 (no wrong box) and no truths give recall 1 (nothing missed),
   so the reason names what is wrong;
5. ``look_misses_uncertain``: the sample has uncertain regions and no look region names one. A
   look region *names* an uncertain region when it covers at least ``look_cover`` (half) of the
   region's area: the looking reward's notion of cover, so a kept rationale's looks are never
   idle for that reward; a generous look around a small hard region still counts, as a close
   look at a crowd often frames a few people at once.

A kept rationale's value is ``<think>T</think><look>L</look>`` (the parts stripped): the trainer
appends the answer itself, in the codec of the model it trains. Look regions are written in the
teacher's codec; the metric ``look`` gives them in pixels of the sample's image, and
:func:`groundforge.filters.rationale.with_rationale` stores every box of the kept text as a
placeholder and a pixel box, for the trainer to write in the student's frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from groundforge.filters.rationale import DEFAULT_LEAK_PHRASES, find_leak
from groundforge.filters.verdict import Verdict
from groundforge.schemas.answer import parse_detection_reply
from groundforge.schemas.box import coverage_matrix, match_boxes
from groundforge.schemas.codecs import BoxCodec
from groundforge.schemas.records import KVGSample

# The uncertain regions come from a detector's mistakes; a student never hears of it.
DETECTION_LEAK_PHRASES = (*DEFAULT_LEAK_PHRASES, "the detector", "a detector", "the listed")


@dataclass(frozen=True)
class DetectionRules:
    """Settings of :func:`check_detection_rationale`. Thresholds are inclusive minimums; leak
    phrases match as in :func:`groundforge.filters.rationale.find_leak`."""

    min_precision: float = 0.8
    min_recall: float = 0.8
    match_iou: float = 0.5
    min_chars: int = 40
    max_chars: int = 6000
    leak_phrases: tuple[str, ...] = DETECTION_LEAK_PHRASES
    require_look_uncertain: bool = True
    look_cover: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}"
            )
        for name in ("min_precision", "min_recall", "look_cover"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.match_iou <= 1:
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou}")


def check_detection_rationale(
    text: str, sample: KVGSample, codec: BoxCodec, rules: DetectionRules = DetectionRules()
) -> Verdict:
    """Keep a teacher rationale for the ``detect`` sample or drop it (see the module docstring).

    Boxes are read with ``codec`` in the sample's width and height. Keeps with the think and look
    text as ``value`` and metrics ``precision``, ``recall``, ``f1``, ``matched``, ``boxes`` (the
    answer's), ``truths``, ``chars`` and ``look`` (the look regions, in pixels); the precision
    and recall drops carry the same numbers.

    >>> from groundforge.schemas.box import Box
    >>> from groundforge.schemas.codecs import get_codec
    >>> from groundforge.schemas.records import Provenance
    >>> sample = KVGSample("s", b"", 64, 48, "person", "detect", "q", "person", (),
    ...                    (Box(0, 0, 10, 20), Box(20, 0, 30, 20)), "sft", Provenance())
    >>> text = ("<think>Two people stand side by side on an empty street.</think>"
    ...         "<look>[20, 0, 30, 20] the right one is half in shadow</look>"
    ...         "<answer>[[0, 0, 10, 20], [20, 0, 30, 20], [40, 0, 50, 20]]</answer>")
    >>> verdict = check_detection_rationale(text, sample, get_codec("pixel"))
    >>> verdict.reason, round(verdict.metrics["precision"], 3), verdict.metrics["recall"]
    ('detect_low_precision', 0.667, 1.0)
    """
    reply = parse_detection_reply(text, codec, sample.width, sample.height)
    if reply is None:
        return Verdict.drop("rationale_format")
    chars = len(reply.think) + len(reply.look)
    if chars < rules.min_chars:
        return Verdict.drop("rationale_too_short", chars=chars, min_chars=rules.min_chars)
    if chars > rules.max_chars:
        return Verdict.drop("rationale_too_long", chars=chars, max_chars=rules.max_chars)
    for part, body in (("think", reply.think), ("look", reply.look), ("answer", reply.answer)):
        phrase = find_leak(body, rules.leak_phrases)
        if phrase is not None:
            return Verdict.drop("rationale_leak", phrase=phrase, part=part)
    matched = len(match_boxes(reply.boxes, sample.gt_boxes, rules.match_iou))
    precision = matched / len(reply.boxes) if reply.boxes else 1.0
    recall = matched / len(sample.gt_boxes) if sample.gt_boxes else 1.0
    scores = {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "matched": matched,
        "boxes": len(reply.boxes),
        "truths": len(sample.gt_boxes),
    }
    if precision < rules.min_precision:
        return Verdict.drop("detect_low_precision", min_precision=rules.min_precision, **scores)
    if recall < rules.min_recall:
        return Verdict.drop("detect_low_recall", min_recall=rules.min_recall, **scores)
    look = [box.to_list() for box in reply.regions]
    uncertain = [region.box for region in sample.uncertain_regions]
    if rules.require_look_uncertain and uncertain:
        named = coverage_matrix(reply.regions, uncertain) >= rules.look_cover
        if not named.any():
            return Verdict.drop("look_misses_uncertain", uncertain=len(uncertain), look=look)
    value = f"<think>{reply.think}</think><look>{reply.look}</look>"
    return Verdict.ok(value, chars=chars, look=look, **scores)
