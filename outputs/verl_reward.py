"""verl's custom reward function for the rows :func:`groundforge.outputs.export.export_verl` writes.

Point verl at it with ``custom_reward_function.path=<this file>`` and
``custom_reward_function.name=compute_score`` (``groundforge`` must be importable in verl's
workers); extra keyword arguments come from ``custom_reward_function.reward_kwargs``.

The score is the GRPO trainer's own: ``compute_score`` runs the reward functions of
:mod:`groundforge.trainer.rewards` on the one completion, with the columns the trainer would
see (task, true boxes in pixels of the exported image, its size, ``knowledge_level`` from
``extra_info`` when present), and returns ``sum(weight * reward)`` over the rewards that apply
to the row's task (the others give None and are skipped, like TRL's ``nansum``). So the
parsing (the last ``<answer>`` block is required, boxes read as written in the codec's frame),
the thresholds and the format rules are the trainer's, by construction.

``rewards`` names a trainer preset (``deepperception``, ``karl``, ``dip_r1``) or is a spec as
``grpo.rewards`` takes (:func:`groundforge.trainer.rewards.build_rewards`). Without it the spec
is the accuracy plus an optional format term:

- ``grounding`` rows (task ``kvg``): ``iou_thresholded`` with ``tau = iou_threshold`` (IoU of
  the last answer box if IoU > ``iou_threshold``, else 0; the default 0 keeps the plain IoU)
  plus ``format_weight`` x ``think_answer_format``;
- ``detection`` rows: ``weighted_precision_recall`` at IoU >= ``match_iou`` (0.5) plus
  ``format_weight`` x ``think_look_answer_format``.

verl scores each completion alone, so a group-level reward (``variance_guided_looking``) sees a
group of one rollout and pays 0, exactly as the trainer pays a group of one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.trainer import rewards as trainer_rewards


def _truth(ground_truth: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(ground_truth, Mapping):
        return ground_truth
    return json.loads(ground_truth)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def default_spec(
    task: str, format_weight: float = 0.0, iou_threshold: float = 0.0, match_iou: float = 0.5
) -> dict[str, Any]:
    """The reward spec of ``compute_score`` without ``rewards`` (see the module doc).

    >>> default_spec("kvg", format_weight=0.5)
    {'iou_thresholded': {'weight': 1.0, 'tau': 0.0}, 'think_answer_format': 0.5}
    """
    if task == "detect":
        return {
            "weighted_precision_recall": {"weight": 1.0, "iou": match_iou},
            "think_look_answer_format": format_weight,
        }
    return {
        "iou_thresholded": {"weight": 1.0, "tau": iou_threshold},
        "think_answer_format": format_weight,
    }


PRESETS: Mapping[str, Mapping[str, Any]] = {
    "deepperception": trainer_rewards.DEEPPERCEPTION,
    "karl": trainer_rewards.KARL,
    "dip_r1": trainer_rewards.DIP_R1,
}


def _spec(rewards: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(rewards, str):
        return rewards
    name = rewards.strip().lower().replace("-", "_")
    if name not in PRESETS:
        raise ValueError(f"rewards: no preset called {rewards!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


@lru_cache(maxsize=64)
def _built(spec_json: str, codec_json: str) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    name, params = json.loads(codec_json)
    funcs, weights = trainer_rewards.build_rewards(json.loads(spec_json), get_codec(name, **params))
    return tuple(funcs), tuple(weights)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str | Mapping[str, Any],
    extra_info: Mapping[str, Any] | None = None,
    format_weight: float = 0.0,
    iou_threshold: float = 0.0,
    match_iou: float = 0.5,
    rewards: str | Mapping[str, Any] | None = None,
) -> float:
    """The trainer's reward of one completion (see the module doc for the spec).

    ``data_source`` is verl's and not needed: the task, the codec, the image size and the boxes
    are all in ``ground_truth`` (the JSON string of the export, or that object already parsed).
    """
    truth = _truth(ground_truth)
    task = truth.get("task") or "kvg"
    if rewards is None:
        spec = default_spec(task, format_weight, iou_threshold, match_iou)
    else:
        spec = _spec(rewards)
    codec_params = dict(truth.get("codec_params") or {})
    funcs, weights = _built(
        json.dumps(_plain(spec)),  # in the spec's order: the sum adds terms in that order
        json.dumps([truth["codec"], codec_params], sort_keys=True),
    )
    codec = get_codec(truth["codec"], **codec_params)
    width, height = int(truth["width"]), int(truth["height"])
    fw, fh = codec.frame(width, height)
    gt = [
        Box(x1 * width / fw, y1 * height / fh, x2 * width / fw, y2 * height / fh).to_list()
        for x1, y1, x2, y2 in truth["boxes"]
    ]
    columns = {
        "task": [task],
        "gt_boxes": [gt],
        "width": [width],
        "height": [height],
        "knowledge_level": [(extra_info or {}).get("knowledge_level")],
        "sample_id": [None],
    }
    score = 0.0
    for func, weight in zip(funcs, weights, strict=True):
        (value,) = func(None, [solution_str], **columns)
        if value is not None:
            score += weight * value
    return float(score)
