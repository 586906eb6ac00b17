"""Pass@k counting and the sft / grpo split it decides."""

from __future__ import annotations

import doctest

import pytest

import groundforge.filters.difficulty as difficulty_module
from groundforge.filters.difficulty import SplitRule, count_correct, split_by_difficulty
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec

PIXEL = get_codec("pixel")
TARGET = Box(0, 0, 50, 50)
RIGHT = "<think>the left one</think><answer>[0, 0, 50, 50]</answer>"
WRONG = "<think>the right one</think><answer>[60, 60, 99, 99]</answer>"


def test_doctests():
    assert doctest.testmod(difficulty_module).failed == 0


def count(texts, codec=PIXEL, min_iou=0.5):
    return count_correct(texts, TARGET, 100, 100, codec, min_iou)


@pytest.mark.parametrize(
    ("text", "right"),
    [
        (None, False),
        ("", False),
        ("garbage", False),
        ("<answer>[0, 0, 50, 50", False),  # cut before the box closes
        (RIGHT, True),
        (WRONG, False),
        ("[0, 0, 50, 50]", True),  # no tags: a box anywhere
        ("<answer>[60, 60, 99, 99], then [0, 0, 50, 50]</answer>", True),  # last box wins
        ("<answer>[0, 0, 50, 50], then [60, 60, 99, 99]</answer>", False),
        ("<think>[0, 0, 50, 50]</think><answer>[60, 60, 99, 99]</answer>", False),  # answer first
        ("<answer>[0, 0, 50, 100]</answer>", True),  # IoU exactly 0.5
        ("<answer>[0, 0, 51, 100]</answer>", False),  # IoU 2500 / 5100, just under 0.5
    ],
)
def test_each_answer(text, right):
    assert count([text]) == int(right)


def test_count_over_k_answers():
    assert count([]) == 0
    assert count([RIGHT, None, WRONG, RIGHT]) == 2
    assert count([RIGHT] * 4) == 4
    assert count([RIGHT, "<answer>[0, 0, 50, 100]</answer>"], min_iou=0.51) == 1


def test_count_in_the_student_codec():
    norm1000 = get_codec("norm1000")
    texts = [
        "<answer><|box_start|>(0,0),(500,500)<|box_end|></answer>",
        "<answer>(0,0),(1000,1000)",
    ]
    assert count(texts, norm1000) == 1
    assert count(["<answer>[0, 0, 50, 50]</answer>"], norm1000) == 0  # 0..1000 frame: tiny box


SPLITS = {
    # correct: (none_correct="sft", none_correct="drop")
    0: ("sft", None),
    1: ("grpo", "grpo"),
    2: ("grpo", "grpo"),
    3: ("grpo", "grpo"),
    4: ("sft", "sft"),
}


@pytest.mark.parametrize("correct", sorted(SPLITS))
@pytest.mark.parametrize("none_correct", ["sft", "drop"])
def test_split_table_for_k_4(correct, none_correct):
    expected = SPLITS[correct][none_correct == "drop"]
    v = split_by_difficulty(correct, 4, SplitRule(none_correct=none_correct))
    assert v.metrics == {"correct": correct, "k": 4}
    if expected is None:
        assert (v.keep, v.reason) == (False, "student_none_correct")
    else:
        assert (v.keep, v.value) == (True, expected)


def test_default_rule_and_k_1():
    assert split_by_difficulty(0, 4).value == "sft"
    assert [split_by_difficulty(c, 1).value for c in (0, 1)] == ["sft", "sft"]


@pytest.mark.parametrize(("correct", "k"), [(5, 4), (-1, 4), (0, 0)])
def test_impossible_counts_raise(correct, k):
    with pytest.raises(ValueError, match="0 <= correct <= k"):
        split_by_difficulty(correct, k)


def test_bad_rules_raise():
    with pytest.raises(ValueError, match="none_correct"):
        SplitRule(none_correct="grpo")
    with pytest.raises(ValueError, match="all_correct"):
        SplitRule(all_correct="drop")
