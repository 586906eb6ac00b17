"""GRPO rewards: exact values on hand-written completions in every codec."""

import doctest
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.trainer import rewards as rewards_module
from groundforge.trainer.rewards import (
    DEEPPERCEPTION,
    DIP_R1,
    KARL,
    REWARDS,
    build_rewards,
    completion_text,
    iou_reward,
    karl_iou,
    parsable_box,
    think_answer_format,
    think_look_answer_format,
    variance_guided_looking,
    weighted_precision_recall,
)

W, H = 1120, 840
# Every codec, built as a trainer would; the Qwen2.5-VL one resizes 1120 x 840 to 560 x 420.
CODECS = {
    "pixel": get_codec("pixel"),
    "norm1000": get_codec("norm1000"),
    "norm1000-plain": get_codec("norm1000", tokens=False),
    "qwen25vl": get_codec("qwen25vl", max_pixels=560 * 420),
    "qwen3vl": get_codec("qwen3vl"),
    "norm01": get_codec("norm01"),
}
codec_names = pytest.mark.parametrize("codec_name", list(CODECS))

# KVG: every coordinate is a whole step of every frame (1.12 px x 0.84 px for 0..1000, 2 px for
# the resized frame, 0.001 of the image for norm01), so rendering and parsing are exact.
GT = Box(224, 168, 560, 504)  # 336 x 336 = 112896 px
WRONG = Box(784, 588, 1008, 756)  # disjoint from GT
PARTIAL = Box(280, 168, 616, 504)  # inter 280 x 336 = 94080, union 131712: IoU 5/7
HALF = Box(336, 168, 672, 504)  # inter 224 x 336 = 75264, union 150528: IoU 1/2 exactly
FIFTH = Box(448, 168, 784, 504)  # inter 112 x 336 = 37632, union 188160: IoU 1/5
THINK = "<think>Two airliners; the one with the T-tail and four engines is the target.</think>"


def kvg_cols(n, **extra):
    cols = {
        "task": ["kvg"] * n,
        "gt_boxes": [[GT.to_list()]] * n,
        "width": [W] * n,
        "height": [H] * n,
        "target": ["Boeing 757"] * n,
        "knowledge_level": [2] * n,
        "sample_id": ["s0"] * n,
    }
    cols.update(extra)
    return cols


def render(codec, *boxes, label="Boeing 757"):
    if len(boxes) == 1:
        return codec.render(boxes[0], W, H, label=label)
    return codec.render_many(list(boxes), W, H, labels=[label] * len(boxes))


def truncated(codec, box):
    """The answer cut two characters after its first comma: no complete box left."""
    full = render(codec, box)
    return full[: full.index(",") + 2]


# name -> (text builder, format, parsable, IoU, (GIoU + 1) / 2)
KVG_CASES = {
    "right": (lambda c: f"{THINK}<answer>{render(c, GT)}</answer>", 1, 1, 1.0, 1.0),
    # hull 784 x 588 = 460992, union 150528: GIoU = -1 + 16/49, mapped 8/49
    "wrong": (lambda c: f"{THINK}<answer>{render(c, WRONG)}</answer>", 1, 1, 0.0, 8 / 49),
    # side by side at equal heights: the hull is the union, GIoU = IoU
    "partial": (lambda c: f"{THINK}\n<answer>{render(c, PARTIAL)}</answer>\n", 1, 1, 5 / 7, 6 / 7),
    "half": (lambda c: f"{THINK}<answer>{render(c, HALF)}</answer>", 1, 1, 0.5, 0.75),
    "fifth": (lambda c: f"{THINK}<answer>{render(c, FIFTH)}</answer>", 1, 1, 0.2, 0.6),
    "malformed": (lambda c: f"{THINK}<answer>the left aircraft</answer>", 1, 0, None, None),
    # the think holds the right box: it must not be used when the answer is cut
    "truncated": (
        lambda c: f"<think>candidate {render(c, GT)}</think><answer>{truncated(c, GT)}",
        0,
        0,
        None,
        None,
    ),
    "empty": (lambda c: "", 0, 0, None, None),
    "no_tags": (lambda c: render(c, GT), 0, 0, None, None),
    "two_boxes_last_right": (
        lambda c: f"{THINK}<answer>{render(c, WRONG, GT)}</answer>",
        1,
        0,  # a KVG answer holds one box: several are no parsable box
        1.0,
        1.0,
    ),
    "two_boxes_last_wrong": (
        lambda c: f"{THINK}<answer>{render(c, GT, WRONG)}</answer>",
        1,
        0,  # a KVG answer holds one box: several are no parsable box
        0.0,
        8 / 49,
    ),
    "duplicate_boxes": (
        lambda c: f"{THINK}<answer>{render(c, PARTIAL, PARTIAL)}</answer>",
        1,
        0,  # a KVG answer holds one box: several are no parsable box
        5 / 7,
        6 / 7,
    ),
    "two_answer_blocks": (
        lambda c: f"<answer>{render(c, GT)}</answer>{THINK}<answer>{render(c, HALF)}</answer>",
        0,
        1,
        0.5,
        0.75,
    ),
    "empty_think": (lambda c: f"<think> </think><answer>{render(c, GT)}</answer>", 0, 1, 1.0, 1.0),
    "text_outside": (lambda c: f"Sure! {THINK}<answer>{render(c, GT)}</answer>", 0, 1, 1.0, 1.0),
}


def approx(values):
    return [None if v is None else pytest.approx(v, abs=1e-9) for v in values]


@pytest.mark.parametrize("case", list(KVG_CASES))
@codec_names
def test_kvg_rewards_exact_in_every_codec(codec_name, case):
    codec = CODECS[codec_name]
    build, fmt, parsable, iou, giou = KVG_CASES[case]
    text = build(codec)
    cols = kvg_cols(1)
    iou0 = 0.0 if iou is None else iou

    assert think_answer_format(None, [text], **cols) == [float(fmt)]
    assert parsable_box(codec)(None, [text], **cols) == [float(parsable)]
    assert iou_reward(codec)(None, [text], **cols) == approx([iou0])
    assert iou_reward(codec, "thresholded")(None, [text], **cols) == approx(
        [iou0 if iou0 > 0.5 else 0.0]
    )
    assert iou_reward(codec, "thresholded", tau=0.85)(None, [text], **cols) == approx(
        [1.0 if iou0 == 1.0 else 0.0]
    )
    assert iou_reward(codec, "squared")(None, [text], **cols) == approx([iou0**2])
    assert iou_reward(codec, "giou")(None, [text], **cols) == approx([giou or 0.0])


@codec_names
def test_fixture_boxes_round_trip_exactly(codec_name):
    codec = CODECS[codec_name]
    for box in (GT, WRONG, PARTIAL, HALF, FIFTH):
        (parsed,) = codec.parse(render(codec, box), W, H)
        assert np.allclose(parsed.to_list(), box.to_list(), atol=1e-9)
    assert GT.iou(PARTIAL) == pytest.approx(5 / 7) and GT.iou(HALF) == 0.5


def test_thresholded_is_strict_and_values_at_the_boundary():
    codec = CODECS["pixel"]
    text = f"{THINK}<answer>{render(codec, HALF)}</answer>"  # IoU exactly 0.5
    assert iou_reward(codec, "thresholded", tau=0.5)(None, [text], **kvg_cols(1)) == [0.0]
    assert iou_reward(codec, "thresholded", tau=0.49)(None, [text], **kvg_cols(1)) == [0.5]
    assert iou_reward(codec, "continuous")(None, [text], **kvg_cols(1)) == [0.5]


def test_reward_names_are_what_trl_logs():
    codec = CODECS["pixel"]
    assert [iou_reward(codec, v).__name__ for v in ("continuous", "thresholded", "squared")] == [
        "iou_continuous",
        "iou_thresholded",
        "iou_squared",
    ]
    assert iou_reward(codec, "giou").__name__ == "iou_giou"
    assert parsable_box(codec).__name__ == "parsable_box"
    assert karl_iou(codec).__name__ == "karl_iou"
    assert think_answer_format.__name__ == "think_answer_format"
    assert think_look_answer_format(codec).__name__ == "think_look_answer_format"
    assert weighted_precision_recall(codec).__name__ == "weighted_precision_recall"
    assert variance_guided_looking(codec).__name__ == "variance_guided_looking"


def test_giou_of_disjoint_boxes():
    codec = CODECS["pixel"]
    f = iou_reward(codec, "giou")
    cols = kvg_cols(2, gt_boxes=[[[0, 0, 10, 10]]] * 2)
    # 10 px apart: hull 30 x 10 = 300, union 200, GIoU = -1/3; touching: GIoU = 0
    texts = ["<answer>[20, 0, 30, 10]</answer>", "<answer>[10, 0, 20, 10]</answer>"]
    assert f(None, texts, **cols) == approx([1 / 3, 0.5])
    # farther apart is worse; unparsable is 0, below every box
    far = f(None, ["<answer>[500, 400, 510, 410]</answer>", "<answer>x</answer>"], **cols)
    assert 0 < far[0] < 1 / 3 and far[1] == 0.0


@codec_names
def test_conversational_completions_score_as_strings(codec_name):
    codec = CODECS[codec_name]
    texts = [build(codec) for build, *_ in KVG_CASES.values()]
    plain = [{"role": "assistant", "content": t} for t in texts]
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": t[:5]}, {"type": "text", "text": t[5:]}],
        }
        for t in texts
    ]
    cols = kvg_cols(len(texts))
    for f in (think_answer_format, parsable_box(codec), iou_reward(codec, "giou"), karl_iou(codec)):
        expected = f(None, texts, **cols)
        assert f(None, [[m] for m in plain], **cols) == expected
        assert f(None, [[m] for m in parts], **cols) == expected


def test_completion_text_forms():
    assert completion_text(None) == ""
    assert completion_text("abc") == "abc"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    image_part = {"type": "image"}
    msg = {"role": "assistant", "content": [image_part, {"type": "text", "text": "y"}]}
    assert completion_text([msg]) == "y"
    assert completion_text([{"role": "tool", "content": "[1, 2, 3, 4]"}, msg]) == "y"
    with pytest.raises(TypeError):
        completion_text(42)


def test_kvg_rewards_are_none_on_detect_rows_and_detect_rewards_on_kvg_rows():
    codec = CODECS["pixel"]
    text = f"{THINK}<answer>{render(codec, GT)}</answer>"
    cols = kvg_cols(3, task=["kvg", "detect", "kvg"])
    for f in (
        think_answer_format,
        parsable_box(codec),
        iou_reward(codec, "thresholded"),
        karl_iou(codec),
    ):
        # The ground-truth answer, well formed: full marks where the reward applies.
        assert f(None, [text] * 3, **cols) == [1.0, None, 1.0]
    # On the detect row: no <look> step (format 0), the one true box found (P = R = 1), and a
    # group of identical rollouts (no looking reward).
    expected = {
        "think_look_answer_format": 0.0,
        "weighted_precision_recall": 1.0,
        "variance_guided_looking": 0.0,
    }
    for f in (
        think_look_answer_format(codec),
        weighted_precision_recall(codec),
        variance_guided_looking(codec),
    ):
        assert f(None, [text] * 3, **cols) == [None, expected[f.__name__], None]
    # an unknown task: no reward applies
    assert iou_reward(codec)(None, [text], **kvg_cols(1, task=["vqa"])) == [None]


def test_trl_extra_keyword_arguments_are_accepted():
    codec = CODECS["pixel"]
    text = f"{THINK}<answer>{render(codec, GT)}</answer>"
    extras = dict(
        completion_ids=[[1, 2]], trainer_state=object(), log_extra=print, log_metric=print
    )
    # A kvg row: KARL's terms all pay in full for the true box, DIP-R1's do not apply.
    kvg, dip = build_rewards(KARL, codec)[0], build_rewards(DIP_R1, codec)[0]
    for f, value in [(f, 1.0) for f in kvg] + [(f, None) for f in dip]:
        out = f(
            prompts=[[{"role": "user", "content": "q"}]],
            completions=[text],
            **kvg_cols(1),
            **extras,
        )
        assert out == [value], f.__name__


def test_require_answer_false_reads_the_whole_text():
    codec = CODECS["norm1000"]
    text = render(codec, GT)
    assert iou_reward(codec)(None, [text], **kvg_cols(1)) == [0.0]
    assert iou_reward(codec, require_answer=False)(None, [text], **kvg_cols(1)) == approx([1.0])
    assert parsable_box(codec, require_answer=False)(None, [text], **kvg_cols(1)) == [1.0]


def test_missing_columns_and_bad_rows_fail_clearly():
    codec = CODECS["pixel"]
    text = "<answer>[1, 2, 3, 4]</answer>"
    with pytest.raises(ValueError, match="gt_boxes"):
        iou_reward(codec)(None, [text], width=[W], height=[H])
    with pytest.raises(ValueError, match="width"):
        parsable_box(codec)(None, [text])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        iou_reward(codec)(None, [text], **kvg_cols(1, width=[W, W]))
    with pytest.raises(ValueError, match="no gt box"):
        iou_reward(codec)(None, [text], **kvg_cols(1, gt_boxes=[[]]))
    with pytest.raises(ValueError, match="knowledge_level"):
        karl_iou(codec)(None, [text], **kvg_cols(1, knowledge_level=[5]))
    with pytest.raises(ValueError, match="knowledge_level"):
        karl_iou(codec)(None, [text], **kvg_cols(1, knowledge_level=["3"]))
    with pytest.raises(ValueError, match="sample_id"):
        cols = {k: v for k, v in det_cols(1, [T0]).items() if k != "sample_id"}
        variance_guided_looking(codec)(None, [text], **cols)
    # the other task's column is not needed on rows of this task
    assert iou_reward(codec)(None, [text], task=["detect"]) == [None]


# ---------------------------------------------------------------------------- KARL

KARL_GT = [[0, 0, 500, 100]]
KARL_PRED = {  # IoU -> the answer
    1.0: "<answer>[0, 0, 500, 100]</answer>",
    0.8: "<answer>[0, 0, 400, 100]</answer>",
    0.7: "<answer>[0, 0, 350, 100]</answer>",
    0.65: "<answer>[0, 0, 325, 100]</answer>",  # exactly the threshold: not above it
    0.5: "<answer>[0, 0, 250, 100]</answer>",
    None: "<answer>[0, 0, 2",  # unparsable counts as IoU 0
}
# level -> rewards for IoU 1.0, 0.8, 0.7, 0.65, 0.5, unparsable
KARL_TABLE = {
    0: [0.65, 0.52, 0.455, -0.6, -0.6, -0.6],
    1: [0.85, 0.68, 0.595, -0.5, -0.5, -0.5],
    2: [1.0, 0.8, 0.7, -0.4, -0.4, -0.4],
    3: [1.0, 0.96, 0.84, -0.2, -0.2, -0.2],  # 1.2 x 1.0 capped at 1
    4: [1.0, 1.0, 0.98, 0.0, 0.0, 0.0],  # 1.4 x 1.0 and 1.4 x 0.8 = 1.12 capped at 1
    None: [1.0, 0.8, 0.7, -0.4, -0.4, -0.4],  # no level: the middle level 2
}


@pytest.mark.parametrize("level", list(KARL_TABLE))
def test_karl_table_all_levels(level):
    codec = CODECS["pixel"]
    texts = list(KARL_PRED.values())
    n = len(texts)
    cols = kvg_cols(n, gt_boxes=[KARL_GT] * n, knowledge_level=[level] * n)
    assert karl_iou(codec)(None, texts, **cols) == approx(KARL_TABLE[level])


@codec_names
def test_karl_in_every_codec(codec_name):
    codec = CODECS[codec_name]
    texts = [
        build(codec) for build, *_ in (KVG_CASES["right"], KVG_CASES["partial"], KVG_CASES["half"])
    ]
    levels = [0, 1, 2, 3, 4]
    out = [
        karl_iou(codec)(None, texts, **kvg_cols(3, knowledge_level=[level] * 3)) for level in levels
    ]
    # IoU 1, 5/7 (above 0.65), 1/2 (below)
    assert out == [
        approx([0.65, 0.65 * 5 / 7, -0.6]),
        approx([0.85, 0.85 * 5 / 7, -0.5]),
        approx([1.0, 5 / 7, -0.4]),
        approx([1.0, 1.2 * 5 / 7, -0.2]),
        approx([1.0, 1.0, 0.0]),
    ]


def test_karl_custom_threshold_and_scales():
    codec = CODECS["pixel"]
    f = karl_iou(codec, threshold=0.4, s_plus=(1, 1, 1, 1, 2), s_minus=(-1, -1, -1, -1, -0.5))
    cols = kvg_cols(2, gt_boxes=[KARL_GT] * 2, knowledge_level=[4, 0])
    assert f(None, [KARL_PRED[0.5]] * 2, **cols) == approx([1.0, 0.5])
    with pytest.raises(ValueError, match="5 each"):
        karl_iou(codec, s_plus=(1, 2))


# ---------------------------------------------------------------------------- detection

T0 = Box(112, 84, 336, 336)  # 0..1000: (100, 100, 300, 400)
T1 = Box(560, 420, 784, 672)  # 0..1000: (500, 500, 700, 800)
F1 = Box(896, 84, 1008, 168)  # empty areas
F2 = Box(0, 672, 112, 840)
F3 = Box(336, 588, 448, 756)
T0_NEAR = Box(168, 84, 392, 336)  # IoU with T0: 42336 / 70560 = 0.6
T0_FAR = Box(280, 84, 504, 336)  # IoU with T0: 14112 / 98784 = 1/7


def det_cols(n, truths, sample_ids=None, **extra):
    cols = {
        "task": ["detect"] * n,
        "gt_boxes": [[b.to_list() for b in truths]] * n,
        "width": [W] * n,
        "height": [H] * n,
        "target": ["person"] * n,
        "knowledge_level": [None] * n,
        "sample_id": sample_ids or ["d0"] * n,
    }
    cols.update(extra)
    return cols


def det(codec, answer, look=(T1,), think="A crowd; two people, one half hidden."):
    """A DIP-R1 completion; ``answer`` is a list of boxes or a raw string."""
    if not isinstance(answer, str):
        answer = codec.render_many(list(answer), W, H, labels=["person"] * len(answer))
    look_text = codec.render_many(list(look), W, H) if look else "nothing to inspect"
    return f"<think>{think}</think><look>{look_text}</look><answer>{answer}</answer>"


# name -> (text builder, truths, weighted precision-recall at lam 0.5)
DET_CASES = {
    "exact": (lambda c: det(c, [T0, T1]), [T0, T1], 1.0),
    "over_predict_5_for_2": (lambda c: det(c, [T0, F1, T1, F2, F3]), [T0, T1], 0.5 * 2 / 5 + 0.5),
    "under_predict": (lambda c: det(c, [T1]), [T0, T1], 0.5 + 0.5 * 1 / 2),
    "duplicates": (lambda c: det(c, [T0, T0]), [T0, T1], 0.5 * 1 / 2 + 0.5 * 1 / 2),
    "near_match_iou_0.6": (lambda c: det(c, [T0_NEAR, T1]), [T0, T1], 1.0),
    "far_iou_1_7": (lambda c: det(c, [T0_FAR, T1]), [T0, T1], 0.5),
    "empty_answer_with_truths": (lambda c: det(c, "[]"), [T0, T1], 0.0),
    "empty_answer_no_truths": (lambda c: det(c, "[]"), [], 1.0),
    "codec_empty_no_truths": (lambda c: det(c, c.render_many([], W, H)), [], 1.0),
    "predictions_no_truths": (lambda c: det(c, [T0]), [], 0.0),
    "malformed": (lambda c: det(c, "two people, left and right"), [T0, T1], 0.0),
    "truncated_in_first_box": (
        lambda c: det(c, [T0, T1]).split("<answer>")[0] + "<answer>" + truncated(c, T0),
        [T0, T1],
        0.0,
    ),
    "empty": (lambda c: "", [T0, T1], 0.0),
    "no_tags": (lambda c: c.render_many([T0, T1], W, H), [T0, T1], 0.0),
}


@pytest.mark.parametrize("case", list(DET_CASES))
@codec_names
def test_weighted_precision_recall_exact_in_every_codec(codec_name, case):
    codec = CODECS[codec_name]
    build, truths, expected = DET_CASES[case]
    text = build(codec)
    assert weighted_precision_recall(codec)(None, [text], **det_cols(1, truths)) == approx(
        [expected]
    )


@codec_names
def test_precision_recall_weights_and_threshold(codec_name):
    codec = CODECS[codec_name]
    text = det(codec, [T0, F1, T1, F2, F3])  # P = 2/5, R = 1
    cols = det_cols(1, [T0, T1])
    assert weighted_precision_recall(codec, lam=1.0)(None, [text], **cols) == approx([0.4])
    assert weighted_precision_recall(codec, lam=0.0)(None, [text], **cols) == approx([1.0])
    assert weighted_precision_recall(codec, lam=0.8)(None, [text], **cols) == approx([0.52])
    near = det(codec, [T0_NEAR, T1])  # IoU 0.6 matches at 0.5, not at 0.7
    assert weighted_precision_recall(codec, iou=0.7)(None, [near], **cols) == approx([0.5])
    assert weighted_precision_recall(codec, iou=0.6)(None, [near], **cols) == approx([1.0])


def test_truncated_detection_keeps_the_boxes_complete_before_the_cut():
    codec = CODECS["qwen25vl"]
    full = codec.render_many([T0, T1], W, H)
    cut = full[: full.index("}") + 3]  # the first box and the start of the second
    text = f"<think>t</think><look>{codec.render_many([T1], W, H)}</look><answer>{cut}"
    assert weighted_precision_recall(codec)(None, [text], **det_cols(1, [T0, T1])) == [0.75]
    assert think_look_answer_format(codec)(None, [text], **det_cols(1, [T0, T1])) == [0.0]


# name -> (text builder, format reward)
FORMAT_CASES = {
    "good": (lambda c: det(c, [T0, T1]), 1),
    "empty_list_answer": (lambda c: det(c, "[]"), 1),
    "fenced_empty_list": (lambda c: det(c, "```json\n[ ]\n```"), 1),
    "codec_empty_answer": (lambda c: det(c, c.render_many([], W, H)), 1),
    "no_look_region": (lambda c: det(c, [T0], look=()), 0),
    "answer_not_boxes": (lambda c: det(c, "two people"), 0),
    "empty_think": (lambda c: det(c, [T0], think="  "), 0),
    "look_before_think": (
        lambda c: (
            f"<look>{c.render_many([T1], W, H)}</look><think>t</think>"
            f"<answer>{c.render_many([T0], W, H)}</answer>"
        ),
        0,
    ),
    "missing_look": (lambda c: f"<think>t</think><answer>{c.render_many([T0], W, H)}</answer>", 0),
    "two_answers": (lambda c: det(c, [T0]) + "<answer>[]</answer>", 0),
    "text_after": (lambda c: det(c, [T0]) + " Done.", 0),
    "whitespace_around": (
        lambda c: "\n " + det(c, [T0]).replace("</think>", "</think>\n") + "\n",
        1,
    ),
    "truncated": (lambda c: det(c, [T0, T1])[:-12], 0),
    "empty": (lambda c: "", 0),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
@codec_names
def test_think_look_answer_format_in_every_codec(codec_name, case):
    codec = CODECS[codec_name]
    build, expected = FORMAT_CASES[case]
    text = build(codec)
    assert think_look_answer_format(codec)(None, [text], **det_cols(1, [T0, T1])) == [
        float(expected)
    ]


def test_empty_answer_is_an_empty_list_only_where_the_codec_writes_it_so():
    cols = det_cols(1, [])
    text = det(CODECS["pixel"], "")
    assert think_look_answer_format(CODECS["pixel"])(None, [text], **cols) == [0.0]
    assert weighted_precision_recall(CODECS["pixel"])(None, [text], **cols) == [0.0]
    # Qwen2-VL boxes have no list syntax: no boxes at all is the empty text
    assert think_look_answer_format(CODECS["norm1000"])(None, [text], **cols) == [1.0]
    assert weighted_precision_recall(CODECS["norm1000"])(None, [text], **cols) == [1.0]


# ---------------------------------------------------------------------------- looking reward

LEFT_HALF_T1 = Box(560, 420, 672, 672)  # covers half of T1


def group_1(codec):
    """Four rollouts; all find T0, T1 is found by half of them (p = 1/2, v = 1/4, w = 1)."""
    return [
        det(codec, [T0, T1], look=[T1]),  # looks at the uncertain box: 1
        det(codec, [T0, T1], look=[T0]),  # looks at the certain box: 0 - 0.5 x 1 -> clipped to 0
        det(codec, [T0], look=[LEFT_HALF_T1]),  # half of it: 0.5
        det(codec, [T0], look=[T1, F1, F2, F3]),  # spam: 1 - 0.5 x 3/4 = 0.625
    ]


GROUP_1 = [1.0, 0.0, 0.5, 0.625]


@codec_names
def test_looking_reward_single_uncertain_box_in_every_codec(codec_name):
    codec = CODECS[codec_name]
    out = variance_guided_looking(codec)(None, group_1(codec), **det_cols(4, [T0, T1]))
    assert out == approx(GROUP_1)
    assert out[0] > out[3]  # many looks over empty areas score below one good look


def test_looking_at_the_box_half_the_group_misses_scores_highest():
    codec = CODECS["pixel"]
    # T0 found by 3 of 4 (v = 3/16), T1 by 2 of 4 (v = 1/4): w = (3/7, 4/7)
    texts = [
        det(codec, [T0, T1], look=[T1]),
        det(codec, [T0, T1], look=[T0]),
        det(codec, [T0], look=[F1]),
        det(codec, "[]", look=()),
    ]
    out = variance_guided_looking(codec)(None, texts, **det_cols(4, [T0, T1]))
    assert out == approx([4 / 7, 3 / 7, 0.0, 0.0])
    assert int(np.argmax(out)) == 0


def test_looking_reward_is_zero_when_all_rollouts_agree():
    codec = CODECS["pixel"]
    agree = [det(codec, [T0, T1], look=[T1]), det(codec, [T0, T1], look=[T0, T1])] * 2
    assert variance_guided_looking(codec)(None, agree, **det_cols(4, [T0, T1])) == [0.0] * 4
    all_miss = [det(codec, [F1], look=[T1]), det(codec, "[]", look=[T0])]
    assert variance_guided_looking(codec)(None, all_miss, **det_cols(2, [T0, T1])) == [0.0, 0.0]
    no_truths = [det(codec, [F1], look=[T1]), det(codec, "[]", look=[T0])]
    assert variance_guided_looking(codec)(None, no_truths, **det_cols(2, [])) == [0.0, 0.0]


def test_looking_reward_partial_group_of_one_is_zero():
    codec = CODECS["pixel"]
    out = variance_guided_looking(codec)(None, group_1(codec)[:1], **det_cols(1, [T0, T1]))
    assert out == [0.0]


def test_looking_reward_groups_by_sample_id_even_when_interleaved():
    codec = CODECS["pixel"]
    a = group_1(codec)  # sample "a": truths T0, T1
    b = [det(codec, [T0_NEAR], look=[T0]), det(codec, "[]", look=[T0, F1])]  # sample "b": truth T0
    texts = [a[0], b[0], a[1], b[1], a[2], a[3]]
    cols = {
        "task": ["detect"] * 6,
        "sample_id": ["a", "b", "a", "b", "a", "a"],
        "gt_boxes": [
            [T0.to_list(), T1.to_list()] if s == "a" else [T0.to_list()] for s in "abab" + "aa"
        ],
        "width": [W] * 6,
        "height": [H] * 6,
    }
    out = variance_guided_looking(codec)(None, texts, **cols)
    # b: T0 found by 1 of 2, w = 1: a look at T0 gives 1; [T0, F1] gives 1 - 0.5 x 1/2
    assert out == approx([1.0, 1.0, 0.0, 0.75, 0.5, 0.625])
    # computed as one group instead, "a" would see a different p: the grouping matters
    merged = dict(cols, sample_id=["x"] * 6, gt_boxes=[[T0.to_list(), T1.to_list()]] * 6)
    assert variance_guided_looking(codec)(None, texts, **merged) != out


def test_looking_reward_with_kvg_rows_in_the_call():
    codec = CODECS["pixel"]
    texts = group_1(codec)
    cols = det_cols(4, [T0, T1])
    texts.insert(1, f"{THINK}<answer>{render(codec, GT)}</answer>")
    for key, value in kvg_cols(1).items():
        cols[key] = cols[key][:1] + value + cols[key][1:]
    out = variance_guided_looking(codec)(None, texts, **cols)
    assert out == approx([GROUP_1[0], None, *GROUP_1[1:]])


def test_looking_reward_uncertain_regions_and_penalty():
    codec = CODECS["pixel"]
    texts = group_1(codec)
    texts[3] = det(codec, [T0], look=[T1, F1])  # one good look, one on F1
    cols = det_cols(4, [T0, T1])
    assert variance_guided_looking(codec)(None, texts, **cols)[3] == 0.75
    regions = dict(cols, uncertain_regions=[[F1.to_list()]] * 4)
    # F1 is an annotated ambiguous area: looking there is not idle (but earns nothing by itself)
    assert variance_guided_looking(codec)(None, texts, **regions)[3] == 1.0
    assert (
        variance_guided_looking(codec, use_uncertain_regions=False)(None, texts, **regions)[3]
        == 0.75
    )
    assert variance_guided_looking(codec, penalty=0.0)(None, group_1(codec), **cols) == approx(
        [1.0, 0.0, 0.5, 1.0]
    )
    # a look covering less than `cover` of the uncertain box is idle
    assert variance_guided_looking(codec, cover=0.6)(None, group_1(codec), **cols)[2] == 0.0


def test_looking_reward_rejects_disagreeing_truths_in_a_group():
    codec = CODECS["pixel"]
    cols = det_cols(2, [T0])
    cols["gt_boxes"] = [[T0.to_list()], [T1.to_list()]]
    with pytest.raises(ValueError, match="disagree on gt_boxes"):
        variance_guided_looking(codec)(None, ["", ""], **cols)


box_strategy = st.builds(
    lambda x, y, w, h: Box(x, y, x + w, y + h),
    st.integers(0, 1000),
    st.integers(0, 760),
    st.integers(1, 400),
    st.integers(1, 300),
)


@settings(max_examples=60, deadline=None)
@given(
    truths=st.lists(box_strategy, max_size=4),
    rollouts=st.lists(
        st.tuples(st.lists(box_strategy, max_size=5), st.lists(box_strategy, max_size=4)),
        min_size=1,
        max_size=6,
    ),
    penalty=st.floats(0, 3),
)
def test_looking_reward_is_clipped_to_unit_interval(truths, rollouts, penalty):
    codec = CODECS["pixel"]
    texts = [det(codec, answer, look=look) for answer, look in rollouts]
    # include exact copies of truths sometimes so that groups disagree
    texts += [det(codec, truths, look=truths[:1])]
    out = variance_guided_looking(codec, penalty=penalty)(
        None, texts, **det_cols(len(texts), truths)
    )
    assert all(0.0 <= v <= 1.0 for v in out)


# ---------------------------------------------------------------------------- registry


def test_build_rewards_presets_in_order():
    codec = CODECS["qwen25vl"]
    funcs, weights = build_rewards(DEEPPERCEPTION, codec)
    assert [f.__name__ for f in funcs] == ["iou_thresholded", "think_answer_format", "parsable_box"]
    assert weights == [1.0, 0.5, 0.5]
    partial = KVG_CASES["partial"][0](codec)  # IoU 5/7 < 0.85
    right = KVG_CASES["right"][0](codec)
    assert funcs[0](None, [partial, right], **kvg_cols(2)) == approx([0.0, 1.0])

    funcs, weights = build_rewards(KARL, codec)
    assert [f.__name__ for f in funcs] == ["karl_iou", "think_answer_format", "parsable_box"]
    assert weights == [1.0, 0.5, 0.5]

    funcs, weights = build_rewards(DIP_R1, codec)
    assert [f.__name__ for f in funcs] == [
        "think_look_answer_format",
        "weighted_precision_recall",
        "variance_guided_looking",
    ]
    assert weights == [1.0, 1.0, 1.0]
    with pytest.raises(TypeError):
        DEEPPERCEPTION["parsable_box"] = 1.0  # presets are read-only
    with pytest.raises(TypeError):
        DEEPPERCEPTION["iou_thresholded"]["tau"] = 0.5


def test_build_rewards_order_params_and_default_weight():
    codec = CODECS["pixel"]
    spec = {
        "parsable_box": 0.25,
        "iou_squared": {},
        "karl_iou": {"weight": 2, "threshold": 0.4},
        "weighted_precision_recall": {"lam": 1.0, "weight": 0.5},
    }
    funcs, weights = build_rewards(spec, codec)
    assert [f.__name__ for f in funcs] == list(spec)
    assert weights == [0.25, 1.0, 2.0, 0.5]
    assert funcs[2].params["threshold"] == 0.4 and funcs[3].params["lam"] == 1.0
    assert set(REWARDS) >= {
        "think_answer_format",
        "parsable_box",
        "iou_continuous",
        "iou_thresholded",
        "iou_squared",
        "iou_giou",
        "karl_iou",
        "think_look_answer_format",
        "weighted_precision_recall",
        "variance_guided_looking",
    }
    assert all(REWARDS[name](codec).__name__ == name for name in REWARDS)


def test_build_rewards_errors_are_clear():
    codec = CODECS["pixel"]
    with pytest.raises(ValueError, match="unknown reward 'iou'.*iou_thresholded.*variance_guided"):
        build_rewards({"iou": 1.0}, codec)
    with pytest.raises(ValueError, match="'iou_thresholded': bad parameters.*accepted: tau"):
        build_rewards({"iou_thresholded": {"threshold": 0.5}}, codec)
    with pytest.raises(ValueError, match="accepted: none"):
        build_rewards({"think_answer_format": {"weight": 1, "strict": True}}, codec)
    with pytest.raises(ValueError, match="weight must be a number"):
        build_rewards({"parsable_box": "high"}, codec)
    with pytest.raises(ValueError, match="finite"):
        build_rewards({"parsable_box": float("nan")}, codec)
    with pytest.raises(ValueError, match="at least one"):
        build_rewards({}, codec)
    with pytest.raises(ValueError, match="tau"):
        build_rewards({"iou_thresholded": {"tau": 1.5}}, codec)
    with pytest.raises(ValueError, match="unknown IoU variant"):
        iou_reward(codec, "dice")


def test_rewards_of_your_own_by_import_path():
    codec = CODECS["pixel"]
    funcs, weights = build_rewards({"parsable_box": 0.5, "customrewards:char_variety": 2}, codec)
    assert [f.__name__ for f in funcs] == ["parsable_box", "char_variety"] and weights == [0.5, 2.0]
    assert funcs[1]([], ["aab", "abcdefgh"]) == [0.25, 1.0]
    with pytest.raises(ValueError, match="cannot import it"):
        build_rewards({"customrewards:missing": 1.0}, codec)
    with pytest.raises(ValueError, match="cannot import it"):
        build_rewards({"no_such_module_x:f": 1.0}, codec)
    with pytest.raises(ValueError, match="takes a weight only"):
        build_rewards({"customrewards:char_variety": {"weight": 1, "tau": 0.5}}, codec)


def test_doctests():
    assert doctest.testmod(rewards_module).failed == 0


# ---------------------------------------------------------------------------- gaming

IMAGE = Box(0, 0, W, H)
# 50 small boxes along the bottom edge, far from every true box
FLOOD = [
    Box(10 + 40 * (i % 25), 780 + 30 * (i // 25), 30 + 40 * (i % 25), 800 + 30 * (i // 25))
    for i in range(50)
]
# 50 boxes wholly outside the image, and one mostly outside (70 of its 224 px wide inside)
OUTSIDE = [Box(W + 10 + 20 * i, 10, W + 30 + 20 * i, 30) for i in range(50)]
MOSTLY_OUTSIDE = Box(1050, 420, 1274, 672)


def inverted(box):
    return Box(box.x2, box.y2, box.x1, box.y1)


def written(codec, boxes, label=None):
    """Boxes in the codec's text exactly as given: not clipped, corners not put right."""
    fw, fh = codec.frame(W, H)
    spans = []
    for b in boxes:
        values = [b.x1 * fw / W, b.y1 * fh / H, b.x2 * fw / W, b.y2 * fh / H]
        values = [round(v, codec.decimals) if codec.decimals else round(v) for v in values]
        spans.append(codec._span(values, label))
    return codec._join(spans)


def wrong_frame(codec, boxes):
    """The boxes in another frame: pixels where fractions are expected, else fractions."""
    other = get_codec("pixel" if codec.frame(W, H) == (1.0, 1.0) else "norm01")
    return other.render_many(list(boxes), W, H)


def kvg(codec, answer):
    return f"{THINK}<answer>{answer}</answer>"


# name -> (gaming completion builder, the preset terms that must catch it); the honest
# completion is the right box, well formed. Terms: iou (the preset's IoU term), format, parsable.
KVG_GAMING = {
    "whole_image_box": (lambda c: kvg(c, render(c, IMAGE)), {"iou"}),
    "fifty_extra_boxes": (lambda c: kvg(c, render(c, *FLOOD, GT)), {"parsable"}),
    "outside_image": (lambda c: kvg(c, written(c, [GT.shift(W, 0)])), {"iou"}),
    "mostly_outside_image": (lambda c: kvg(c, written(c, [GT.shift(700, 0)])), {"iou"}),
    "duplicated_true_box": (lambda c: kvg(c, render(c, GT, GT)), {"parsable"}),
    "inverted_corners": (lambda c: kvg(c, written(c, [inverted(GT)])), {"iou", "parsable"}),
    "no_answer_tags": (lambda c: f"{THINK}{render(c, GT)}", {"iou", "format", "parsable"}),
    "wrong_frame": (lambda c: kvg(c, wrong_frame(c, [GT])), {"iou"}),
    "empty_answer": (lambda c: kvg(c, ""), {"iou", "format", "parsable"}),
    "empty_list_answer": (lambda c: kvg(c, "[]"), {"iou", "parsable"}),
}
KVG_TERMS = {
    "deepperception": {
        "iou": "iou_thresholded",
        "format": "think_answer_format",
        "parsable": "parsable_box",
    },
    "karl": {"iou": "karl_iou", "format": "think_answer_format", "parsable": "parsable_box"},
}
PRESETS = {"deepperception": DEEPPERCEPTION, "karl": KARL, "dip_r1": DIP_R1}


def scores(funcs, texts, cols):
    """Each reward's values: name -> list aligned with ``texts``."""
    return {f.__name__: f(None, texts, **cols) for f in funcs}


def total(funcs, weights, texts, cols):
    per = [f(None, texts, **cols) for f in funcs]
    return [
        sum(w * v[i] for w, v in zip(weights, per, strict=True) if v[i] is not None)
        for i in range(len(texts))
    ]


def assert_gaming_loses(honest, gaming, totals, caught):
    for name in honest:
        assert gaming[name] <= honest[name], name
    for name in caught:
        assert gaming[name] < honest[name], name
    assert totals[1] < totals[0]


@pytest.mark.parametrize("level", [0, 2, 4])
@pytest.mark.parametrize("preset", list(KVG_TERMS))
@pytest.mark.parametrize("row", list(KVG_GAMING))
@codec_names
def test_gaming_never_pays_kvg(codec_name, row, preset, level):
    codec = CODECS[codec_name]
    build, caught = KVG_GAMING[row]
    texts = [KVG_CASES["right"][0](codec), build(codec)]
    cols = kvg_cols(2, knowledge_level=[level] * 2)
    funcs, weights = build_rewards(PRESETS[preset], codec)
    # every IoU variant on its own, too
    funcs += [iou_reward(codec, v) for v in ("continuous", "squared", "giou")]
    weights += [0.0] * 3
    values = scores(funcs, texts, cols)
    honest = {k: v[0] for k, v in values.items()}
    gaming = {k: v[1] for k, v in values.items()}
    caught = {KVG_TERMS[preset][t] for t in caught}
    if "iou_thresholded" in caught or "karl_iou" in caught:
        caught |= {"iou_continuous", "iou_squared", "iou_giou"}
    assert_gaming_loses(honest, gaming, total(funcs, weights, texts, cols), caught)


T_TRUTHS = [T0, T1]
DET_THINK = "A crowd; two people, one half hidden."


def look_text(codec, looks):
    return written(codec, looks)


def det_written(codec, answer, looks=(T1,)):
    return (
        f"<think>{DET_THINK}</think><look>{look_text(codec, looks)}</look><answer>{answer}</answer>"
    )


def honest_det(codec):
    return det(codec, [T0, T1], look=[T1])


# The group the candidate rollout is scored in: T0 is always found, T1 by one of three, so with
# the honest candidate T1 is found by half the group (the uncertain box, weight 1).
def det_group(codec):
    return [det(codec, [T0, T1], look=[T0]), det(codec, [T0], look=[F1]), det(codec, [T0])]


# name -> (gaming rollout builder, the terms that must catch it: format, pr, looking)
DET_GAMING = {
    "whole_image_look": (lambda c: det(c, [T0, T1], look=[IMAGE]), {"looking"}),
    "whole_image_box": (lambda c: det(c, [IMAGE], look=[T1]), {"pr", "looking"}),
    "fifty_extra_boxes": (lambda c: det(c, [T0, T1, *FLOOD], look=[T1]), {"pr"}),
    "outside_image": (lambda c: det_written(c, written(c, [T0, T1, *OUTSIDE])), {"pr"}),
    "mostly_outside_image": (
        lambda c: det_written(c, written(c, [T0, T1, MOSTLY_OUTSIDE])),
        {"pr"},
    ),
    "duplicated_true_boxes": (lambda c: det(c, [T0, T1, T0, T1], look=[T1]), {"pr"}),
    "inverted_corners": (
        lambda c: det_written(c, written(c, [inverted(T0), inverted(T1)])),
        {"pr", "looking"},
    ),
    "no_answer_tags": (
        lambda c: (
            f"<think>{DET_THINK}</think><look>{look_text(c, [T1])}</look>"
            + c.render_many([T0, T1], W, H)
        ),
        {"format", "pr", "looking"},
    ),
    "wrong_frame": (lambda c: det(c, wrong_frame(c, [T0, T1]), look=[T1]), {"pr", "looking"}),
    "empty_answer": (lambda c: det(c, "[]", look=[T1]), {"pr", "looking"}),
    "look_flood": (lambda c: det(c, [T0, T1], look=[T0, T1, *FLOOD]), {"looking"}),
    "look_outside_image": (
        lambda c: det_written(c, c.render_many([T0, T1], W, H), looks=[T1.shift(W, 0)]),
        {"looking"},
    ),
    "inverted_look": (
        lambda c: det_written(c, c.render_many([T0, T1], W, H), looks=[inverted(T1)]),
        {"looking"},
    ),
    "look_in_wrong_frame": (
        lambda c: (
            f"<think>{DET_THINK}</think><look>{wrong_frame(c, [T1])}</look>"
            f"<answer>{c.render_many([T0, T1], W, H)}</answer>"
        ),
        {"looking"},
    ),
}
DET_TERMS = {
    "format": "think_look_answer_format",
    "pr": "weighted_precision_recall",
    "looking": "variance_guided_looking",
}


@pytest.mark.parametrize("row", list(DET_GAMING))
@codec_names
def test_gaming_never_pays_dip_r1(codec_name, row):
    codec = CODECS[codec_name]
    build, caught = DET_GAMING[row]
    funcs, weights = build_rewards(DIP_R1, codec)
    results = []
    for candidate in (honest_det(codec), build(codec)):
        texts = [candidate, *det_group(codec)]
        cols = det_cols(len(texts), T_TRUTHS)
        values = scores(funcs, texts, cols)
        results.append(
            ({k: v[0] for k, v in values.items()}, total(funcs, weights, texts, cols)[0])
        )
    (honest, honest_total), (gaming, gaming_total) = results
    assert honest == {name: 1.0 for name in DET_TERMS.values()}
    assert_gaming_loses(
        honest, gaming, [honest_total, gaming_total], {DET_TERMS[t] for t in caught}
    )


def test_whole_image_look_earns_little_and_a_tight_group_look_in_full():
    codec = CODECS["pixel"]
    group = det_group(codec)
    cols = det_cols(4, T_TRUTHS)
    f = variance_guided_looking(codec)
    whole = f(None, [det(codec, [T0, T1], look=[IMAGE]), *group], **cols)[0]
    # T1 is 56448 of 940800 px: the whole-image look is that precise
    assert whole == pytest.approx(56448 / 940800)
    # a look twice the size of the uncertain box earns half
    wide = Box(T1.x1 - 112, T1.y1, T1.x2 + 112, T1.y2)
    assert f(None, [det(codec, [T0, T1], look=[wide]), *group], **cols)[0] == pytest.approx(0.5)
    # no answer box list: no looking reward either
    assert f(None, [det(codec, "people", look=[T1]), *group], **cols)[0] == 0.0


def test_boxes_outside_the_image_are_wrong_predictions():
    codec = CODECS["pixel"]
    f = weighted_precision_recall(codec)
    text = det_written(codec, written(codec, [T0, T1, *OUTSIDE]))
    assert f(None, [text], **det_cols(1, T_TRUTHS)) == approx([0.5 * 2 / 52 + 0.5])
    # a box a little over the edge still matches when its IoU (unclipped) is high enough
    over = Box(T1.x1 + 400, T1.y1, T1.x2 + 400, T1.y2)  # x 960..1184, the image ends at 1120
    truth = Box(960, 420, 1120, 672)
    assert f(None, [det_written(codec, written(codec, [over]))], **det_cols(1, [truth])) == [1.0]


def test_inverted_box_scores_zero_like_the_benchmark():
    from groundforge.trainer.kvgbench_score import reference_box, reference_iou

    codec = CODECS["norm1000"]
    text = kvg(codec, written(codec, [inverted(GT)]))
    for f in (iou_reward(codec), iou_reward(codec, "giou"), parsable_box(codec)):
        assert f(None, [text], **kvg_cols(1)) == [0.0]
    quad = reference_box(text)
    assert quad != (0.0, 0.0, 0.0, 0.0)  # the benchmark reads the box, and scores it 0
    assert reference_iou(quad, (200, 200, 500, 600)) == 0.0


def test_fractions_setting_reads_the_benchmark_way():
    codec = CODECS["pixel"]
    text = kvg(codec, wrong_frame(codec, [GT]))
    assert iou_reward(codec)(None, [text], **kvg_cols(1)) == approx([0.0])
    assert iou_reward(codec, fractions=True)(None, [text], **kvg_cols(1)) == approx([1.0])


def test_parsable_box_max_boxes():
    codec = CODECS["pixel"]
    text = kvg(codec, render(codec, WRONG, GT))
    assert parsable_box(codec)(None, [text], **kvg_cols(1)) == [0.0]
    assert parsable_box(codec, max_boxes=2)(None, [text], **kvg_cols(1)) == [1.0]
    with pytest.raises(ValueError, match="max_boxes"):
        parsable_box(codec, max_boxes=0)


# ---------------------------------------------------------------------------- verl

VERL_CODECS = {  # the trainer's codec -> (name, params, size of the exported image)
    "pixel": ("pixel", {}, (W, H)),
    "norm1000": ("norm1000", {}, (W, H)),
    "norm1000-plain": ("norm1000", {"tokens": False}, (W, H)),
    # verl gets the image already resized to the frame: 560 x 420
    "qwen25vl": ("qwen25vl", {"max_pixels": 560 * 420}, (560, 420)),
    "qwen3vl": ("qwen3vl", {}, (W, H)),
    "norm01": ("norm01", {}, (W, H)),
}


def verl_truth(codec_name, task, truths):
    name, params, (w, h) = VERL_CODECS[codec_name]
    codec = get_codec(name, **params)
    boxes = [codec.to_frame(b.scale(w / W, h / H), w, h) for b in truths]
    return {
        "codec": name,
        "codec_params": params,
        "width": w,
        "height": h,
        "task": task,
        "boxes": boxes,
    }


@codec_names
def test_verl_compute_score_equals_the_trainer_totals(codec_name):
    from groundforge.outputs.verl_reward import compute_score, default_spec

    codec = CODECS[codec_name]
    kvg_texts = [b(codec) for b, *_ in KVG_CASES.values()] + [
        b(codec) for b, _ in KVG_GAMING.values()
    ]
    det_rows = (
        [(b(codec), truths) for b, truths, _ in DET_CASES.values()]
        + [(b(codec), T_TRUTHS) for b, _ in DET_GAMING.values()]
        + [(honest_det(codec), T_TRUTHS)]
    )
    specs = {
        "deepperception": DEEPPERCEPTION,
        "karl": KARL,
        "dip_r1": DIP_R1,
        None: None,  # the default spec: accuracy plus a format term
    }
    checked = 0
    for preset, spec in specs.items():
        options = {} if preset else {"format_weight": 0.5, "iou_threshold": 0.5}
        for text in kvg_texts:
            trainer_spec = spec or default_spec("kvg", **options)
            funcs, weights = build_rewards(trainer_spec, codec)
            expected = total(funcs, weights, [text], kvg_cols(1))[0]
            truth = verl_truth(codec_name, "kvg", [GT])
            got = compute_score(
                "groundforge/aircraft",
                text,
                json.dumps(truth),
                {"knowledge_level": 2},
                rewards=preset,
                **options,
            )
            assert got == pytest.approx(expected, abs=1e-9), (preset, text)
            checked += 1
        for text, truths in det_rows:
            trainer_spec = spec or default_spec("detect", **options)
            funcs, weights = build_rewards(trainer_spec, codec)
            expected = total(funcs, weights, [text], det_cols(1, truths))[0]
            truth = verl_truth(codec_name, "detect", truths)
            got = compute_score("groundforge/person", text, truth, rewards=preset, **options)
            assert got == pytest.approx(expected, abs=1e-9), (preset, text)
            checked += 1
    assert checked == 4 * (len(kvg_texts) + len(det_rows))
    # the comparison is not vacuous: totals spread over several values
    funcs, weights = build_rewards(DEEPPERCEPTION, codec)
    assert len(set(total(funcs, weights, kvg_texts, kvg_cols(len(kvg_texts))))) >= 3
