"""Rationale checks in every codec: keep path, each reason, order of reasons, the last box."""

from __future__ import annotations

import doctest
from dataclasses import replace

import pytest

import groundforge.filters.rationale as rationale_module
from groundforge.filters.rationale import (
    DEFAULT_LEAK_PHRASES,
    RationaleRules,
    check_rationale,
    find_leak,
    split_think_answer,
)
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import Entity, KVGSample, Provenance

# 1120 x 840 on a 112 x 84 grid: every box lands on whole numbers in every frame, so hand-typed
# answers are exact. qwen25vl with this max_pixels resizes to 560 x 420 (half).
WIDTH, HEIGHT = 1120, 840
TARGET = Box(112, 84, 448, 420)  # 0..1000: (100,100),(400,500)
OTHER = Box(560, 84, 1008, 420)  # 0..1000: (500,100),(900,500)
UNKNOWN = Box(336, 504, 784, 756)  # 0..1000: (300,600),(700,900)
SHIFTED = Box(336, 84, 672, 420)  # TARGET moved right by 2/3 of its width: IoU 112/560 = 0.2

SAMPLE = KVGSample(
    sample_id="s1",
    image=b"",
    width=WIDTH,
    height=HEIGHT,
    domain="aircraft",
    task="kvg",
    question="Find and give the bounding box of <|object_ref_start|>Boeing 757<|object_ref_end|>",
    target="Boeing 757",
    entities=(Entity("Boeing 757", TARGET), Entity("Airbus A321", OTHER), Entity("", UNKNOWN)),
    gt_boxes=(TARGET,),
    split="sft",
    provenance=Provenance(),
)

CODECS = {
    "pixel": get_codec("pixel"),
    "norm1000": get_codec("norm1000"),
    "norm1000_plain": get_codec("norm1000", tokens=False),
    "qwen25vl": get_codec("qwen25vl", max_pixels=560 * 420),
    "qwen3vl": get_codec("qwen3vl"),
    "norm01": get_codec("norm01"),
}

# Per codec: two hand-typed answers for TARGET, one for SHIFTED.
TYPED = {
    "pixel": ("[112, 84, 448, 420]", "(112,84,448,420)", "[336, 84, 672, 420]"),
    "norm1000": (
        "<|box_start|>(100,100),(400,500)<|box_end|>",
        "<|object_ref_start|>Boeing 757<|object_ref_end|><|box_start|>(100,100),(400,500)"
        "<|box_end|>",
        "<|box_start|>(300,100),(600,500)<|box_end|>",
    ),
    "norm1000_plain": (
        "(100,100),(400,500)",
        "Boeing 757(100,100),(400,500)",
        "(300,100),(600,500)",
    ),
    "qwen25vl": (
        '[{"bbox_2d": [56, 42, 224, 210], "label": "Boeing 757"}]',
        '```json\n[\n  {"bbox_2d": [56, 42, 224, 210]}\n]\n```',
        '[{"bbox_2d": [168, 42, 336, 210], "label": "Boeing 757"}]',
    ),
    "qwen3vl": (
        '[{"bbox_2d": [100, 100, 400, 500], "label": "Boeing 757"}]',
        "[{'bbox_2d': [100, 100, 400, 500]}]",
        '[{"bbox_2d": [300, 100, 600, 500]}]',
    ),
    "norm01": ("[0.1, 0.1, 0.4, 0.5]", "[0.100, 0.100, 0.400, 0.500]", "[0.3, 0.1, 0.6, 0.5]"),
}

THINK = (
    "Three airliners stand on the apron. The left one has a long, slender fuselage, two underwing "
    "engines and a tall nose gear; the right one is shorter with a thicker body. Unknown object 1, "
    "at the bottom, has a rounder nose. The slender, long-bodied jet on the left is the Boeing 757."
)
RULES = RationaleRules()


def rationale(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def check(text, codec, rules=RULES):
    return check_rationale(text, SAMPLE, codec, rules)


def test_doctests():
    assert doctest.testmod(rationale_module).failed == 0


@pytest.fixture(params=list(CODECS))
def codec_name(request):
    return request.param


def test_the_typed_answers_are_what_the_codecs_render(codec_name):
    codec = CODECS[codec_name]
    rendered = {
        codec.render(TARGET, WIDTH, HEIGHT),
        codec.render(TARGET, WIDTH, HEIGHT, label="Boeing 757"),
    }
    assert TYPED[codec_name][0] in rendered
    for text, box in zip(TYPED[codec_name], (TARGET, TARGET, SHIFTED), strict=True):
        assert codec.parse_last(text, WIDTH, HEIGHT).to_list() == pytest.approx(box.to_list())


def test_good_rationale_is_kept_with_the_think_text(codec_name):
    codec = CODECS[codec_name]
    answers = (codec.render(TARGET, WIDTH, HEIGHT), *TYPED[codec_name][:2])
    answers += (codec.render(TARGET, WIDTH, HEIGHT, label="Boeing 757"),)
    for answer in answers:
        v = check(rationale(THINK, answer), codec)
        assert v.keep, (answer, v)
        assert v.value == THINK
        assert v.metrics["iou"] == pytest.approx(1.0)
        assert v.metrics["chars"] == len(THINK)


def test_whitespace_around_blocks_is_allowed_and_stripped(codec_name):
    codec = CODECS[codec_name]
    answer = codec.render(TARGET, WIDTH, HEIGHT)
    text = f"\n<think>\n  {THINK}\n</think>\n\n<answer> {answer} </answer>\n"
    v = check(text, codec)
    assert v.keep and v.value == THINK


def test_box_of_another_entity_is_wrong(codec_name):
    codec = CODECS[codec_name]
    for box in (OTHER, UNKNOWN):
        v = check(rationale(THINK, codec.render(box, WIDTH, HEIGHT)), codec)
        assert (v.keep, v.reason, v.metrics["iou"]) == (False, "rationale_wrong_box", 0.0)
        assert v.metrics["min_iou"] == 0.5


def test_shifted_box_has_the_exact_iou(codec_name):
    codec = CODECS[codec_name]
    for answer in (TYPED[codec_name][2], codec.render(SHIFTED, WIDTH, HEIGHT)):
        v = check(rationale(THINK, answer), codec)
        assert v.reason == "rationale_wrong_box"
        assert v.metrics["iou"] == pytest.approx(0.2, abs=1e-12)
        assert v.metrics["box"] == pytest.approx(SHIFTED.to_list())


def test_min_iou_is_inclusive():
    codec = CODECS["pixel"]
    text = rationale(THINK, TYPED["pixel"][2])
    assert check(text, codec, RationaleRules(min_iou=0.2)).keep
    assert check(text, codec, RationaleRules(min_iou=0.2001)).reason == "rationale_wrong_box"


def test_the_last_box_of_the_answer_counts(codec_name):
    codec = CODECS[codec_name]
    last_right = codec.render_many([OTHER, TARGET], WIDTH, HEIGHT)
    last_wrong = codec.render_many([TARGET, OTHER], WIDTH, HEIGHT)
    v = check(rationale(THINK, last_right), codec)
    assert v.keep and v.metrics["iou"] == pytest.approx(1.0)
    v = check(rationale(THINK, last_wrong), codec)
    assert (v.reason, v.metrics["iou"]) == ("rationale_wrong_box", 0.0)


def test_boxes_in_the_think_text_do_not_count(codec_name):
    codec = CODECS[codec_name]
    think = f"{THINK} Not the one at {codec.render(OTHER, WIDTH, HEIGHT)}."
    v = check(rationale(think, codec.render(TARGET, WIDTH, HEIGHT)), codec)
    assert v.keep
    think = f"{THINK} It is at {codec.render(TARGET, WIDTH, HEIGHT)}."
    assert check(rationale(think, codec.render(OTHER, WIDTH, HEIGHT)), codec).reason == (
        "rationale_wrong_box"
    )


def failing_cases(codec):
    good = codec.render(TARGET, WIDTH, HEIGHT)
    full = rationale(THINK, good)
    return [
        ("no tags", f"{THINK} {good}", "rationale_format"),
        ("think only", f"<think>{THINK}</think>", "rationale_format"),
        ("answer only", f"<answer>{good}</answer>", "rationale_format"),
        ("out of order", f"<answer>{good}</answer><think>{THINK}</think>", "rationale_format"),
        ("truncated in answer", full[: -len("</answer>") - 3], "rationale_format"),
        ("truncated in think", full[: len(THINK) // 2], "rationale_format"),
        ("two think blocks", f"<think>{THINK}</think>{full}", "rationale_format"),
        ("two answers", f"{full}<answer>{good}</answer>", "rationale_format"),
        ("text before", f"Sure! {full}", "rationale_format"),
        ("text after", f"{full} Done.", "rationale_format"),
        ("empty think", rationale(" \n ", good), "rationale_format"),
        ("too short", rationale("It is the Boeing 757.", good), "rationale_too_short"),
        ("too long", rationale(THINK * 30, good), "rationale_too_long"),
        (
            "leak",
            rationale(THINK + " Its box is as provided in the annotation.", good),
            "rationale_leak",
        ),
        (
            "not named",
            rationale(THINK.replace("Boeing 757", "target"), good),
            "rationale_no_target",
        ),
        ("no box", rationale(THINK, "the slender jet on the left"), "rationale_no_box"),
        ("empty answer", rationale(THINK, ""), "rationale_no_box"),
        ("wrong box", rationale(THINK, codec.render(OTHER, WIDTH, HEIGHT)), "rationale_wrong_box"),
    ]


@pytest.mark.parametrize("case", range(len(failing_cases(CODECS["pixel"]))))
def test_each_failure_has_its_reason(codec_name, case):
    codec = CODECS[codec_name]
    label, text, reason = failing_cases(codec)[case]
    v = check(text, codec)
    assert (v.keep, v.reason) == (False, reason), label


def test_failure_metrics():
    codec = CODECS["pixel"]
    good = TYPED["pixel"][0]
    v = check(rationale("It is the Boeing 757.", good), codec)
    assert v.metrics == {"chars": 21, "min_chars": 40}
    v = check(rationale(THINK * 30, good), codec)
    assert v.metrics == {"chars": len(THINK * 30), "max_chars": 6000}
    v = check(rationale(THINK + " Its box is as provided in the annotation.", good), codec)
    assert v.metrics == {"phrase": "as provided", "part": "think"}
    v = check(rationale(THINK, f"The given box: {good}"), codec)
    assert v.metrics == {"phrase": "the given box", "part": "answer"}
    v = check(rationale(THINK.replace("Boeing 757", "target"), good), codec)
    assert v.metrics == {"target": "Boeing 757"}


def test_reasons_come_in_the_documented_order():
    codec = CODECS["pixel"]
    good, wrong = TYPED["pixel"][0], TYPED["pixel"][2]
    leaky = THINK + " The ground truth says so."
    unnamed = THINK.replace("Boeing 757", "target")
    # format before length, length before leak, leak before target, target before box
    assert check(f"<think></think>as provided {good}", codec).reason == "rationale_format"
    assert check(rationale("as provided: left", good), codec).reason == "rationale_too_short"
    assert check(rationale(leaky * 40, good), codec).reason == "rationale_too_long"
    assert check(rationale(leaky.replace("Boeing 757", "x"), "no box"), codec).reason == (
        "rationale_leak"
    )
    assert check(rationale(unnamed, "no box"), codec).reason == "rationale_no_target"
    assert check(rationale(unnamed, wrong), codec).reason == "rationale_no_target"
    assert check(rationale(THINK, f"{wrong} or none"), codec).reason == "rationale_wrong_box"


def test_target_name_is_matched_ignoring_case_and_spacing():
    codec = CODECS["pixel"]
    think = THINK.replace("Boeing 757", "BOEING\n  757")
    assert check(rationale(think, TYPED["pixel"][0]), codec).keep
    unnamed = rationale(THINK.replace("Boeing 757", "target"), TYPED["pixel"][0])
    assert check(unnamed, codec, RationaleRules(require_target=False)).keep


def test_leak_phrases_match_at_word_starts_ignoring_case_and_spacing():
    assert find_leak("It matches the Ground\n Truth.", DEFAULT_LEAK_PHRASES) == "ground truth"
    assert find_leak("As Provided, the jet", DEFAULT_LEAK_PHRASES) == "as provided"
    assert find_leak("The paint has given way to rust.", DEFAULT_LEAK_PHRASES) is None
    assert find_leak("We are told by its winglets", DEFAULT_LEAK_PHRASES) == "we are told"
    assert find_leak("nothing here", ()) is None
    codec = CODECS["pixel"]
    rules = RationaleRules(leak_phrases=("winglets",))
    text = rationale(THINK + " The winglets decide it.", TYPED["pixel"][0])
    assert check(text, codec, rules).metrics == {"phrase": "winglets", "part": "think"}
    assert check(text, codec).keep


def test_length_bounds_are_inclusive():
    codec = CODECS["pixel"]
    text = rationale(THINK, TYPED["pixel"][0])
    assert check(text, codec, RationaleRules(min_chars=len(THINK), max_chars=len(THINK))).keep
    assert check(text, codec, RationaleRules(max_chars=len(THINK) - 1)).reason == (
        "rationale_too_long"
    )
    assert check(text, codec, RationaleRules(min_chars=len(THINK) + 1)).reason == (
        "rationale_too_short"
    )


def test_split_think_answer():
    assert split_think_answer("<think>a</think><answer>b</answer>") == ("a", "b")
    assert split_think_answer(" <think> a </think>\n<answer>\n</answer> ") == ("a", "")
    assert split_think_answer("<think></think><answer>b</answer>") == ("", "b")
    assert split_think_answer("<answer>b</answer><think>a</think>") is None
    assert split_think_answer("<think>a</think>x<answer>b</answer>") is None
    assert split_think_answer("<THINK>a</THINK><ANSWER>b</ANSWER>") is None
    assert split_think_answer("<think>a</think><answer>b") is None
    assert split_think_answer(None) is None


def test_bad_settings_and_samples_raise():
    with pytest.raises(ValueError, match="min_chars"):
        RationaleRules(min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="min_iou"):
        RationaleRules(min_iou=1.5)
    no_box = replace(SAMPLE, gt_boxes=())
    with pytest.raises(ValueError, match="no target box"):
        check_rationale(rationale(THINK, "[1, 2, 3, 4]"), no_box, CODECS["pixel"])


# -- quoted boxes leave the teacher's frame -----------------------------------------------------

# 1600 x 1200: qwen25vl resizes it to 1148 x 840 at max_pixels 1003520 (a teacher's budget) and
# to 728 x 532 at 401408 (KARL's student budget), so the two frames disagree on every box.
BIG_W, BIG_H = 1600, 1200
TEACHER_25 = get_codec("qwen25vl", max_pixels=1003520)
STUDENT_25 = get_codec("qwen25vl", max_pixels=401408)
BIG = replace(
    SAMPLE,
    width=BIG_W,
    height=BIG_H,
    entities=(),
    gt_boxes=(Box(400, 300, 1200, 900),),  # 1003520: [287, 210, 861, 630]; 401408: [182, ..]
)


@pytest.mark.parametrize(
    ("teacher", "quoted", "answer", "pixels", "student"),
    [
        (
            TEACHER_25,
            ('[{"bbox_2d": [0, 0, 736, 499], "label": "Boeing 757"}]', "[574, 420, 1148, 840]"),
            '[{"bbox_2d": [287, 210, 861, 630]}]',
            ([0, 0, 1600 * 736 / 1148, 1200 * 499 / 840], [800, 600, 1600, 1200]),
            (
                '[{"bbox_2d": [0, 0, 467, 316], "label": "Boeing 757"}]',
                '[{"bbox_2d": [364, 266, 728, 532]}]',
            ),
        ),
        (
            get_codec("norm1000"),
            (
                "<|object_ref_start|>Boeing 757<|object_ref_end|>"
                "<|box_start|>(100,200),(500,700)<|box_end|>",
                "(600,100),(900,400)",
            ),
            "<|box_start|>(250,250),(750,750)<|box_end|>",
            ([160, 240, 800, 840], [960, 120, 1440, 480]),
            (
                '[{"bbox_2d": [73, 106, 364, 372], "label": "Boeing 757"}]',
                '[{"bbox_2d": [437, 53, 655, 213]}]',
            ),
        ),
    ],
    ids=["qwen25vl@1003520", "norm1000"],
)
def test_a_kept_rationale_keeps_its_quoted_boxes_in_pixels(
    teacher, quoted, answer, pixels, student
):
    from groundforge.pipelines.kvg import attach_rationale
    from groundforge.schemas.codecs import render_box_template

    think = (
        f"The Boeing 757 is the long narrow jet at {quoted[0]}; the wide-body one at {quoted[1]} "
        "has two aisles, so it is not the target."
    )
    text = f"<think>{think}</think><answer>{answer}</answer>"
    kept = attach_rationale((BIG, (text,)), teacher, RationaleRules(), "teacher-m")
    assert kept.keep, kept.reason
    sample = kept.value
    assert sample.rationale == (
        "The Boeing 757 is the long narrow jet at ⟦box 0⟧; the wide-body one at ⟦box 1⟧ "
        "has two aisles, so it is not the target."
    )
    assert [e.name for e in sample.rationale_boxes] == ["Boeing 757", ""]
    for entity, expected in zip(sample.rationale_boxes, pixels, strict=True):
        assert entity.box.to_list() == pytest.approx(expected)
    # Written by the student's codec: every box in the student's frame.
    boxes = [e.box for e in sample.rationale_boxes]
    labels = [e.name or None for e in sample.rationale_boxes]
    rendered = render_box_template(sample.rationale, boxes, STUDENT_25, BIG_W, BIG_H, labels)
    assert rendered == think.replace(quoted[0], student[0]).replace(quoted[1], student[1])


def test_a_rationale_without_boxes_is_kept_as_written():
    from groundforge.pipelines.kvg import attach_rationale

    think = "The Boeing 757 is the long narrow jet with the pointed nose, left of the hangar."
    answer = TEACHER_25.render(BIG.gt_boxes[0], BIG_W, BIG_H)
    kept = attach_rationale(
        (BIG, (f"<think>{think}</think><answer>{answer}</answer>",)),
        TEACHER_25,
        RationaleRules(),
        "m",
    )
    assert (kept.value.rationale, kept.value.rationale_boxes) == (think, ())
