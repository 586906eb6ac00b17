r"""GRPO rewards: DeepPerception / KARL (knowledge-intensive grounding), DIP-R1 (crowded scenes).

Every reward is a plain function with TRL's signature ``f(prompts, completions, **columns) ->
list[float | None]``: one value per completion, ``None`` where the reward does not apply to the
row (TRL turns ``None`` into NaN and its weighted ``nansum`` skips it). Rewards that read boxes
are made by small factories that bind a box codec (:mod:`groundforge.schemas.codecs`), because
the frame a model writes boxes in depends on the model; each function's ``__name__`` is its
registry name, which is what TRL logs.

Dataset columns read (aligned with ``completions``; others are ignored): ``task`` (``"kvg"`` or
``"detect"``), ``gt_boxes`` (``[[x1, y1, x2, y2], ...]`` in pixels of the image the model sees),
``width``, ``height`` (that image), ``knowledge_level`` (KARL), ``sample_id`` and optionally
``uncertain_regions`` (the looking reward). When there is no ``task`` column (or a row's task is
None), every reward applies to every row; a row whose task is another task gets ``None``.
KVG rewards: ``think_answer_format``, ``parsable_box``, ``iou_*``, ``karl_iou``. Detection
rewards: ``think_look_answer_format``, ``weighted_precision_recall``, ``variance_guided_looking``.

**The answer.** A completion is a string or TRL's conversational form ``[{"role": "assistant",
"content": ...}]`` (:func:`completion_text`). Boxes are read from the *answer*: the content of
the last ``<answer>`` block (an unclosed block runs to the end of a cut text, as in the
codecs). A completion without any ``<answer>`` tag has no answer and scores as unparsable; pass
``require_answer=False`` to a factory to read the whole text instead (the codec then still
prefers ``<answer>`` blocks, like the KVG-Bench scorer). Boxes in ``<think>`` never count when
an answer block exists, so a truncated answer cannot fall back onto boxes in the reasoning.

**Boxes as written** (:func:`answer_boxes`). A reward sees every box the way the KVG-Bench
scorer does: corners in the written order, never clipped, never dropped. An inverted box
(``[100, 100, 0, 0]``) or a degenerate one has no area and IoU 0 with everything, as on the
benchmark. A box wholly or mostly outside the image keeps its outside part, so its IoU with any
true box is at most its share inside the image (below 1/2 when mostly outside): it never matches
at the default IoU 0.5 and counts as a wrong prediction, never silently dropped. Values are read
in the codec's frame only (``fractions=False``): 0..1 values where pixels or 0..1000 are expected
are a tiny box near the origin, not the box they would be in another frame; ``fractions=True``
reads fraction-like values as fractions of the image, as the benchmark scorer does.

**KVG (one true box, the first of ``gt_boxes``; the prediction is the LAST box of the answer).**

- ``think_answer_format``: 1 if the text is ``<think>T</think><answer>A</answer>`` with T and A
  non-blank, each tag exactly once, only whitespace around and between the blocks; else 0.
- ``parsable_box``: 1 if the answer holds one box (up to ``max_boxes``, default 1) in the
  codec's frame and its last box has an area as written; else 0. A KVG answer names one box: a
  flood of boxes ending with a guess is not a well-formed answer.
- ``iou_continuous`` = IoU; ``iou_thresholded`` = IoU if IoU > tau else 0 (tau default 0.5;
  DeepPerception ran 0.85); ``iou_squared`` = IoU**2; ``iou_giou`` = (GIoU + 1) / 2, where
  GIoU = IoU - (area(C) - area(A u B)) / area(C) and C is the smallest box enclosing both, so
  the reward lies in [0, 1]: 1 for a perfect box, 1/2 for touching disjoint boxes, towards 0 for
  far-apart ones. No box, or a last box without area (inverted, degenerate), scores 0 in every
  variant.
- ``karl_iou`` (KARL): with L = ``knowledge_level`` (0 best known .. 4 least known; None means
  the middle level 2), reward = min(s_plus[L] * IoU, 1) if IoU > threshold (0.65) else
  s_minus[L]; s_plus = (0.65, 0.85, 1.0, 1.2, 1.4), s_minus = (-0.6, -0.5, -0.4, -0.2, 0.0).
  No parsable box counts as IoU 0 (so it gets s_minus[L]).

**DIP-R1 (detection; the prediction is every box of the answer).**

- ``think_look_answer_format``: 1 if the text is
  ``<think>T</think><look>R</look><answer>A</answer>`` (in order, each tag once, T non-blank,
  only whitespace around), R parses to at least one region and A is a box list: at least one
  box, or the explicit empty list (``[]``, optionally fenced, or what the codec renders for no
  boxes, which is the empty string for ``norm1000``); else 0
  (:func:`groundforge.schemas.answer.parse_detection_reply`, which the teacher-rationale check
  shares).
- ``weighted_precision_recall``: M = the one-to-one matches of :func:`match_boxes` at
  IoU >= ``iou`` (0.5); P = M / predictions, R = M / truths; reward = lam * P + (1 - lam) * R
  (lam = 0.5). 1 if both are empty; 0 if the answer is no box list, if there are no predictions
  while truths exist, or predictions while no truths exist (all false positives). Every box
  written is a prediction: duplicates, boxes without area and boxes outside the image count in
  P's denominator and match nothing.
- ``variance_guided_looking`` (group level): the rollouts of one prompt are the rows of this
  call that share a ``sample_id`` (in order of first appearance; they need not be contiguous).
  With G rollouts in the group, p_k = (rollouts whose answer matched true box k) / G and
  v_k = p_k (1 - p_k). If sum v = 0 (all rollouts agree, no truths, or a single rollout) every
  rollout of the group gets 0. Otherwise w_k = v_k / sum v, and a rollout with look regions
  J (the boxes of its ``<look>`` blocks, as written) earns
  ``clip(sum_k w_k max_j cov(j, k) * prec(j) - penalty * idle / |J|, 0, 1)``, where
  cov(j, k) = area(j n box_k) / area(box_k) and prec(j) = area(j n U) / area(j) is the look's
  precision, U the union of the uncertain true boxes (:func:`look_precision`): a look pays for
  covering an uncertain box tightly, so a look over the whole image (or any look mostly off the
  uncertain boxes) earns little, while one look around two overlapping uncertain boxes earns in
  full. ``idle`` counts the look regions that cover no uncertain box, "cover" meaning
  cov >= ``cover`` (0.5). Uncertain boxes are the true boxes with v_k > 0, plus the row's
  ``uncertain_regions`` when present (``use_uncertain_regions``): a look at an annotated
  ambiguous area is not idle, but it earns nothing by itself. No look region, or no answer box
  list, scores 0. The group is what one call sees: under TRL a group is whole when each process
  gets whole groups (one process, or a per-process generation batch that is a multiple of
  ``num_generations``); a partial group is scored on the rollouts present.

The registry :data:`REWARDS` maps names to factories and :func:`build_rewards` turns a spec
such as :data:`DEEPPERCEPTION` into TRL's ``reward_funcs`` and ``reward_weights``.

>>> from groundforge.schemas.codecs import get_codec
>>> codec = get_codec("pixel")
>>> iou = iou_reward(codec, "thresholded", tau=0.5)
>>> iou.__name__
'iou_thresholded'
>>> text = "<think>the left one</think><answer>[0, 0, 50, 100]</answer>"
>>> iou(None, [text, "no box"], gt_boxes=[[[0, 0, 60, 100]]] * 2, width=[640] * 2, height=[480] * 2)
[0.8333333333333334, 0.0]
>>> funcs, weights = build_rewards(DEEPPERCEPTION, codec)
>>> [f.__name__ for f in funcs], weights
(['iou_thresholded', 'think_answer_format', 'parsable_box'], [1.0, 0.5, 0.5])
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from groundforge.schemas.answer import is_empty_list, parse_detection_reply, split_think_answer
from groundforge.schemas.box import Box, as_array, coverage_matrix, match_boxes
from groundforge.schemas.codecs import BoxCodec

__all__ = [
    "DEEPPERCEPTION",
    "DEFAULT_KNOWLEDGE_LEVEL",
    "DIP_R1",
    "IOU_VARIANTS",
    "KARL",
    "REWARDS",
    "RewardFunc",
    "answer_boxes",
    "answer_text",
    "bare_answer_spec",
    "build_rewards",
    "completion_text",
    "coverage_matrix",
    "iou_reward",
    "karl_iou",
    "look_precision",
    "match_boxes",
    "parsable_box",
    "think_answer_format",
    "think_look_answer_format",
    "variance_guided_looking",
    "weighted_precision_recall",
]

RewardFunc = Callable[..., list[float | None]]

KVG, DETECT = "kvg", "detect"
DEFAULT_KNOWLEDGE_LEVEL = 2  # the middle level, used when a row's knowledge_level is None
IOU_VARIANTS = ("continuous", "thresholded", "squared", "giou")

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_LOOK_BLOCK = re.compile(r"<look>(.*?)(?:</look>|<answer>|$)", re.DOTALL | re.IGNORECASE)
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def completion_text(completion: object) -> str:
    """The text of one completion: a string, or TRL's conversational form.

    A conversational completion is a list of messages; the contents of its assistant messages
    (and messages without a role) are joined with newlines. A content is a string or a list of
    parts, of which the ``{"type": "text", "text": ...}`` ones count. None is the empty text.

    >>> completion_text("<answer>[1, 2, 3, 4]</answer>")
    '<answer>[1, 2, 3, 4]</answer>'
    >>> completion_text([{"role": "assistant", "content": "<answer>x</answer>"}])
    '<answer>x</answer>'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}])
    'hi'
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        texts = [
            completion_text(message)
            for message in completion
            if not (isinstance(message, Mapping) and message.get("role") not in (None, "assistant"))
        ]
        return "\n".join(texts)
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion)!r}")


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text") or ""))
        return "".join(parts)
    raise TypeError(f"a message content is a string or a list of parts, got {type(content)!r}")


def answer_text(text: str, require_answer: bool = True) -> str | None:
    """The content of the last ``<answer>`` block (unclosed: to the end of the text).

    Without any ``<answer>`` tag: None, or the whole text when ``require_answer`` is False.

    >>> answer_text("<think>[1, 1, 5, 5]</think><answer>[2, 2, 8, 8]</answer>")
    '[2, 2, 8, 8]'
    >>> answer_text("<answer>[1, 2") , answer_text("[1, 2, 3, 4]"), answer_text("x", False)
    ('[1, 2', None, 'x')
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    return None if require_answer else text


def answer_boxes(
    text: str,
    codec: BoxCodec,
    width: int,
    height: int,
    require_answer: bool = True,
    fractions: bool = False,
) -> list[Box] | None:
    """The boxes of the answer (:func:`answer_text`) as written, in pixels of the image: corners
    in the written order, not clipped, degenerate ones kept
    (:meth:`~groundforge.schemas.codecs.BoxCodec.parse_as_written`); ``[]`` for an explicit
    empty list, None when there is no answer or it is no box list. Values are read in the codec's
    frame only, unless ``fractions`` (then fraction-like values are fractions of the image, as
    the KVG-Bench scorer reads them).

    >>> from groundforge.schemas.codecs import get_codec
    >>> answer_boxes("<answer>[100, 100, 0, 0], [700, 0, 800, 50]</answer>", get_codec("pixel"),
    ...              640, 480)
    [Box(x1=100.0, y1=100.0, x2=0.0, y2=0.0), Box(x1=700.0, y1=0.0, x2=800.0, y2=50.0)]
    >>> answer_boxes("<answer>[]</answer>", get_codec("pixel"), 640, 480)
    []
    """
    answer = answer_text(text, require_answer)
    if answer is None:
        return None
    boxes = codec.parse_as_written(answer, width, height, fractions)
    if boxes:
        return boxes
    return [] if is_empty_list(answer, codec, width, height) else None


def _look_regions(
    text: str, codec: BoxCodec, width: int, height: int, fractions: bool
) -> list[Box]:
    return [
        box
        for block in _LOOK_BLOCK.findall(text)
        for box in codec.parse_as_written(block, width, height, fractions)
    ]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _as_box(value: object) -> Box:
    if isinstance(value, Box):
        return value
    return Box.from_list([float(v) for v in value])  # type: ignore[union-attr]


def _as_boxes(values: object) -> list[Box]:
    if values is None:
        return []
    return [_as_box(v) for v in values]  # type: ignore[union-attr]


def _giou(a: Box, b: Box) -> float:
    if a.is_degenerate or b.is_degenerate:
        return -1.0
    inter = a.intersection(b)
    union = a.area + b.area - inter
    hull = (max(a.x2, b.x2) - min(a.x1, b.x1)) * (max(a.y2, b.y2) - min(a.y1, b.y1))
    return inter / union - (hull - union) / hull


def _union_area(boxes: np.ndarray) -> float:
    """The area of the union of ``(n, 4)`` boxes with positive extent, exactly: the boxes'
    edges cut the plane into cells and each cell is in the union or not."""
    if not len(boxes):
        return 0.0
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    in_x = (boxes[:, 0:1] < cx) & (cx < boxes[:, 2:3])
    in_y = (boxes[:, 1:2] < cy) & (cy < boxes[:, 3:4])
    covered = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)
    return float((np.outer(np.diff(ys), np.diff(xs)) * covered).sum())


def look_precision(looks: Sequence[Box], targets: Sequence[Box]) -> np.ndarray:
    """The share of each look's area that lies on the union of ``targets``; 0 for a look
    without area (degenerate or inverted as written).

    >>> look_precision([Box(0, 0, 10, 10), Box(0, 0, 40, 10), Box(9, 9, 0, 0)],
    ...                [Box(0, 0, 10, 10), Box(5, 0, 20, 10)]).tolist()
    [1.0, 0.5, 0.0]
    """
    out = np.zeros(len(looks))
    t = as_array(targets)
    for j, look in enumerate(looks):
        if look.is_degenerate or not len(t):
            continue
        inside = np.column_stack(
            [
                np.maximum(t[:, 0], look.x1),
                np.maximum(t[:, 1], look.y1),
                np.minimum(t[:, 2], look.x2),
                np.minimum(t[:, 3], look.y2),
            ]
        )
        inside = inside[(inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])]
        out[j] = _union_area(inside) / look.area
    return out


# --------------------------------------------------------------------------------------------
# Row plumbing
# --------------------------------------------------------------------------------------------


class _Rows:
    """Column access for one reward call: values aligned with the completions."""

    def __init__(self, name: str, completions: Sequence[object], columns: Mapping[str, Any]):
        self.name = name
        self.n = len(completions)
        self.texts = [completion_text(c) for c in completions]
        self.columns = columns
        self._cache: dict[str, list[Any] | object] = {}

    def column(self, key: str, required: bool = True) -> list[Any] | None:
        if key not in self._cache:
            values = self.columns.get(key)
            if values is None:
                self._cache[key] = _MISSING
            else:
                values = list(values)
                if len(values) != self.n:
                    raise ValueError(
                        f"reward {self.name}: column {key!r} has {len(values)} values for "
                        f"{self.n} completions"
                    )
                self._cache[key] = values
        values = self._cache[key]
        if values is _MISSING:
            if required:
                raise ValueError(f"reward {self.name} needs the dataset column {key!r}")
            return None
        return values  # type: ignore[return-value]

    def get(self, key: str, i: int, required: bool = True) -> Any:
        values = self.column(key, required)
        return None if values is None else values[i]

    def applies(self, i: int, task: str) -> bool:
        tasks = self.column("task", required=False)
        return tasks is None or tasks[i] is None or tasks[i] == task

    def size(self, i: int) -> tuple[int, int]:
        return int(self.get("width", i)), int(self.get("height", i))

    def truths(self, i: int) -> list[Box]:
        return _as_boxes(self.get("gt_boxes", i))

    def first_truth(self, i: int) -> Box:
        truths = self.truths(i)
        if not truths:
            sample = self.get("sample_id", i, required=False)
            raise ValueError(f"reward {self.name}: row {i} (sample {sample!r}) has no gt box")
        return truths[0]


def _named(fn: RewardFunc, name: str, doc: str, **params: Any) -> RewardFunc:
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.params = dict(params)  # type: ignore[attr-defined]
    return fn


def _check_unit(name: str, value: float, low_open: bool = False) -> float:
    value = float(value)
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# KVG rewards (DeepPerception, KARL)
# --------------------------------------------------------------------------------------------


def think_answer_format(prompts: object, completions: Sequence[object], **columns: Any):
    """1.0 for ``<think>T</think><answer>A</answer>`` (T, A non-blank, each tag once, only
    whitespace around), else 0.0; None on rows whose task is not ``kvg``.

    >>> think_answer_format(None, ["<think>a</think> <answer>b</answer>", "<answer>b</answer>"])
    [1.0, 0.0]
    """
    rows = _Rows("think_answer_format", completions, columns)
    out: list[float | None] = []
    for i, text in enumerate(rows.texts):
        if not rows.applies(i, KVG):
            out.append(None)
            continue
        parts = split_think_answer(text)
        out.append(1.0 if parts is not None and all(parts) else 0.0)
    return out


def parsable_box(
    codec: BoxCodec, require_answer: bool = True, max_boxes: int = 1, fractions: bool = False
) -> RewardFunc:
    """A reward of 1.0 when the answer holds 1 to ``max_boxes`` boxes in the codec's frame and
    the last one (the prediction) has an area as written, else 0.0.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = parsable_box(get_codec("pixel"))
    >>> f(None, ["<answer>[1, 2, 30, 40]</answer>", "<answer>[1, 2</answer>"], width=[64] * 2,
    ...   height=[48] * 2)
    [1.0, 0.0]
    """
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"max_boxes must be an integer >= 1, got {max_boxes!r}")

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows("parsable_box", completions, columns)
        out: list[float | None] = []
        for i, text in enumerate(rows.texts):
            if not rows.applies(i, KVG):
                out.append(None)
                continue
            boxes = answer_boxes(text, codec, *rows.size(i), require_answer, fractions) or []
            ok = 1 <= len(boxes) <= max_boxes and not boxes[-1].is_degenerate
            out.append(1.0 if ok else 0.0)
        return out

    return _named(
        reward,
        "parsable_box",
        parsable_box.__doc__ or "",
        require_answer=require_answer,
        max_boxes=max_boxes,
        fractions=fractions,
    )


def _last_answer_box(
    rows: _Rows, i: int, codec: BoxCodec, require_answer: bool, fractions: bool
) -> Box | None:
    boxes = answer_boxes(rows.texts[i], codec, *rows.size(i), require_answer, fractions)
    return boxes[-1] if boxes else None


def iou_reward(
    codec: BoxCodec,
    variant: str = "continuous",
    tau: float = 0.5,
    require_answer: bool = True,
    fractions: bool = False,
) -> RewardFunc:
    """An IoU reward between the answer's last box and the first gt box, named ``iou_<variant>``.

    Variants: ``continuous`` (IoU), ``thresholded`` (IoU if IoU > tau else 0), ``squared``
    (IoU**2), ``giou`` ((GIoU + 1) / 2, in [0, 1]). No parsable box scores 0.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = iou_reward(get_codec("pixel"), "giou")
    >>> r = f(None, ["<answer>[0, 0, 10, 10]</answer>"], gt_boxes=[[[20, 0, 30, 10]]], width=[64],
    ...       height=[48])   # disjoint: GIoU = 0 - (300 - 200) / 300 = -1/3
    >>> round(r[0], 6)
    0.333333
    """
    if variant not in IOU_VARIANTS:
        raise ValueError(f"unknown IoU variant {variant!r}; known: {', '.join(IOU_VARIANTS)}")
    tau = _check_unit("tau", tau)
    name = f"iou_{variant}"

    def score(pred: Box, truth: Box) -> float:
        if variant == "giou":
            return (_giou(pred, truth) + 1.0) / 2.0
        iou = pred.iou(truth)
        if variant == "thresholded":
            return iou if iou > tau else 0.0
        if variant == "squared":
            return iou**2
        return iou

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows(name, completions, columns)
        out: list[float | None] = []
        for i in range(rows.n):
            if not rows.applies(i, KVG):
                out.append(None)
                continue
            truth = rows.first_truth(i)
            pred = _last_answer_box(rows, i, codec, require_answer, fractions)
            out.append(0.0 if pred is None else float(score(pred, truth)))
        return out

    doc = f"{name}: see iou_reward." + (f" tau={tau}" if variant == "thresholded" else "")
    return _named(
        reward,
        name,
        doc,
        variant=variant,
        tau=tau,
        require_answer=require_answer,
        fractions=fractions,
    )


def _knowledge_level(value: object, name: str) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DEFAULT_KNOWLEDGE_LEVEL
    level = int(value)  # type: ignore[call-overload]
    if level != value or not 0 <= level <= 4:
        raise ValueError(f"reward {name}: knowledge_level must be 0..4 or None, got {value!r}")
    return level


def karl_iou(
    codec: BoxCodec,
    threshold: float = 0.65,
    s_plus: Sequence[float] = (0.65, 0.85, 1.0, 1.2, 1.4),
    s_minus: Sequence[float] = (-0.6, -0.5, -0.4, -0.2, 0.0),
    require_answer: bool = True,
    fractions: bool = False,
) -> RewardFunc:
    """KARL's knowledge-aware IoU reward: min(s_plus[L] * IoU, 1) if IoU > threshold else
    s_minus[L], L = ``knowledge_level`` (None: level 2); no parsable box counts as IoU 0.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = karl_iou(get_codec("pixel"))
    >>> f(None, ["<answer>[0, 0, 80, 100]</answer>"] * 3, gt_boxes=[[[0, 0, 100, 100]]] * 3,
    ...   width=[640] * 3, height=[480] * 3, knowledge_level=[0, 4, None])
    [0.52, 1.0, 0.8]
    """
    threshold = _check_unit("threshold", threshold)
    s_plus, s_minus = tuple(float(s) for s in s_plus), tuple(float(s) for s in s_minus)
    if len(s_plus) != 5 or len(s_minus) != 5:
        raise ValueError("s_plus and s_minus need one value per knowledge level (5 each)")

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows("karl_iou", completions, columns)
        out: list[float | None] = []
        for i in range(rows.n):
            if not rows.applies(i, KVG):
                out.append(None)
                continue
            level = _knowledge_level(rows.get("knowledge_level", i), "karl_iou")
            truth = rows.first_truth(i)
            pred = _last_answer_box(rows, i, codec, require_answer, fractions)
            iou = 0.0 if pred is None else pred.iou(truth)
            out.append(min(s_plus[level] * iou, 1.0) if iou > threshold else s_minus[level])
        return out

    return _named(
        reward,
        "karl_iou",
        karl_iou.__doc__ or "",
        threshold=threshold,
        s_plus=s_plus,
        s_minus=s_minus,
        require_answer=require_answer,
        fractions=fractions,
    )


# --------------------------------------------------------------------------------------------
# DIP-R1 rewards (detection)
# --------------------------------------------------------------------------------------------


def think_look_answer_format(codec: BoxCodec) -> RewardFunc:
    """1.0 for ``<think>T</think><look>R</look><answer>A</answer>`` where R parses to at least
    one region and A to a box list (``[]`` allowed), else 0.0; None on non-``detect`` rows.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = think_look_answer_format(get_codec("pixel"))
    >>> f(None, ["<think>t</think><look>[0, 0, 9, 9]</look><answer>[]</answer>",
    ...          "<think>t</think><look>nothing</look><answer>[]</answer>"], width=[64] * 2,
    ...   height=[48] * 2)
    [1.0, 0.0]
    """

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows("think_look_answer_format", completions, columns)
        out: list[float | None] = []
        for i, text in enumerate(rows.texts):
            if not rows.applies(i, DETECT):
                out.append(None)
                continue
            reply = parse_detection_reply(text, codec, *rows.size(i))
            out.append(0.0 if reply is None else 1.0)
        return out

    return _named(reward, "think_look_answer_format", think_look_answer_format.__doc__ or "")


def _precision_recall(pred: list[Box] | None, truths: list[Box], iou: float, lam: float) -> float:
    if pred is None:
        return 0.0
    if not pred and not truths:
        return 1.0
    if not pred or not truths:
        return 0.0
    matches = len(match_boxes(pred, truths, iou))
    return lam * matches / len(pred) + (1.0 - lam) * matches / len(truths)


def weighted_precision_recall(
    codec: BoxCodec,
    lam: float = 0.5,
    iou: float = 0.5,
    require_answer: bool = True,
    fractions: bool = False,
) -> RewardFunc:
    """lam * P + (1 - lam) * R over a one-to-one matching at IoU >= ``iou``; 1 if both lists are
    empty, 0 if the answer is no box list or exactly one of the lists is empty.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = weighted_precision_recall(get_codec("pixel"))
    >>> f(None, ["<answer>[[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]</answer>"],
    ...   gt_boxes=[[[0, 0, 10, 10], [60, 0, 70, 10]]], width=[640], height=[480])   # P 1/3, R 1/2
    [0.41666666666666663]
    """
    lam = _check_unit("lam", lam)
    iou = _check_unit("iou", iou, low_open=True)

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows("weighted_precision_recall", completions, columns)
        out: list[float | None] = []
        for i, text in enumerate(rows.texts):
            if not rows.applies(i, DETECT):
                out.append(None)
                continue
            pred = answer_boxes(text, codec, *rows.size(i), require_answer, fractions)
            out.append(float(_precision_recall(pred, rows.truths(i), iou, lam)))
        return out

    return _named(
        reward,
        "weighted_precision_recall",
        weighted_precision_recall.__doc__ or "",
        lam=lam,
        iou=iou,
        require_answer=require_answer,
        fractions=fractions,
    )


def variance_guided_looking(
    codec: BoxCodec,
    iou: float = 0.5,
    penalty: float = 0.5,
    cover: float = 0.5,
    use_uncertain_regions: bool = True,
    require_answer: bool = True,
    fractions: bool = False,
) -> RewardFunc:
    """DIP-R1's group-level looking reward (see the module docstring for the formula).

    Rollouts of one prompt are the rows sharing a ``sample_id`` in this call. A rollout earns
    the variance-weighted coverage of the true boxes its group disagrees on by its ``<look>``
    regions, each look's coverage weighted by its precision (the share of the look on uncertain
    boxes, so a whole-image look earns little), minus ``penalty`` x its share of look regions
    covering (cov >= ``cover``) no uncertain box, clipped to [0, 1]; 0 for the whole group when
    every rollout agrees, and 0 for a rollout whose answer is no box list.

    >>> from groundforge.schemas.codecs import get_codec
    >>> f = variance_guided_looking(get_codec("pixel"))
    >>> hit = "<think>t</think><look>[0, 0, 10, 10]</look><answer>[[0, 0, 10, 10]]</answer>"
    >>> miss = "<think>t</think><look>[50, 50, 60, 60]</look><answer>[]</answer>"
    >>> f(None, [hit, miss], sample_id=["s", "s"], gt_boxes=[[[0, 0, 10, 10]]] * 2,
    ...   width=[640] * 2, height=[480] * 2)
    [1.0, 0.0]
    """
    iou = _check_unit("iou", iou, low_open=True)
    cover = _check_unit("cover", cover, low_open=True)
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    penalty = float(penalty)

    def reward(prompts: object, completions: Sequence[object], **columns: Any):
        rows = _Rows("variance_guided_looking", completions, columns)
        out: list[float | None] = [None] * rows.n
        groups: dict[object, list[int]] = {}
        for i in range(rows.n):
            if rows.applies(i, DETECT):
                sample = rows.get("sample_id", i)
                groups.setdefault(("row", i) if sample is None else sample, []).append(i)
        for key, members in groups.items():
            for i, score in zip(members, _group_scores(rows, key, members), strict=True):
                out[i] = score
        return out

    def _group_scores(rows: _Rows, key: object, members: list[int]) -> list[float]:
        truths = rows.truths(members[0])
        for i in members[1:]:
            if rows.truths(i) != truths:
                raise ValueError(
                    f"reward variance_guided_looking: the rollouts of sample {key!r} "
                    "disagree on gt_boxes"
                )
        hits = np.zeros((len(members), len(truths)), dtype=bool)
        answers = []
        for r, i in enumerate(members):
            pred = answer_boxes(rows.texts[i], codec, *rows.size(i), require_answer, fractions)
            answers.append(pred)
            for _, k, _ in match_boxes(pred or [], truths, iou):
                hits[r, k] = True
        p = hits.mean(axis=0) if len(truths) else np.zeros(0)
        v = p * (1.0 - p)
        total = float(v.sum())
        if total <= 0:
            return [0.0] * len(members)
        w = v / total
        uncertain_truths = [truths[k] for k in np.flatnonzero(v > 0)]
        uncertain = list(uncertain_truths)
        if use_uncertain_regions:
            uncertain += _as_boxes(rows.get("uncertain_regions", members[0], required=False))
        scores = []
        for i, pred in zip(members, answers, strict=True):
            looks = _look_regions(rows.texts[i], codec, *rows.size(i), fractions)
            if not looks or pred is None:
                scores.append(0.0)
                continue
            precision = look_precision(looks, uncertain_truths)
            earned = coverage_matrix(looks, truths) * precision[:, None]
            gain = float((w * earned.max(axis=0)).sum())
            covers = coverage_matrix(looks, uncertain) >= cover
            idle = float((~covers.any(axis=1)).mean())
            scores.append(float(np.clip(gain - penalty * idle, 0.0, 1.0)))
        return scores

    return _named(
        reward,
        "variance_guided_looking",
        variance_guided_looking.__doc__ or "",
        iou=iou,
        penalty=penalty,
        cover=cover,
        use_uncertain_regions=use_uncertain_regions,
        require_answer=require_answer,
        fractions=fractions,
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _think_answer_format_factory(codec: BoxCodec | None = None) -> RewardFunc:
    return think_answer_format


def _iou_factory(variant: str) -> Callable[..., RewardFunc]:
    def factory(
        codec: BoxCodec, tau: float = 0.5, require_answer: bool = True, fractions: bool = False
    ) -> RewardFunc:
        return iou_reward(
            codec, variant, tau=tau, require_answer=require_answer, fractions=fractions
        )

    factory.__name__ = f"iou_{variant}"
    return factory


REWARDS: dict[str, Callable[..., RewardFunc]] = {
    "think_answer_format": _think_answer_format_factory,
    "parsable_box": parsable_box,
    **{f"iou_{variant}": _iou_factory(variant) for variant in IOU_VARIANTS},
    "karl_iou": karl_iou,
    "think_look_answer_format": think_look_answer_format,
    "weighted_precision_recall": weighted_precision_recall,
    "variance_guided_looking": variance_guided_looking,
}
"""Reward name -> factory ``factory(codec, **params)``; the built function has that name."""


def _frozen(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(
        {k: _frozen(v) if isinstance(v, Mapping) else v for k, v in spec.items()}
    )


DEEPPERCEPTION = _frozen(
    {
        "iou_thresholded": {"weight": 1.0, "tau": 0.85},
        "think_answer_format": 0.5,
        "parsable_box": 0.5,
    }
)
"""DeepPerception's GRPO stage: IoU if IoU > 0.85, plus 0.5 format and 0.5 parsable box."""

KARL = _frozen({"karl_iou": 1.0, "think_answer_format": 0.5, "parsable_box": 0.5})
"""KARL: the knowledge-aware IoU reward in place of the thresholded one, same format terms."""

DIP_R1 = _frozen(
    {
        "think_look_answer_format": 1.0,
        "weighted_precision_recall": 1.0,
        "variance_guided_looking": 1.0,
    }
)
"""DIP-R1: format, weighted precision-recall and variance-guided looking, weight 1 each."""


# Rewards that pay for the tags themselves: nothing to read in a bare reply.
_TAG_REWARDS = ("think_answer_format", "think_look_answer_format", "variance_guided_looking")


def bare_answer_spec(spec: Mapping[str, float | Mapping[str, Any]]) -> dict[str, Any]:
    """A reward spec for replies that are the bare box (a corpus without rationales, trained
    without the think/answer instruction): the tag rewards (``think_answer_format``,
    ``think_look_answer_format``, ``variance_guided_looking``) are left out and every other
    reward of :data:`REWARDS` reads the whole reply (``require_answer=False``; an ``<answer>``
    block, when there is one, still wins). Functions of your own are kept as they are. Raises
    ValueError when nothing is left.

    >>> bare_answer_spec(DEEPPERCEPTION)
    {'iou_thresholded': {'weight': 1.0, 'tau': 0.85, 'require_answer': False}, \
'parsable_box': {'weight': 0.5, 'require_answer': False}}
    """
    out: dict[str, Any] = {}
    for name, value in spec.items():
        if name in _TAG_REWARDS:
            continue
        if name not in REWARDS:
            out[name] = value
            continue
        params = dict(value) if isinstance(value, Mapping) else {"weight": value}
        if "require_answer" in inspect.signature(REWARDS[name]).parameters:
            params["require_answer"] = False
        out[name] = params
    if not out:
        raise ValueError(
            f"rewards {', '.join(spec)}: every one pays for the think/answer tags, which a bare "
            "box reply never has"
        )
    return out


def import_reward(path: str) -> RewardFunc:
    """A reward function of your own, named ``package.module:function`` (TRL's signature).

    >>> import_reward("groundforge.trainer.rewards:completion_text").__name__
    'completion_text'
    """
    module_name, _, attr = path.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {path!r}: cannot import it ({err})") from None
    if not callable(func):
        raise ValueError(f"reward {path!r}: not a function")
    return func


def build_rewards(
    spec: Mapping[str, float | Mapping[str, Any]], codec: BoxCodec
) -> tuple[list[RewardFunc], list[float]]:
    """TRL's ``reward_funcs`` and ``reward_weights`` from a spec, in the spec's order.

    A spec maps a reward name (a key of :data:`REWARDS`) to its weight, or to a mapping of
    ``weight`` (default 1.0) and the factory's parameters. A name ``package.module:function``
    imports a reward function of your own (weight only).

    >>> from groundforge.schemas.codecs import get_codec
    >>> funcs, weights = build_rewards({"iou_giou": {"weight": 2}, "think_answer_format": 0.5},
    ...                                get_codec("pixel"))
    >>> [f.__name__ for f in funcs], weights
    (['iou_giou', 'think_answer_format'], [2.0, 0.5])
    """
    if not spec:
        raise ValueError("a reward spec needs at least one reward; known: " + ", ".join(REWARDS))
    funcs: list[RewardFunc] = []
    weights: list[float] = []
    for name, value in spec.items():
        if name not in REWARDS and ":" not in name:
            raise ValueError(
                f"unknown reward {name!r}; known: {', '.join(REWARDS)}, or a function of yours "
                "as 'package.module:function'"
            )
        if isinstance(value, Mapping):
            params = dict(value)
            weight = params.pop("weight", 1.0)
        else:
            weight, params = value, {}
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"reward {name!r}: the weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: the weight must be finite, got {weight!r}")
        if name not in REWARDS:
            if params:
                raise ValueError(f"reward {name!r}: a function of yours takes a weight only")
            funcs.append(import_reward(name))
            weights.append(float(weight))
            continue
        factory = REWARDS[name]
        try:
            inspect.signature(factory).bind(codec, **params)
        except TypeError as err:
            accepted = [p for p in inspect.signature(factory).parameters if p != "codec"]
            raise ValueError(
                f"reward {name!r}: bad parameters {sorted(params)} ({err}); "
                f"accepted: {', '.join(accepted) or 'none'} and weight"
            ) from err
        funcs.append(factory(codec, **params))
        weights.append(float(weight))
    return funcs, weights
