"""verl's custom reward function for the rows :func:`groundforge.outputs.export.export_verl` writes.

Point verl at it with ``custom_reward_function.path=<this file>`` and
``custom_reward_function.name=compute_score`` (``groundforge`` must be importable in verl's
workers); extra keyword arguments come from ``custom_reward_function.reward_kwargs``.

The score of one completion::

    score = accuracy + format_weight * format_ok

- ``accuracy``, for ``grounding`` rows (task ``kvg``): the IoU of the *last* box of the answer
  against the first ground-truth box, or 0 when no box can be read; an IoU below
  ``iou_threshold`` counts 0 (DeepPerception's ``IoU if IoU > tau``; the default 0 keeps the
  plain IoU). For ``detection`` rows: the F1 of the answer's boxes against the ground truth at
  IoU >= ``match_iou`` (0.5) under a one-to-one Hungarian matching (scipy), 1 when both are
  empty.
- ``format_ok``: 1 when the completion is exactly one ``<think>...</think>`` then one
  ``<answer>...</answer>`` (whitespace aside), else 0. ``format_weight`` defaults to 0, so the
  default score is the accuracy alone, in [0, 1].

Boxes are read with the codec named in ``ground_truth`` (with its parameters), in the frame of
the exported image whose size ``ground_truth`` holds; a box in an ``<answer>`` block wins over
boxes elsewhere (:func:`groundforge.schemas.codecs.extract_quads`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from groundforge.schemas.answer import split_think_answer
from groundforge.schemas.box import Box, match_boxes
from groundforge.schemas.codecs import get_codec


def format_ok(text: object) -> bool:
    """One think block then one answer block, both non-empty, nothing else but whitespace.

    >>> format_ok("<think>left</think> <answer>[1, 2, 3, 4]</answer>"), format_ok("[1, 2, 3, 4]")
    (True, False)
    """
    parts = split_think_answer(text)
    return parts is not None and all(parts)


def detection_f1(pred: Sequence[Box], gt: Sequence[Box], match_iou: float = 0.5) -> float:
    """F1 of one-to-one matches (Hungarian on IoU) with IoU >= ``match_iou``.

    >>> detection_f1([Box(0, 0, 10, 10), Box(50, 50, 60, 60)], [Box(0, 0, 10, 10)])
    0.6666666666666666
    """
    if not pred and not gt:
        return 1.0
    matched = len(match_boxes(pred, gt, match_iou))
    return 2 * matched / (len(pred) + len(gt))


def _truth(ground_truth: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(ground_truth, Mapping):
        return ground_truth
    return json.loads(ground_truth)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str | Mapping[str, Any],
    extra_info: Mapping[str, Any] | None = None,
    format_weight: float = 0.0,
    iou_threshold: float = 0.0,
    match_iou: float = 0.5,
) -> float:
    """The reward of one completion (see the module doc for the formula).

    ``data_source`` and ``extra_info`` are verl's and not needed: the task, the codec, the
    image size and the boxes are all in ``ground_truth`` (the JSON string of the export, or
    that object already parsed).
    """
    truth = _truth(ground_truth)
    codec = get_codec(truth["codec"], **dict(truth.get("codec_params") or {}))
    width, height = int(truth["width"]), int(truth["height"])
    fw, fh = codec.frame(width, height)
    gt = [
        Box(x1 * width / fw, y1 * height / fh, x2 * width / fw, y2 * height / fh)
        for x1, y1, x2, y2 in truth["boxes"]
    ]
    pred = codec.parse(solution_str, width, height)
    if truth.get("task", "kvg") == "detect":
        accuracy = detection_f1(pred, gt, match_iou)
    else:
        iou = pred[-1].iou(gt[0]) if pred and gt else 0.0
        accuracy = iou if iou >= iou_threshold else 0.0
    score = accuracy
    if format_weight:
        score += format_weight * float(format_ok(solution_str))
    return float(score)
