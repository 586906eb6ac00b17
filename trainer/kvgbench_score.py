"""The published KVG-Bench scorer (DeepPerception / KARL): box extraction, IoU and accuracy.

It reproduces the behaviour of ``deepperception/eval/evaluate.py`` in the DeepPerception
release (github.com/thunlp/DeepPerception): the same patterns in the same order, the same
reading of a match, the same IoU arithmetic.

**Extraction** (:func:`reference_box`). One ordered cascade of regular expressions runs over the
whole reply; the first pattern with any match decides and its *last* match is the box:

1. ``<answer>...(x1,y1),(x2,y2)</answer>``: the pair must end the block (nothing before
   ``</answer>``) and the block must sit on one line;
2. ``So the answer is ... (x1,y1),(x2,y2)``;
3. ``(x1,y1),(x2,y2)`` anywhere;
4. ``(a, b) ... (c, d)``: two parenthesised pairs of *any* text with anything between them on
   the same line (``from (100, 200) to (300, 400)``);
5. ``[a, b, c, d]`` of integers (JSON ``bbox_2d`` lists written with ``", "``);
6. ``[a, b, c, d]`` of any text;
7. ``(a, b, c, d)`` of integers;
8. ``(a, b)`` and ``(c, d)`` with at most one line break and then anything on the next line
   between them.

Patterns 1 to 3, 5, 7 and 8 take "integers" as the scorer's regexes do: a (lazy) run of ASCII
digits, so no sign and no decimal point, and possibly empty. Patterns 4 and 6 take any text and
read it with Python's ``float`` (so decimals, signs, exponents and surrounding spaces are read).
Separators are literal: the pairs of patterns 1 to 3 are joined by ``"),("`` with no space and
the second pair is ``(x2,y2)`` with no space; within a pair's first coordinates anything on the
line may come between ``x,`` and ``y)``; patterns 5 to 8 need exactly ``", "`` (comma, one
space). No pattern crosses a line break except pattern 8's single one (``.`` does not match
``\\n``). Only the first value has ``[`` and ``x`` removed before it is read. When the chosen
match does not read as four numbers (an empty digit run, a word), the box is ``(0, 0, 0, 0)``:
the pattern still decides. Four values summing to less than 4 are 0..1 fractions and are
multiplied by 1000. No match at all is ``(0, 0, 0, 0)`` too.

**IoU** (:func:`reference_iou`), as the scorer computes it (torchvision's ``box_iou`` in
float32): corners as written, no clipping, no reordering; an inverted or empty box scores 0. An
item's IoU is the best over its answer boxes, and it is correct at IoU >= 0.5.

**Accuracy** (:func:`aggregate`): Acc@0.5 and mean IoU averaged over instances, per category and
over the seen, unseen and all items.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Quad = tuple[float, float, float, float]

SEEN_CATEGORIES: tuple[str, ...] = ("aircraft", "car", "reptilia", "bird", "food")
UNSEEN_CATEGORIES: tuple[str, ...] = ("dog", "mollusca", "mammal", "flower", "landmark")
CORRECT_IOU = 0.5
NO_BOX: Quad = (0.0, 0.0, 0.0, 0.0)

_INT = r"(\d*?)"  # the scorer's "integer": a lazy, possibly empty run of digits
_ANY = r"(.*?)"  # its "number": any text on the line, read by float()
_GAP = r".*?"  # anything on the same line
_INT_PAIRS = rf"\({_INT},{_GAP}{_INT}\),\({_INT},{_INT}\)"

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(regex))
    for name, regex in (
        ("answer_point_pair", rf"<answer>{_GAP}{_INT_PAIRS}</answer>"),
        ("so_the_answer_is", rf"So the answer is{_GAP}{_INT_PAIRS}"),
        ("point_pair", _INT_PAIRS),
        ("loose_point_pair", rf"\({_ANY},{_GAP}{_ANY}\){_GAP}\({_ANY},{_GAP}{_ANY}\)"),
        ("int_list", rf"\[{_INT}, {_INT}, {_INT}, {_INT}\]"),
        ("list", rf"\[{_ANY}, {_ANY}, {_ANY}, {_ANY}\]"),
        ("int_tuple", rf"\({_INT}, {_INT}, {_INT}, {_INT}\)"),
        ("split_point_pair", rf"\({_INT}, {_INT}\)\n?{_GAP}\({_INT}, {_INT}\)"),
    )
)
PATTERN_NAMES: tuple[str, ...] = tuple(name for name, _ in PATTERNS)


@dataclass(frozen=True)
class ReferenceMatch:
    """The box the cascade read and the pattern that decided (``None``: nothing matched)."""

    box: Quad
    pattern: str | None

    @property
    def number(self) -> int:
        """The pattern's 1-based place in the cascade; 0 for no match."""
        return 0 if self.pattern is None else PATTERN_NAMES.index(self.pattern) + 1


def reference_match(text: object) -> ReferenceMatch:
    """:func:`reference_box` with the pattern that decided."""
    if not isinstance(text, str):
        return ReferenceMatch(NO_BOX, None)
    for name, pattern in PATTERNS:
        found = pattern.findall(text)
        if found:
            return ReferenceMatch(_read(found[-1]), name)
    return ReferenceMatch(NO_BOX, None)


def _read(groups: tuple[str, str, str, str]) -> Quad:
    first, *rest = groups
    try:
        values = [float(first.replace("[", "").replace("x", "")), *(float(v) for v in rest)]
    except ValueError:
        return NO_BOX
    if sum(values) < 4:
        values = [v * 1000 for v in values]
    return tuple(values)  # type: ignore[return-value]


def reference_box(text: object) -> Quad:
    """The box of a free-text reply as the KVG-Bench scorer reads it (0..1000 frame); see the
    module docstring for the cascade. No match is ``(0, 0, 0, 0)``.

    >>> reference_box("<think>(1,1),(9,9)</think><answer>(100,200),(300,400)</answer>")
    (100.0, 200.0, 300.0, 400.0)
    >>> reference_box("from (0.1, 0.2) to (0.3, 0.4)")
    (100.0, 200.0, 300.0, 400.0)
    >>> reference_box("no box")
    (0.0, 0.0, 0.0, 0.0)
    """
    return reference_match(text).box


def reference_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes as the scorer computes it: float32 arithmetic,
    corners as written, no clipping; an inverted or empty box (and any undefined value) is 0.

    >>> reference_iou((0, 0, 100, 100), (50, 0, 150, 100))
    0.3333333432674408
    >>> reference_iou((100, 100, 0, 0), (0, 0, 100, 100)), reference_iou((0, 0, 0, 0), (0, 0, 5, 5))
    (0.0, 0.0)
    """
    import numpy as np

    p = np.asarray(pred, dtype=np.float32)
    g = np.asarray(gt, dtype=np.float32)
    if p.shape != (4,) or g.shape != (4,):
        raise ValueError(f"boxes need 4 values, got {p.size} and {g.size}")
    with np.errstate(all="ignore"):
        area_p = (p[2] - p[0]) * (p[3] - p[1])
        area_g = (g[2] - g[0]) * (g[3] - g[1])
        wh = np.maximum(np.minimum(p[2:], g[2:]) - np.maximum(p[:2], g[:2]), np.float32(0))
        inter = wh[0] * wh[1]
        iou = float(inter / (area_p + area_g - inter))
    # the scorer keeps the best IoU above 0 over the answer boxes: NaN and negatives are 0
    return iou if iou > 0 else 0.0


def best_iou(pred: Sequence[float], gts: Iterable[Sequence[float]]) -> float:
    """The best :func:`reference_iou` of ``pred`` over the answer boxes ``gts`` (0 for none)."""
    return max((reference_iou(pred, g) for g in gts), default=0.0)


def score_group(ious: Sequence[float], threshold: float = CORRECT_IOU) -> dict[str, Any]:
    """``n``, ``correct`` (IoU >= ``threshold``), ``acc`` (%) and ``miou`` of some instances;
    ``acc`` and ``miou`` are ``None`` for none."""
    n = len(ious)
    correct = sum(iou >= threshold for iou in ious)
    return {
        "n": n,
        "correct": correct,
        "acc": 100.0 * correct / n if n else None,
        "miou": sum(ious) / n if n else None,
    }


def instance_groups(
    categories: Sequence[str],
    seen: Sequence[str] = SEEN_CATEGORIES,
    unseen: Sequence[str] = UNSEEN_CATEGORIES,
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The positions of the instances of each category (seen ones first, then unseen, then the
    others sorted) and of the ``seen``, ``unseen`` and ``all`` groups. A category in neither
    list counts in ``all`` and its own row only."""
    by_category: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        by_category.setdefault(category, []).append(i)
    known = [c for c in (*seen, *unseen) if c in by_category]
    order = known + sorted(set(by_category) - set(known))
    splits = {
        "seen": [i for i, c in enumerate(categories) if c in seen],
        "unseen": [i for i, c in enumerate(categories) if c in unseen],
        "all": list(range(len(categories))),
    }
    return {c: by_category[c] for c in order}, splits


def aggregate(
    scored: Iterable[tuple[str, float]],
    seen: Sequence[str] = SEEN_CATEGORIES,
    unseen: Sequence[str] = UNSEEN_CATEGORIES,
    threshold: float = CORRECT_IOU,
) -> dict[str, Any]:
    """Instance-weighted Acc@threshold and mean IoU of ``(category, iou)`` pairs: one
    :func:`score_group` row per category (under ``categories``) and for ``seen``, ``unseen``
    and ``all``.

    >>> m = aggregate([("bird", 1.0), ("bird", 0.4), ("dog", 0.5), ("dog", 0.0)])
    >>> m["seen"]["acc"], m["unseen"]["acc"], m["all"]["acc"], m["all"]["miou"]
    (50.0, 50.0, 50.0, 0.475)
    """
    pairs = list(scored)
    if any(not math.isfinite(iou) for _, iou in pairs):
        raise ValueError("an IoU is not a finite number")
    categories = [c for c, _ in pairs]
    ious = [iou for _, iou in pairs]
    per_category, splits = instance_groups(categories, seen, unseen)

    def row(positions: list[int]) -> dict[str, Any]:
        return score_group([ious[i] for i in positions], threshold)

    return {
        "categories": {c: row(pos) for c, pos in per_category.items()},
        **{name: row(pos) for name, pos in splits.items()},
    }
