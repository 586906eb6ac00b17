"""The published KVG-Bench scorer: its eight-pattern cascade on hand-written completions (per
pattern, precedence between patterns, last match wins, the 0..1 scaling, no match), its IoU
(float32, no clipping, degenerate boxes 0) and the instance-weighted Acc@0.5 and mean IoU."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.trainer import kvgbench_score
from groundforge.trainer.evaluate import BenchItem, evaluate
from groundforge.trainer.kvgbench_score import (
    PATTERN_NAMES,
    aggregate,
    best_iou,
    reference_box,
    reference_iou,
    reference_match,
)

NO_BOX = (0.0, 0.0, 0.0, 0.0)


def test_doctests():
    result = doctest.testmod(kvgbench_score)
    assert result.attempted > 0 and result.failed == 0


def test_the_cascade_order():
    assert PATTERN_NAMES == (
        "answer_point_pair",
        "so_the_answer_is",
        "point_pair",
        "loose_point_pair",
        "int_list",
        "list",
        "int_tuple",
        "split_point_pair",
    )


# (completion, expected box, the pattern that decides)
CASES = {
    "answer_point_pair": [
        # wins over an earlier pair in <think> and over a later bare pair
        ("<think>(1,1),(9,9)</think><answer>(100,200),(300,400)</answer>", (100, 200, 300, 400)),
        ("<answer>(100,200),(300,400)</answer> then (5,5),(50,50)", (100, 200, 300, 400)),
        # wins over "So the answer is"
        ("<answer>(1,2),(300,400)</answer> So the answer is (10,20),(30,40)", (1, 2, 300, 400)),
        # a label and a space after the first comma are allowed
        ("<answer>Boeing 757(10, 20),(30,40)</answer>", (10, 20, 30, 40)),
        # the last block wins
        ("<answer>(1,2),(3,4)</answer> <answer>(10,20),(30,40)</answer>", (10, 20, 30, 40)),
        # values summing to < 4 are fractions
        ("<answer>(0,0),(1,1)</answer>", (0, 0, 1000, 1000)),
    ],
    "so_the_answer_is": [
        # wins over earlier and later integer pairs
        (
            "(1,1),(9,9) and (2,2),(8,8). So the answer is (100,200),(300,400).",
            (100, 200, 300, 400),
        ),
        ("So the answer is (10,20),(30,40). Later (50,60),(70,80)", (10, 20, 30, 40)),
        ("So the answer is (1,2),(3,4). So the answer is (10,20),(30,40)", (10, 20, 30, 40)),
        # the box must end its <answer> block for pattern 1: here pattern 2 decides
        ("<answer>(1,2),(3,4).</answer> So the answer is (10,20),(30,40)", (10, 20, 30, 40)),
    ],
    "point_pair": [
        ("<|box_start|>(100,200),(300,400)<|box_end|>", (100, 200, 300, 400)),
        ("Beagle(100, 200),(300,400)", (100, 200, 300, 400)),
        # the last match; lists before or after do not count
        ("(1,1),(10,10) and (2,2),(20,20)", (2, 2, 20, 20)),
        ("[1, 2, 30, 40] then (5,6),(70,80)", (5, 6, 70, 80)),
        ("(5,6),(70,80) then [1, 2, 30, 40]", (5, 6, 70, 80)),
        # "So the answer is" is case-sensitive
        ("so the answer is (10,20),(30,40) and (50,60),(70,80)", (50, 60, 70, 80)),
        # pattern 1 does not cross lines, pattern 3 reads the pair
        ("<answer>\n(1,2),(3,4)\n</answer>", (1, 2, 3, 4)),
        # nor a box followed by other text in the block
        ("<answer>(100,200),(300,400).</answer>", (100, 200, 300, 400)),
        # anything on the line may come between "x1," and "y1)"
        ("(1, 2) and (3,4),(5,6)", (1, 4, 5, 6)),
        # fractions; a sum of exactly 4 is not scaled
        ("(0,0),(1,2)", (0, 0, 1000, 2000)),
        ("(1,1),(1,1)", (1, 1, 1, 1)),
        # a match that does not read as numbers is (0, 0, 0, 0) and still decides
        ("(,5),(3,4) and later [10, 20, 30, 40]", NO_BOX),
    ],
    "loose_point_pair": [
        ("from (100, 200) to (300, 400)", (100, 200, 300, 400)),
        ("from (-10.5, 20) to (30, 40.25)", (-10.5, 20, 30, 40.25)),
        ("from (0.1, 0.2) to (0.3, 0.4)", (100, 200, 300, 400)),
        ("(0.1,0.2),(0.3,0.4)", (100, 200, 300, 400)),
        ("(100, 200), (300, 400)", (100, 200, 300, 400)),
        ("(1, 2) to (3, 4); (10, 20) to (30, 40)", (10, 20, 30, 40)),
        # two parenthesised phrases on one line decide, even without numbers
        ("the one (a Boeing, white) next to (an Airbus, grey): [100, 200, 300, 400]", NO_BOX),
        ("(5, 5, 50, 50) and (7, 7, 70, 70)", NO_BOX),
    ],
    "int_list": [
        ('[{"bbox_2d": [100, 200, 300, 400], "label": "Beagle"}]', (100, 200, 300, 400)),
        (
            '```json\n[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [1, 2, 3, 40]}]\n```',
            (1, 2, 3, 40),
        ),
        ("[1, 1, 10, 10], [2, 2, 20, 20]", (2, 2, 20, 20)),
        ("[0, 0, 1, 2]", (0, 0, 1000, 2000)),
        # an integer list wins over an earlier decimal one and over tuples
        ("[10.5, 20, 30, 40] then [1, 2, 30, 40]", (1, 2, 30, 40)),
        ("(5, 5, 50, 50) [6, 6, 60, 60]", (6, 6, 60, 60)),
    ],
    "list": [
        ("[0.5, 0.5, 1.0, 1.5]", (500, 500, 1000, 1500)),
        ("[10.5, 20, 30.25, 40]", (10.5, 20, 30.25, 40)),
        ("[-10, 20, 30, 40]", (-10, 20, 30, 40)),
        ("[0.1, 0.2, 0.3, 0.4] or [10.5, 20.5, 30.5, 40.5]", (10.5, 20.5, 30.5, 40.5)),
        ("[1, 0.5, 1, 1.5]", (1, 0.5, 1, 1.5)),
        # wins over an integer tuple; an "x" before the first value is dropped
        ("(10, 20, 30, 40) then [1.5, 2, 3, 4]", (1.5, 2, 3, 4)),
        ("[x100, 200, 300, 400]", (100, 200, 300, 400)),
        ("[left, top, right, bottom]", NO_BOX),
    ],
    "int_tuple": [
        ("(100, 300, 900, 700)", (100, 300, 900, 700)),
        ("(5, 5, 50, 50)\n(7, 7, 70, 70)", (7, 7, 70, 70)),
        ("(0, 0, 1, 1)", (0, 0, 1000, 1000)),
    ],
    "split_point_pair": [
        ("(100, 200)\n(300, 400)", (100, 200, 300, 400)),
        ("top left (100, 200)\nbottom right (300, 400)", (100, 200, 300, 400)),
        ("(1, 2)\n(3, 4)\n(10, 20)\n(30, 40)", (10, 20, 30, 40)),
        ("(0, 0)\n(1, 1)", (0, 0, 1000, 1000)),
    ],
    None: [
        ("I cannot find it.", NO_BOX),
        ("", NO_BOX),
        (None, NO_BOX),
        ("[10, 20, 30]", NO_BOX),
        # the list and tuple patterns need ", " between values
        ("[100,200,300,400]", NO_BOX),
        ('{"bbox_2d":[100,200,300,400]}', NO_BOX),
        # an integer tuple pattern does not read decimals
        ("(0.1, 0.2, 0.3, 0.4)", NO_BOX),
        # the second pair of a split pair must start on the next line
        ("(100, 200),\n(300, 400)", NO_BOX),
        ("(100,200)\n(300,400)", NO_BOX),
    ],
}
TABLE = [(text, box, pattern) for pattern, rows in CASES.items() for text, box in rows]


@pytest.mark.parametrize(("text", "expected", "pattern"), TABLE)
def test_reference_box(text, expected, pattern):
    found = reference_match(text)
    assert found.pattern == pattern
    assert found.number == (0 if pattern is None else PATTERN_NAMES.index(pattern) + 1)
    assert found.box == pytest.approx(tuple(float(v) for v in expected), abs=1e-9)
    assert reference_box(text) == found.box


def test_every_pattern_has_three_cases():
    assert all(len(CASES[name]) >= 3 for name in PATTERN_NAMES)


# -- IoU -------------------------------------------------------------------------------------


def test_reference_iou():
    gt = (0, 0, 100, 100)
    assert reference_iou(gt, gt) == 1.0
    assert reference_iou((0, 0, 100, 50), gt) == 0.5
    assert reference_iou((50, 0, 150, 100), gt) == float(np.float32(5000) / np.float32(15000))
    assert reference_iou((200, 200, 300, 300), gt) == 0.0
    # not clipped: the part outside the frame counts in the union
    assert reference_iou((-100, 0, 100, 100), gt) == 0.5
    assert reference_iou((500, 500, 1500, 1500), (500, 500, 1000, 1000)) == 0.25
    # inverted (both axes, one axis) and degenerate boxes score 0
    assert reference_iou((100, 100, 0, 0), gt) == 0.0
    assert reference_iou((100, 0, 0, 100), gt) == 0.0
    assert reference_iou(NO_BOX, gt) == 0.0
    assert reference_iou((10, 10, 10, 50), gt) == 0.0
    assert reference_iou(gt, (100, 100, 0, 0)) == 0.0
    with pytest.raises(ValueError, match="4 values"):
        reference_iou((0, 0, 1), gt)


def test_reference_iou_is_float32():
    # in float64 this IoU is just under 0.5; the reference computes in float32, where it is 0.5
    pred, gt = (0, 0, 1, 1), (0, 0, 1, 2.0000001)
    assert 1 / 2.0000001 < 0.5
    assert reference_iou(pred, gt) == 0.5


def test_best_iou():
    pred = (0, 0, 100, 100)
    assert best_iou(pred, [(0, 0, 100, 50), (0, 0, 100, 100), (0, 0, 50, 50)]) == 1.0
    assert best_iou(pred, [(0, 0, 100, 50), (0, 0, 400, 100)]) == 0.5
    assert best_iou(pred, []) == 0.0


# -- accuracy --------------------------------------------------------------------------------

GT = (0.0, 0.0, 100.0, 100.0)
# (category, answer box, completion, its IoU by hand)
COMPLETIONS = [
    ("aircraft", GT, "<think>(0,0),(1000,1000)</think><answer>(0,0),(100,100)</answer>", 1.0),
    ("car", GT, "(5,5),(9,9) So the answer is (0,0),(100,50)", 0.5),
    ("bird", GT, "[0, 0, 0.1, 0.05]", 0.5),  # (0, 0, 100, 50)
    ("food", (0.0, 0.0, 400.0, 100.0), "from (0, 0) to (100, 100)", 0.25),
    ("dog", GT, "I do not know this dog.", 0.0),
    ("mammal", GT, "(0, 0)\n(100, 100)", 1.0),
    ("flower", GT, "(100,100),(0,0)", 0.0),  # inverted
    ("landmark", GT, "[0, 0, 100, 100] or (50, 50, 100, 100)", 1.0),
]
# seen: 1, .5, .5, .25 -> 3 of 4 correct, mIoU 2.25 / 4; unseen: 0, 1, 0, 1 -> 2 of 4, 2 / 4
EXPECTED = {
    "seen": (4, 3, 75.0, 0.5625),
    "unseen": (4, 2, 50.0, 0.5),
    "all": (8, 5, 62.5, 0.53125),
}


def test_aggregate_by_hand():
    scored = []
    for category, gt, text, iou in COMPLETIONS:
        got = best_iou(reference_box(text), [gt])
        assert got == iou, text
        scored.append((category, got))
    metrics = aggregate(scored)
    for name, (n, correct, acc, miou) in EXPECTED.items():
        assert (metrics[name]["n"], metrics[name]["correct"]) == (n, correct)
        assert metrics[name]["acc"] == acc and metrics[name]["miou"] == miou
    assert list(metrics["categories"]) == [c for c, *_ in COMPLETIONS]
    assert metrics["categories"]["food"] == {"n": 1, "correct": 0, "acc": 0.0, "miou": 0.25}


def test_aggregate_groups():
    metrics = aggregate([("flag", 1.0), ("dog", 0.5), ("bird", 0.49), ("flag", 0.0)])
    # seen first, then unseen, then the others; an unlisted category counts in "all" only
    assert list(metrics["categories"]) == ["bird", "dog", "flag"]
    assert metrics["categories"]["flag"] == {"n": 2, "correct": 1, "acc": 50.0, "miou": 0.5}
    assert (metrics["seen"]["n"], metrics["seen"]["correct"]) == (1, 0)
    assert (metrics["unseen"]["n"], metrics["unseen"]["correct"]) == (1, 1)
    assert (metrics["all"]["n"], metrics["all"]["correct"]) == (4, 2)
    assert aggregate([])["all"] == {"n": 0, "correct": 0, "acc": None, "miou": None}
    with pytest.raises(ValueError, match="finite"):
        aggregate([("dog", float("nan"))])


class Replies:
    """A backend answering each item id with a fixed text."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def answer(self, requests):
        return [TeacherReply(r.item_id, text=self.texts[r.item_id]) for r in requests]


def test_evaluate_scores_with_the_cascade_by_default():
    items = [
        BenchItem(str(i), category, "q", (gt,), b"", 1000, 1000)
        for i, (category, gt, _, _) in enumerate(COMPLETIONS)
    ]
    texts = {str(i): text for i, (_, _, text, _) in enumerate(COMPLETIONS)}
    report = evaluate(items, Replies(texts))
    assert report.config["scorer"] == "kvgbench"
    assert [p.iou for p in report.predictions] == [iou for *_, iou in COMPLETIONS]
    g = report.metrics["grounding"]
    for name, (n, correct, acc, miou) in EXPECTED.items():
        assert (g[name]["n"], g[name]["correct"], g[name]["acc"], g[name]["miou"]) == (
            n,
            correct,
            acc,
            miou,
        )
    assert g["all"]["no_box"] == 1
    assert g["patterns"] == {
        "none": 1,
        "answer_point_pair": 1,
        "so_the_answer_is": 1,
        "point_pair": 1,
        "loose_point_pair": 1,
        "int_list": 1,
        "list": 1,
        "split_point_pair": 1,
    }
