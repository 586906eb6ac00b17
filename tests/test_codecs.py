import doctest
import json
import string
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from groundforge.schemas import codecs as codecs_module
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import (
    CODECS,
    BoxCodec,
    Norm01Codec,
    Norm1000Codec,
    PixelCodec,
    Qwen3VLCodec,
    Qwen25VLCodec,
    extract_quads,
    get_codec,
    smart_resize,
)

ROUND_TRIP_CODECS = [
    PixelCodec(),
    Norm1000Codec(),
    Norm1000Codec(tokens=False),
    Qwen25VLCodec(),
    Qwen25VLCodec(max_pixels=256 * 28 * 28),
    Qwen25VLCodec(max_pixels=12845056),
    Qwen25VLCodec(min_pixels=1024 * 28 * 28, max_pixels=2048 * 28 * 28),
    Qwen3VLCodec(),
    Norm01Codec(),
]
sides = st.integers(1, 4000)
labels = st.text(string.ascii_letters + string.digits + " -", max_size=12)


def test_doctests():
    result = doctest.testmod(codecs_module)
    assert result.failed == 0 and result.attempted > 20


def test_registry():
    assert list(CODECS) == ["pixel", "norm1000", "qwen25vl", "qwen3vl", "norm01"]
    assert get_codec("norm1000", tokens=False) == Norm1000Codec(tokens=False)
    assert get_codec("qwen25vl", max_pixels=200704).max_pixels == 200704
    with pytest.raises(ValueError, match="unknown box codec 'qwen2'"):
        get_codec("qwen2")


# --- round trips ---------------------------------------------------------------------------------


@st.composite
def image_sizes(draw, codec: BoxCodec) -> tuple[int, int]:
    width, height = draw(sides), draw(sides)
    if isinstance(codec, Qwen25VLCodec):  # the processor refuses aspect ratios above 200
        assume(max(width, height) / min(width, height) <= 200)
    return width, height


@st.composite
def boxes_in(draw, codec: BoxCodec, width: int, height: int) -> Box:
    """A box inside the image, more than one frame unit wide and high."""
    ux, uy = codec.unit(width, height)
    min_w, min_h = ux * (1 + 1e-6), uy * (1 + 1e-6)  # more than a unit beyond float error
    assume(width > min_w and height > min_h)
    fx1, fy1, fw, fh = (draw(st.floats(0, 1)) for _ in range(4))
    x1, y1 = fx1 * (width - min_w), fy1 * (height - min_h)
    x2 = min(width, x1 + min_w + fw * (width - x1 - min_w))
    y2 = min(height, y1 + min_h + fh * (height - y1 - min_h))
    assume(x2 - x1 > ux * (1 + 1e-7) and y2 - y1 > uy * (1 + 1e-7))
    # Rendered values all 0 or 1 would be read as fractions of the image (the scorer's rule).
    assume(x2 / ux > 2 or y2 / uy > 2)
    return Box(x1, y1, x2, y2)


def assert_within_half_unit(parsed: Box, box: Box, unit: tuple[float, float]) -> None:
    ux, uy = unit
    for got, want, u in zip(parsed.to_list(), box.to_list(), (ux, uy, ux, uy), strict=True):
        assert abs(got - want) <= 0.5 * u + 1e-9 * (1 + abs(want)), (parsed, box, unit)


@pytest.mark.parametrize("codec", ROUND_TRIP_CODECS, ids=repr)
@given(data=st.data())
def test_render_then_parse_gives_the_box_back(codec: BoxCodec, data: st.DataObject):
    width, height = data.draw(image_sizes(codec))
    box = data.draw(boxes_in(codec, width, height))
    label = data.draw(st.none() | labels)
    parsed = codec.parse(codec.render(box, width, height, label=label), width, height)
    assert len(parsed) == 1
    assert_within_half_unit(parsed[0], box, codec.unit(width, height))
    assert codec.parse_last(codec.render(box, width, height), width, height) == parsed[0]


@pytest.mark.parametrize("codec", ROUND_TRIP_CODECS, ids=repr)
@given(data=st.data())
def test_render_many_then_parse_keeps_the_order(codec: BoxCodec, data: st.DataObject):
    width, height = data.draw(image_sizes(codec))
    boxes = data.draw(st.lists(boxes_in(codec, width, height), max_size=6))
    names = data.draw(st.none() | st.lists(labels, min_size=len(boxes), max_size=len(boxes)))
    parsed = codec.parse(codec.render_many(boxes, width, height, names), width, height)
    assert len(parsed) == len(boxes)
    for got, want in zip(parsed, boxes, strict=True):
        assert_within_half_unit(got, want, codec.unit(width, height))


# --- the Qwen2.5-VL resize ---------------------------------------------------------------------

PIXEL_BUDGETS = [  # (min_pixels, max_pixels)
    (56 * 56, 28 * 28 * 1280),
    (56 * 56, 12845056),
    (256 * 28 * 28, 1280 * 28 * 28),
    (65536, 16777216),
    (4 * 28 * 28, 16 * 28 * 28),
]


@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    factor=st.sampled_from([28, 32, 14]),
    budget=st.sampled_from(PIXEL_BUDGETS),
)
def test_smart_resize_agrees_with_transformers(height, width, factor, budget):
    min_pixels, max_pixels = budget
    try:
        expected = hf_qwen2_vl.smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize(height, width, factor, min_pixels, max_pixels)
    else:
        assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected


PROCESSOR_SIZES = [
    (1, 1), (14, 14), (42, 70), (57, 83), (333, 500), (480, 640), (1000, 1000), (1792, 2240),
    (2001, 1999), (3000, 4000), (20, 4000), (4000, 21),
]  # fmt: skip


@pytest.mark.parametrize("budget", PIXEL_BUDGETS[:3])
@pytest.mark.parametrize("height, width", PROCESSOR_SIZES)
def test_smart_resize_agrees_with_the_processor(height, width, budget):
    min_pixels, max_pixels = budget
    processor = hf_qwen2_vl.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    out = processor(images=image, input_data_format="channels_last", return_tensors="np")
    _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    codec = Qwen25VLCodec(min_pixels=min_pixels, max_pixels=max_pixels)
    assert codec.frame(width, height) == (grid_w * 14, grid_h * 14)


def test_qwen25vl_defaults_are_the_processor_defaults():
    assert IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"]["pil"] == "Qwen2VLImageProcessorPil"
    processor = hf_qwen2_vl.Qwen2VLImageProcessorPil()
    codec = Qwen25VLCodec()
    assert (codec.min_pixels, codec.max_pixels) == (3136, 1003520)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (3136, 1003520)
    assert codec.factor == processor.patch_size * processor.merge_size == 28


def test_smart_resize_exact_values():
    assert smart_resize(1792, 2240) == (896, 1120)  # exactly 4 x max_pixels: both sides halve
    assert smart_resize(480, 640) == (476, 644)  # the aspect ratio moves: x and y scale apart
    # Python's round sends halves to the even multiple of 28: 42 -> 56, 70 -> 56, 126 -> 112.
    assert smart_resize(42, 980) == (56, 980)
    assert smart_resize(70, 980) == (56, 980)
    assert smart_resize(126, 980) == (112, 980)
    assert smart_resize(1, 1) == (56, 56)  # too small: grown to min_pixels
    assert smart_resize(1, 200) == (28, 812)  # aspect 200 is still accepted
    assert smart_resize(3000, 4000, max_pixels=256 * 28 * 28) == (364, 504)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen25VLCodec().parse("[1, 2, 3, 4]", 201, 1)


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec, box, size, label, text",
    [
        (PixelCodec(), Box(10.4, 20, 110.6, 70), (640, 480), None, "[10, 20, 111, 70]"),
        (PixelCodec(), Box(-5, 10, 700, 30), (640, 480), None, "[0, 10, 640, 30]"),
        (
            PixelCodec(),
            Box(10, 20, 110, 70),
            (640, 480),
            "dog",
            '{"bbox": [10, 20, 110, 70], "label": "dog"}',
        ),
        (
            Norm1000Codec(),
            Box(64, 48, 320, 240),
            (640, 480),
            None,
            "<|box_start|>(100,100),(500,500)<|box_end|>",
        ),
        (
            Norm1000Codec(),
            Box(64, 48, 320, 240),
            (640, 480),
            "Boeing 757",
            "<|object_ref_start|>Boeing 757<|object_ref_end|>"
            "<|box_start|>(100,100),(500,500)<|box_end|>",
        ),
        (
            Norm1000Codec(tokens=False),
            Box(1, 1, 2, 2),
            (3, 3),
            "dog",
            "dog(333,333),(667,667)",
        ),
        (
            Qwen3VLCodec(),
            Box(64, 48, 320, 240),
            (640, 480),
            "dog",
            '[{"bbox_2d": [100, 100, 500, 500], "label": "dog"}]',
        ),
        (
            Qwen25VLCodec(),
            Box(160, 120, 480, 360),
            (640, 480),
            None,
            '[{"bbox_2d": [161, 119, 483, 357]}]',
        ),
        (
            Qwen25VLCodec(max_pixels=256 * 28 * 28),
            Box(400, 320, 800, 1440),
            (2240, 1792),
            "Île",
            '[{"bbox_2d": [85, 70, 170, 315], "label": "Île"}]',
        ),
        (Norm01Codec(), Box(64, 48, 320, 240), (640, 480), None, "[0.1, 0.1, 0.5, 0.5]"),
        (Norm01Codec(), Box(1, 1, 2, 2), (3, 3), None, "[0.333, 0.333, 0.667, 0.667]"),
    ],
)
def test_render_exact_text(codec, box, size, label, text):
    assert codec.render(box, *size, label=label) == text


def test_render_many_exact_text():
    boxes, size = [Box(64, 48, 320, 240), Box(320, 240, 576, 432)], (640, 480)
    assert Norm1000Codec().render_many(boxes, *size, ["a", "b"]) == (
        "<|object_ref_start|>a<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
        "<|object_ref_start|>b<|object_ref_end|><|box_start|>(500,500),(900,900)<|box_end|>"
    )
    assert json.loads(Qwen3VLCodec().render_many(boxes, *size, ["a", "b"])) == [
        {"bbox_2d": [100, 100, 500, 500], "label": "a"},
        {"bbox_2d": [500, 500, 900, 900], "label": "b"},
    ]
    assert PixelCodec().render_many(boxes, *size) == "[[64, 48, 320, 240], [320, 240, 576, 432]]"
    assert Qwen25VLCodec().render_many([], *size) == "[]"
    with pytest.raises(ValueError):
        PixelCodec().render_many(boxes, *size, labels=["only one"])


def test_unit():
    assert PixelCodec().unit(640, 480) == (1.0, 1.0)
    assert Norm1000Codec().unit(640, 480) == (0.64, 0.48)
    assert Qwen3VLCodec().unit(2000, 10) == (2.0, 0.01)
    assert Norm01Codec().unit(640, 480) == pytest.approx((0.64, 0.48), rel=1e-12)
    assert Qwen25VLCodec().unit(2240, 1792) == (2.0, 2.0)
    assert Qwen25VLCodec().unit(640, 480) == (640 / 644, 480 / 476)


# --- parsing model text --------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A codec, an image size, frame values of a few boxes and the pixel boxes they stand for."""

    codec: BoxCodec
    size: tuple[int, int]
    a: list[float]
    b: list[float]
    wide: list[float]  # runs off the image on the left and on the right
    outside: list[float]  # wholly to the right of the image
    box_a: Box
    box_b: Box
    wide_box: Box
    quarters_box: Box  # what the fractions [0.25, 0.5, 0.75, 1.0] stand for

    def values(self) -> dict[str, str]:
        named = {"a": self.a, "b": self.b, "wide": self.wide, "outside": self.outside}
        out = {key: json.dumps(v) for key, v in named.items()}
        out.update({f"a{i}": str(v) for i, v in enumerate(self.a, 1)})
        return out


A_640, B_640 = Box(64, 48, 320, 240), Box(320, 240, 576, 432)
WIDE_640, QUARTERS_640 = Box(0, 48, 640, 240), Box(160, 240, 480, 480)
FRAMES = {
    "pixel": Frame(
        PixelCodec(), (640, 480), [64, 48, 320, 240], [320, 240, 576, 432], [-10, 48, 700, 240],
        [650, 48, 700, 240], A_640, B_640, WIDE_640, QUARTERS_640,
    ),
    "norm1000": Frame(
        Norm1000Codec(), (640, 480), [100, 100, 500, 500], [500, 500, 900, 900],
        [-50, 100, 1200, 500], [1100, 100, 1200, 500], A_640, B_640, WIDE_640, QUARTERS_640,
    ),
    "qwen3vl": Frame(
        Qwen3VLCodec(), (640, 480), [100, 100, 500, 500], [500, 500, 900, 900],
        [-50, 100, 1200, 500], [1100, 100, 1200, 500], A_640, B_640, WIDE_640, QUARTERS_640,
    ),
    "norm01": Frame(
        Norm01Codec(), (640, 480), [0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9],
        [-0.05, 0.1, 1.2, 0.5], [1.1, 0.1, 1.3, 0.5], A_640, B_640, WIDE_640, QUARTERS_640,
    ),
    # 2240 x 1792 is resized to 1120 x 896: every frame value is half the pixel value.
    "qwen25vl": Frame(
        Qwen25VLCodec(), (2240, 1792), [100, 50, 500, 450], [500, 450, 1000, 800],
        [-20, 50, 1300, 450], [1200, 50, 1300, 450], Box(200, 100, 1000, 900),
        Box(1000, 900, 2000, 1600), Box(0, 100, 2240, 900), Box(560, 896, 1680, 1792),
    ),
}  # fmt: skip

# (case, model output with $a/$b/$wide/$outside for the frame's boxes and $a1..$a4 for a's values,
#  the names of the expected boxes on the Frame, in order)
MODEL_OUTPUTS = [
    ("json", '[{"bbox_2d": $a, "label": "dog"}]', ["box_a"]),
    ("json_other_keys", '[{"bbox": $a, "label": "dog"}, {"box": $b}]', ["box_a", "box_b"]),
    (
        "fenced_json",
        '```json\n[\n  {"bbox_2d": $a, "label": "dog"},\n  {"bbox_2d": $b, "label": "cat"}\n]\n```',
        ["box_a", "box_b"],
    ),
    ("single_quotes", "[{'bbox_2d': $a, 'label': 'dog'}]", ["box_a"]),
    ("nested_lists", "[$a, $b]", ["box_a", "box_b"]),
    (
        "truncated_json",
        '[{"bbox_2d": $a, "label": "a"}, {"bbox_2d": $b, "label": "b"}, {"bbox_2d": [$a1, $a2',
        ["box_a", "box_b"],
    ),
    ("bare_list", "The dog is at $a.", ["box_a"]),
    ("tuple", "The dog is at ($a1, $a2, $a3, $a4).", ["box_a"]),
    ("pairs", "($a1,$a2),($a3,$a4)", ["box_a"]),
    (
        "tokens",
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>($a1,$a2),($a3,$a4)<|box_end|>",
        ["box_a"],
    ),
    ("skip_special_tokens", "dog($a1,$a2),($a3,$a4)", ["box_a"]),
    ("fractions", "[0.25, 0.5, 0.75, 1.0]", ["quarters_box"]),
    ("swapped_corners", "[$a3, $a4, $a1, $a2]", ["box_a"]),
    ("swapped_pairs", "($a3,$a2),($a1,$a4)", ["box_a"]),
    ("clamped", "$wide", ["wide_box"]),
    ("degenerate_dropped", "[$a1, $a2, $a1, $a4] $outside $b", ["box_b"]),
    ("order_of_appearance", "first $b, then ($a1,$a2),($a3,$a4)", ["box_b", "box_a"]),
    ("answer", "<think>Compare $a with $b.</think>\n<answer>$b</answer>", ["box_b"]),
    ("answer_cut", '<think>It is $a.</think><answer>[{"bbox_2d": $b, "label": "c', ["box_b"]),
    ("answer_without_box", "<think>It is $a.</think><answer>the left one</answer>", ["box_a"]),
    ("garbage", "I cannot find it.", []),
    ("not_numbers", "[NaN, 1, 2, 3] [inf, 0, 5, 5] [1e999, 0, 5, 5] [x1, y1, x2, y2]", []),
    ("wrong_lengths", "[1, 2, 3] (4, 5) [1, 2, 3, 4, 5] [$a1, $a2", []),
]


@pytest.mark.parametrize(
    "case, template, expected", MODEL_OUTPUTS, ids=[case[0] for case in MODEL_OUTPUTS]
)
@pytest.mark.parametrize("frame", FRAMES.values(), ids=FRAMES.keys())
def test_parse_model_outputs(frame: Frame, case: str, template: str, expected: list[str]):
    text = string.Template(template).substitute(frame.values())
    assert frame.codec.parse(text, *frame.size) == [getattr(frame, name) for name in expected]


@pytest.mark.parametrize("frame", FRAMES.values(), ids=FRAMES.keys())
def test_parse_last(frame: Frame):
    text = string.Template("<think>$a or $b? $a.</think> So: $b").substitute(frame.values())
    assert frame.codec.parse_last(text, *frame.size) == frame.box_b
    assert frame.codec.parse_last("no box", *frame.size) is None


def test_parse_decimals_negatives_and_huge_values():
    pixel, norm1000 = PixelCodec(), Norm1000Codec()
    assert pixel.parse("[64.5, 48.25, 320.75, 240]", 640, 480) == [Box(64.5, 48.25, 320.75, 240)]
    assert pixel.parse("(-.5, +2e1, 1E2, 4.)", 640, 480) == [Box(0, 4, 100, 20)]
    assert norm1000.parse("(100.5,250),(500,750)", 640, 480) == [Box(64.32, 120, 320, 360)]
    assert norm1000.parse('{"bbox_2d": ["100", "250", "500", "750"]}', 640, 480) == [
        Box(64, 120, 320, 360)
    ]
    assert pixel.parse("[0, 0, 1e30, 1e300]", 640, 480) == [Box(0, 0, 640, 480)]
    assert pixel.parse("[-1e30, -1e30, -5, 100]", 640, 480) == []  # clamps to a line at x = 0


def test_fraction_rule_applies_to_integer_frames_too():
    # [0, 0, 1, 1] is read as the whole image, not as one pixel or 1/1000 of it.
    assert PixelCodec().parse("[0, 0, 1, 1]", 640, 480) == [Box(0, 0, 640, 480)]
    assert Norm1000Codec().parse("(0,0),(1,1)", 640, 480) == [Box(0, 0, 640, 480)]
    # values summing to 4 are not fractions: a one-pixel-square box at (1, 1) is dropped.
    assert PixelCodec().parse("[1, 1, 1, 1]", 640, 480) == []
    assert PixelCodec().parse("[1, 0, 2, 1]", 640, 480) == [Box(1, 0, 2, 1)]


@pytest.mark.parametrize("text", [None, 42, b"[1, 2, 3, 4]", ["[1, 2, 3, 4]"], "", "[]"])
def test_parse_non_text_and_empty_gives_nothing(text):
    for codec in ROUND_TRIP_CODECS:
        assert codec.parse(text, 640, 480) == []
        assert codec.parse_last(text, 640, 480) is None


FRAGMENTS = st.sampled_from(
    ["[", "]", "(", ")", "{", "}", ",", ":", "'", '"', " ", "\n", "-", ".", "e", "0", "7", "0.5",
     "1e999", "-1e400", "NaN", "bbox_2d", "<answer>", "</answer>", "<|box_start|>", "```json"]
)  # fmt: skip


@pytest.mark.parametrize("codec", ROUND_TRIP_CODECS, ids=repr)
@given(
    text=st.text() | st.lists(FRAGMENTS, max_size=60).map("".join),
    width=sides,
    height=sides,
)
def test_parse_never_raises_and_stays_in_the_image(codec, text, width, height):
    assume(not isinstance(codec, Qwen25VLCodec) or max(width, height) / min(width, height) <= 200)
    for box in codec.parse(text, width, height):
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height


def test_extract_quads_reads_all_forms_in_order():
    text = "(1,2),(3,4) [5, 6, 7, 8] (9, 10, 11, 12) [[13, 14], [15, 16]] {'b': ['17', 18, 19, 20]}"
    assert extract_quads(text) == [
        (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20),
    ]  # fmt: skip
    answers = "<answer>[1, 2, 3, 4]</answer> <answer>(5,6),(7,8)</answer> [9, 9, 9, 9]"
    assert extract_quads(answers) == [(1, 2, 3, 4), (5, 6, 7, 8)]
