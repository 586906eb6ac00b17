"""Difficulty by pass@k: how often the CoT-SFT student finds the target, and the split it decides.

Data engine step 6: sample the SFT model 4 times per item and keep for RL (GRPO) the items it gets
right 1 to 3 times. Those are the items whose reward varies within a group of rollouts; an item
always or never solved gives every rollout the same reward and so no learning signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from groundforge.filters.verdict import Verdict
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import BoxCodec


def count_correct(
    texts: Sequence[str | None],
    target: Box,
    width: int,
    height: int,
    codec: BoxCodec,
    min_iou: float = 0.5,
) -> int:
    """How many of the student's answers put their last box at IoU >= ``min_iou`` with ``target``.

    A missing answer (None, a failed request) or one without a readable box counts as wrong.

    >>> from groundforge.schemas.codecs import get_codec
    >>> texts = ["<answer>[0, 0, 50, 50]</answer>", "<answer>[60, 60, 99, 99]</answer>", None]
    >>> count_correct(texts, Box(0, 0, 50, 50), 100, 100, get_codec("pixel"))
    1
    """
    correct = 0
    for text in texts:
        box = codec.parse_last(text, width, height)
        if box is not None and box.iou(target) >= min_iou:
            correct += 1
    return correct


@dataclass(frozen=True)
class SplitRule:
    """Where items the student always or never solves go; the rest (1..k-1 right) go to ``grpo``.

    ``none_correct="sft"`` (the default) keeps the hardest items as CoT-SFT targets, where the
    teacher's rationale still teaches something; ``"drop"`` discards them as possibly mislabelled.
    Items always solved can only go to ``sft``: RL on them has no signal.
    """

    none_correct: Literal["sft", "drop"] = "sft"
    all_correct: Literal["sft"] = "sft"

    def __post_init__(self) -> None:
        if self.none_correct not in ("sft", "drop"):
            raise ValueError(f"none_correct must be 'sft' or 'drop', got {self.none_correct!r}")
        if self.all_correct != "sft":
            raise ValueError(f"all_correct must be 'sft', got {self.all_correct!r}")


def split_by_difficulty(correct: int, k: int, rule: SplitRule = SplitRule()) -> Verdict:
    """The split for an item the student got right ``correct`` times out of ``k``.

    Keeps with the split name as value; drops ``student_none_correct`` when the rule says so.
    Metrics carry ``correct`` and ``k``.

    >>> [split_by_difficulty(c, 4).value for c in range(5)]
    ['sft', 'grpo', 'grpo', 'grpo', 'sft']
    >>> split_by_difficulty(0, 4, SplitRule(none_correct="drop")).reason
    'student_none_correct'
    """
    if k < 1 or not 0 <= correct <= k:
        raise ValueError(f"need k >= 1 and 0 <= correct <= k, got correct={correct}, k={k}")
    if correct == k:
        return Verdict.ok(rule.all_correct, correct=correct, k=k)
    if correct == 0:
        if rule.none_correct == "drop":
            return Verdict.drop("student_none_correct", correct=correct, k=k)
        return Verdict.ok(rule.none_correct, correct=correct, k=k)
    return Verdict.ok("grpo", correct=correct, k=k)
