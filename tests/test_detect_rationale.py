"""Detection rationales: hand-written replies in three codecs, each drop reason, the prompt and
the teacher job."""

from __future__ import annotations

import doctest
from dataclasses import replace

import pytest

import groundforge.filters.detect_rationale as detect_rationale_module
import groundforge.schemas.answer as answer_module
from groundforge.annotators.teacher.jobs import detection_rationale_job
from groundforge.annotators.teacher.prompts import (
    BUILTIN_TEMPLATES,
    codec_hint,
    detection_rationale_prompt,
    load_template,
)
from groundforge.filters.detect_rationale import DetectionRules, check_detection_rationale
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import KVGSample, Provenance, UncertainRegion, sha256_hex

# 1120 x 840 on a 112 x 84 grid: every box lands on whole numbers in every frame, so hand-typed
# replies are exact. qwen25vl with this max_pixels resizes to 560 x 420 (half).
WIDTH, HEIGHT = 1120, 840
TRUTHS = {
    "t1": Box(112, 84, 224, 420),
    "t2": Box(336, 84, 448, 420),
    "t3": Box(560, 84, 672, 420),
    "t4": Box(784, 420, 896, 756),  # missed by the detector
    "t5": Box(896, 84, 1008, 420),
}
GHOST = Box(0, 504, 112, 840)  # the detector's false positive: a coat on a hook
IGNORED = Box(224, 588, 560, 840)

SAMPLE = KVGSample(
    sample_id="crowd-7",
    image=b"\x89PNG crowd",
    width=WIDTH,
    height=HEIGHT,
    domain="person",
    task="detect",
    question="Find every person in the image.",
    target="person",
    entities=(),
    gt_boxes=tuple(TRUTHS.values()),
    split="sft",
    provenance=Provenance(),
    uncertain_regions=(
        UncertainRegion(TRUTHS["t4"], "missed"),
        UncertainRegion(GHOST, "false_positive"),
    ),
    ignore_regions=(IGNORED,),
)

CODECS = {
    "pixel": get_codec("pixel"),
    "norm1000": get_codec("norm1000"),
    "qwen25vl": get_codec("qwen25vl", max_pixels=560 * 420),
}

# Each box as typed in each codec's frame. ``near`` is t1 moved right by a quarter of its width
# (IoU 0.6, still a match); ``wrong`` and ``wrong2`` overlap no person; ``wide`` frames the
# ghost with room around it (covers all of it at IoU 0.4); ``sliver`` covers a quarter of t4.
TYPED = {
    "pixel": {
        "t1": "[112, 84, 224, 420]",
        "t2": "[336, 84, 448, 420]",
        "t3": "[560, 84, 672, 420]",
        "t4": "[784, 420, 896, 756]",
        "t5": "[896, 84, 1008, 420]",
        "near": "[140, 84, 252, 420]",
        "wrong": "[0, 0, 56, 42]",
        "wrong2": "[1064, 798, 1120, 840]",
        "wide": "[0, 420, 224, 840]",
        "sliver": "[784, 420, 896, 504]",
    },
    "norm1000": {
        "t1": "<|box_start|>(100,100),(200,500)<|box_end|>",
        "t2": "<|box_start|>(300,100),(400,500)<|box_end|>",
        "t3": "<|box_start|>(500,100),(600,500)<|box_end|>",
        "t4": "<|box_start|>(700,500),(800,900)<|box_end|>",
        "t5": "<|box_start|>(800,100),(900,500)<|box_end|>",
        "near": "<|box_start|>(125,100),(225,500)<|box_end|>",
        "wrong": "<|box_start|>(0,0),(50,50)<|box_end|>",
        "wrong2": "<|box_start|>(950,950),(1000,1000)<|box_end|>",
        "wide": "<|box_start|>(0,500),(200,1000)<|box_end|>",
        "sliver": "<|box_start|>(700,500),(800,600)<|box_end|>",
    },
    "qwen25vl": {
        "t1": '{"bbox_2d": [56, 42, 112, 210], "label": "person"}',
        "t2": '{"bbox_2d": [168, 42, 224, 210], "label": "person"}',
        "t3": '{"bbox_2d": [280, 42, 336, 210], "label": "person"}',
        "t4": '{"bbox_2d": [392, 210, 448, 378], "label": "person"}',
        "t5": '{"bbox_2d": [448, 42, 504, 210], "label": "person"}',
        "near": '{"bbox_2d": [70, 42, 126, 210], "label": "person"}',
        "wrong": '{"bbox_2d": [0, 0, 28, 21], "label": "person"}',
        "wrong2": '{"bbox_2d": [532, 399, 560, 420], "label": "person"}',
        "wide": '{"bbox_2d": [0, 210, 112, 420]}',
        "sliver": '{"bbox_2d": [392, 210, 448, 252]}',
    },
}
JOIN = {"pixel": ", ", "norm1000": "", "qwen25vl": ", "}
WRAP = {"pixel": "[{}]", "norm1000": "{}", "qwen25vl": "[{}]"}

THINK = (
    "A busy platform seen from above: four people wait in a row near the top and one more "
    "stands lower right, half turned away; a coat hangs on a hook at the bottom left."
)


def answer(codec: str, *names: str) -> str:
    return WRAP[codec].format(JOIN[codec].join(TYPED[codec][n] for n in names))


def reply(codec: str, names=("t1", "t2", "t3", "t4", "t5"), look="t4", think=THINK) -> str:
    typed = TYPED[codec]
    return (
        f"<think>{think}</think>"
        f"<look>{typed[look]} a person turned away, partly behind the bench</look>"
        f"<answer>{answer(codec, *names)}</answer>"
    )


def check(text: str, codec: str, sample: KVGSample = SAMPLE, **rules):
    return check_detection_rationale(text, sample, CODECS[codec], DetectionRules(**rules))


codec_names = pytest.mark.parametrize("codec", list(CODECS))


def test_doctests():
    for module in (detect_rationale_module, answer_module):
        assert doctest.testmod(module).failed == 0, module.__name__


@codec_names
def test_a_good_rationale_is_kept_with_its_scores(codec):
    text = reply(codec)
    verdict = check(text, codec)
    assert verdict.keep, verdict
    look = f"{TYPED[codec]['t4']} a person turned away, partly behind the bench"
    assert verdict.value == f"<think>{THINK}</think><look>{look}</look>"
    assert verdict.metrics == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "matched": 5,
        "boxes": 5,
        "truths": 5,
        "chars": len(THINK) + len(look),
        "look": [TRUTHS["t4"].to_list()],
    }


# (answer boxes, precision, recall, reason); 5 truths, "near" matches t1 at IoU 0.6.
SCORES = {
    "near box still matches": (("near", "t2", "t3", "t4", "t5"), 1.0, 1.0, None),
    "at both minimums": (("t1", "t2", "t3", "t4", "wrong"), 0.8, 0.8, None),
    "padded": (("t1", "t2", "t3", "t4", "t5", "wrong", "wrong2"), 5 / 7, 1.0, "precision"),
    "short": (("t1", "t2", "t3"), 1.0, 0.6, "recall"),
    "both low: precision first": (("t1", "wrong", "wrong2"), 1 / 3, 0.2, "precision"),
}


@codec_names
@pytest.mark.parametrize("case", list(SCORES))
def test_precision_and_recall_are_exact(codec, case):
    names, precision, recall, low = SCORES[case]
    verdict = check(reply(codec, names), codec)
    assert verdict.keep is (low is None)
    assert verdict.reason == (None if low is None else f"detect_low_{low}")
    assert verdict.metrics["precision"] == pytest.approx(precision)
    assert verdict.metrics["recall"] == pytest.approx(recall)
    assert verdict.metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert verdict.metrics["boxes"] == len(names)
    if low is not None:
        assert verdict.metrics[f"min_{low}"] == 0.8


@codec_names
def test_an_empty_answer_misses_every_person(codec):
    text = reply(codec).replace(answer(codec, "t1", "t2", "t3", "t4", "t5"), "[]")
    verdict = check(text, codec)
    assert verdict.reason == "detect_low_recall"
    assert (verdict.metrics["precision"], verdict.metrics["recall"]) == (1.0, 0.0)
    assert verdict.metrics["f1"] == 0.0
    nothing_to_find = replace(SAMPLE, gt_boxes=(), uncertain_regions=())
    kept = check(text, codec, nothing_to_find)
    assert kept.keep and kept.metrics["precision"] == kept.metrics["recall"] == 1.0


def test_thresholds_and_match_iou_are_settings():
    text = reply("pixel", ("near", "t2", "t3", "t4", "t5"))
    assert check(text, "pixel", match_iou=0.7).metrics["matched"] == 4
    assert check(text, "pixel", match_iou=0.7, min_precision=0.8).keep
    assert check(text, "pixel", match_iou=0.7, min_recall=0.9).reason == "detect_low_recall"
    for bad in ({"min_precision": 1.1}, {"min_recall": -0.1}, {"match_iou": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DetectionRules(**bad)
    with pytest.raises(ValueError, match="min_chars"):
        DetectionRules(min_chars=10, max_chars=5)


# Malformed replies: every one drops as rationale_format, in every codec.
FORMAT_CASES = {
    "no look block": lambda c: f"<think>{THINK}</think><answer>{answer(c, 't1')}</answer>",
    "look after answer": lambda c: (
        f"<think>{THINK}</think><answer>{answer(c, 't1')}</answer><look>{TYPED[c]['t4']}</look>"
    ),
    "text before": lambda c: "Sure, here it is: " + reply(c),
    "text between": lambda c: reply(c).replace("</think><look>", "</think> so <look>"),
    "two look blocks": lambda c: reply(c).replace(
        "<answer>", f"<look>{TYPED[c]['t1']}</look><answer>"
    ),
    "look names no region": lambda c: reply(c).replace(TYPED[c]["t4"] + " ", "the bench "),
    "answer is no box list": lambda c: reply(c, ()).replace(
        f"<answer>{answer(c)}</answer>", "<answer>five people</answer>"
    ),
    "blank think": lambda c: reply(c, think="  \n "),
    "cut short": lambda c: reply(c)[:-12],
    "upper-case tags": lambda c: reply(c).replace("think>", "THINK>"),
}


@codec_names
@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_malformed_replies_drop_as_format(codec, case):
    verdict = check(FORMAT_CASES[case](codec), codec)
    assert (verdict.keep, verdict.reason) == (False, "rationale_format")


def test_non_text_drops_as_format():
    assert check(None, "pixel").reason == "rationale_format"  # type: ignore[arg-type]


@codec_names
def test_length_counts_the_think_and_look_text(codec):
    text = reply(codec)
    chars = check(text, codec).metrics["chars"]
    assert check(text, codec, min_chars=chars, max_chars=chars).keep
    verdict = check(text, codec, min_chars=chars + 1, max_chars=chars + 1)
    assert verdict.reason == "rationale_too_short"
    assert verdict.metrics == {"chars": chars, "min_chars": chars + 1}
    verdict = check(text, codec, max_chars=chars - 1)
    assert verdict.reason == "rationale_too_long"
    assert verdict.metrics == {"chars": chars, "max_chars": chars - 1}


@codec_names
@pytest.mark.parametrize(
    ("edit", "phrase", "part"),
    [
        (lambda t: t.replace("A busy", "As provided, a busy"), "as provided", "think"),
        (
            lambda t: t.replace("a person turned", "the Detector missed a person turned"),
            "the detector",
            "look",
        ),
        (lambda t: t.replace("<answer>", "<answer>ground truth: "), "ground truth", "answer"),
    ],
)
def test_leaks_name_the_phrase_and_part(codec, edit, phrase, part):
    verdict = check(edit(reply(codec)), codec)
    assert verdict.reason == "rationale_leak"
    assert verdict.metrics == {"phrase": phrase, "part": part}


@codec_names
def test_the_look_must_name_an_uncertain_region(codec):
    # a look that covers all of the ghost names it, though its IoU with the ghost is only 0.4
    assert check(reply(codec, look="wide"), codec).keep
    for look in ("t1", "sliver"):  # a sure person; a quarter of the missed one
        verdict = check(reply(codec, look=look), codec)
        assert verdict.reason == "look_misses_uncertain"
        assert verdict.metrics["uncertain"] == 2
    assert check(reply(codec, look="sliver"), codec, look_cover=0.25).keep
    assert check(reply(codec, look="t1"), codec, require_look_uncertain=False).keep
    assert check(reply(codec, look="t1"), codec, replace(SAMPLE, uncertain_regions=())).keep


def test_reasons_come_in_order():
    # malformed beats short, short beats leak, leak beats low precision, precision beats looks
    assert check("<think>ok</think><answer>[]</answer>", "pixel").reason == "rationale_format"
    short_leak = reply("pixel", think="As provided. " + THINK)
    assert check(short_leak, "pixel", min_chars=1000).reason == "rationale_too_short"
    leak_padded = reply("pixel", ("t1", "wrong", "wrong2"), think="Ground truth. " + THINK)
    assert check(leak_padded, "pixel").reason == "rationale_leak"
    padded_blind = reply("pixel", ("t1", "wrong", "wrong2"), look="t1")
    assert check(padded_blind, "pixel").reason == "detect_low_precision"


# --- prompt and job ------------------------------------------------------------------------------

PROMPT_BOXES = {
    "pixel": (
        [
            "[112, 84, 224, 420]",
            "[336, 84, 448, 420]",
            "[560, 84, 672, 420]",
            "[784, 420, 896, 756]",
            "[896, 84, 1008, 420]",
        ],
        ["[784, 420, 896, 756]", "[0, 504, 112, 840]"],
        "[224, 588, 560, 840]",
        '[{"bbox": [112, 84, 224, 420], "label": "person"}, {"bbox": [336, 84, 448, 420], '
        '"label": "person"}, {"bbox": [560, 84, 672, 420], "label": "person"}, {"bbox": '
        '[784, 420, 896, 756], "label": "person"}, {"bbox": [896, 84, 1008, 420], "label": '
        '"person"}]',
    ),
    "norm1000": (
        [
            "<|box_start|>(100,100),(200,500)<|box_end|>",
            "<|box_start|>(300,100),(400,500)<|box_end|>",
            "<|box_start|>(500,100),(600,500)<|box_end|>",
            "<|box_start|>(700,500),(800,900)<|box_end|>",
            "<|box_start|>(800,100),(900,500)<|box_end|>",
        ],
        [
            "<|box_start|>(700,500),(800,900)<|box_end|>",
            "<|box_start|>(0,600),(100,1000)<|box_end|>",
        ],
        "<|box_start|>(200,700),(500,1000)<|box_end|>",
        "".join(
            f"<|object_ref_start|>person<|object_ref_end|><|box_start|>{b}<|box_end|>"
            for b in (
                "(100,100),(200,500)",
                "(300,100),(400,500)",
                "(500,100),(600,500)",
                "(700,500),(800,900)",
                "(800,100),(900,500)",
            )
        ),
    ),
    "qwen25vl": (
        [
            '[{"bbox_2d": [56, 42, 112, 210]}]',
            '[{"bbox_2d": [168, 42, 224, 210]}]',
            '[{"bbox_2d": [280, 42, 336, 210]}]',
            '[{"bbox_2d": [392, 210, 448, 378]}]',
            '[{"bbox_2d": [448, 42, 504, 210]}]',
        ],
        ['[{"bbox_2d": [392, 210, 448, 378]}]', '[{"bbox_2d": [0, 252, 56, 420]}]'],
        '[{"bbox_2d": [112, 294, 280, 420]}]',
        '[{"bbox_2d": [56, 42, 112, 210], "label": "person"}, {"bbox_2d": [168, 42, 224, 210], '
        '"label": "person"}, {"bbox_2d": [280, 42, 336, 210], "label": "person"}, {"bbox_2d": '
        '[392, 210, 448, 378], "label": "person"}, {"bbox_2d": [448, 42, 504, 210], "label": '
        '"person"}]',
    ),
}


@codec_names
def test_the_prompt_renders_every_truth_and_uncertain_region(codec):
    text = detection_rationale_prompt(SAMPLE, CODECS[codec], load_template("detect_rationale"))
    truths, uncertain, ignored, full_answer = PROMPT_BOXES[codec]
    lines = [f"{i}. {box}\n" for i, box in enumerate(truths, start=1)]
    lines += [
        f"- {uncertain[0]}: easy to overlook: small, far away, cut by the image edge or blending "
        "into the crowd\n",
        f"- {uncertain[1]}: looks like a person at a glance but is not one\n",
        f"- {ignored}\n",
        f"<answer>{full_answer}</answer>\n",
    ]
    for line in lines:
        assert line in text
    assert [text.index(line) for line in lines] == sorted(text.index(line) for line in lines)
    assert "It holds 5 person instances;" in text
    assert "The question is: Find every person in the image." in text
    assert codec_hint(CODECS[codec], WIDTH, HEIGHT) in text
    assert "never mention a detector" in text


def test_the_prompt_leaves_out_empty_sections_and_needs_the_class():
    template = load_template("detect_rationale")
    plain = replace(SAMPLE, gt_boxes=SAMPLE.gt_boxes[:1], uncertain_regions=(), ignore_regions=())
    text = detection_rationale_prompt(plain, CODECS["pixel"], template)
    assert "It holds 1 person instance;" in text
    assert "hard to judge" not in text and "too dense" not in text
    assert "the hard regions above" not in text
    with pytest.raises(ValueError, match="crowd-7: a detection rationale needs the class name"):
        detection_rationale_prompt(replace(SAMPLE, target=" "), CODECS["pixel"], template)


def test_the_template_is_built_in_and_an_override_gets_every_variable(tmp_path):
    assert "detect_rationale" in BUILTIN_TEMPLATES
    path = tmp_path / "mine.j2"
    path.write_text(
        "{{ domain }} {{ label }} {{ width }}x{{ height }} {{ codec_name }} "
        "{% for u in uncertain %}{{ u.index }}:{{ u.reason }} {% endfor %}"
        "{{ boxes | map(attribute='index') | join(',') }} {{ ignore_regions | length }}",
        encoding="utf-8",
    )
    text = detection_rationale_prompt(SAMPLE, CODECS["pixel"], load_template(path))
    assert text == "person person 1120x840 pixel 1:missed 2:false_positive 1,2,3,4,5 1"


def test_the_job_carries_the_image_and_the_prompt():
    template, codec = load_template("detect_rationale"), CODECS["norm1000"]
    job = detection_rationale_job(SAMPLE, template, codec, system="You are careful.")
    assert job.item_id == "crowd-7" and job.context is SAMPLE
    (request,) = job.requests
    assert request.images == (SAMPLE.image,)
    assert request.image_ids == (sha256_hex(SAMPLE.image),)
    assert request.prompt == detection_rationale_prompt(SAMPLE, codec, template)
    assert request.template_hash == template.hash
    assert request.system == "You are careful."
    assert detection_rationale_job(SAMPLE, template, codec).requests[0].system is None


def test_look_boxes_are_written_in_the_students_frame():
    import io

    from PIL import Image

    from groundforge.pipelines.crowd import attach_detection_rationale
    from groundforge.schemas.arrow import sample_to_row
    from groundforge.trainer.data import make_codec, resize_row, sft_example

    # 1600 x 1200: qwen25vl at 1003520 (teacher) reads 1148 x 840, at 401408 (student) 728 x 532.
    truths = (Box(400, 300, 1200, 900), Box(800, 600, 1600, 1200))
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (90, 90, 90)).save(buf, "PNG")
    sample = replace(
        SAMPLE,
        image=buf.getvalue(),
        width=1600,
        height=1200,
        gt_boxes=truths,
        uncertain_regions=(UncertainRegion(truths[1], "occluded"),),
        ignore_regions=(),
    )
    teacher = get_codec("qwen25vl", max_pixels=1003520)
    text = (
        "<think>Two people: one in the middle, one half hidden at the bottom right.</think>"
        '<look>[{"bbox_2d": [574, 420, 1148, 840], "label": "person"}] a shoulder behind the '
        "rail; and [0, 0, 736, 499] is only the wall</look>"
        '<answer>[{"bbox_2d": [287, 210, 861, 630]}, {"bbox_2d": [574, 420, 1148, 840]}]</answer>'
    )
    kept = attach_detection_rationale((sample, (text,)), teacher, DetectionRules(), "teacher-m")
    assert kept.keep, kept.reason
    assert kept.value.rationale == (
        "<think>Two people: one in the middle, one half hidden at the bottom right.</think>"
        "<look>⟦box 0⟧ a shoulder behind the rail; and ⟦box 1⟧ is only the wall</look>"
    )
    row = sample_to_row(kept.value)
    row["image"] = Image.open(io.BytesIO(row["image"]["bytes"]))
    student = make_codec("qwen25vl", max_pixels=401408)
    example = sft_example(resize_row(row, student, None), student)
    assert example["messages"][1]["content"][0]["text"] == (
        "<think>Two people: one in the middle, one half hidden at the bottom right.</think>"
        '<look>[{"bbox_2d": [364, 266, 728, 532], "label": "person"}] a shoulder behind the '
        'rail; and [{"bbox_2d": [0, 0, 467, 316]}] is only the wall</look>'
        '<answer>[{"bbox_2d": [182, 133, 546, 399], "label": "person"}, '
        '{"bbox_2d": [364, 266, 728, 532], "label": "person"}]</answer>'
    )
