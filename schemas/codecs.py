"""Box codecs: the text a model family reads and writes for a box, and back to pixels.

A codec renders a :class:`~groundforge.schemas.box.Box` (float pixels of an image of ``width`` x
``height``) into one model family's coordinate frame and text format, and parses model text back
into pixel boxes of that same image. Every codec parses with one tolerant extraction routine
(:func:`extract_quads`) and differs only in its frame and in how it writes a box:

- ``pixel``: ``[x1, y1, x2, y2]`` in integer pixels of the image;
- ``norm1000`` (Qwen2-VL): ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in integers 0..1000;
- ``qwen25vl`` (Qwen2.5-VL): ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` in integer pixels
  of the image after the processor's resize (:func:`smart_resize`);
- ``qwen3vl`` (Qwen3-VL): the same JSON in integers 0..1000;
- ``norm01``: ``[x1, y1, x2, y2]`` in fractions of the image, three decimals.

Parsing never raises on model text: what holds no readable box parses to ``[]``.

>>> codec = get_codec("norm1000")
>>> codec.render(Box(64, 48, 320, 240), 640, 480, label="dog")
'<|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>'
>>> codec.parse("<answer>dog(100,100),(500,500)</answer>", 640, 480)
[Box(x1=64.0, y1=48.0, x2=320.0, y2=240.0)]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from groundforge.schemas.box import Box

Quad = tuple[float, float, float, float]

# A number as models write it (sign, decimals, exponent), bare or quoted as a JSON string.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = rf"\s*['\"]?({_NUMBER})['\"]?\s*"
_OPEN, _CLOSE = r"[\[(]", r"[\])]"
# (x1,y1),(x2,y2): Qwen2-VL boxes, with or without the box tokens around them.
POINT_PAIR = rf"{_OPEN}{_VALUE},{_VALUE}{_CLOSE}\s*(?:,\s*)?{_OPEN}{_VALUE},{_VALUE}{_CLOSE}"
# [x1, y1, x2, y2] or (x1, y1, x2, y2): JSON lists (complete ones only), tuples.
FOUR_VALUES = rf"{_OPEN}{_VALUE},{_VALUE},{_VALUE},{_VALUE}{_CLOSE}"
BOX_PATTERN = re.compile(f"{POINT_PAIR}|{FOUR_VALUES}")
# The whole written form around a box, so a quoted box can be rewritten in another codec's form:
# a JSON object holding one box (``{"bbox_2d": [..], "label": ..}``), a list of such objects or
# of bare boxes, or a Qwen2-VL box inside its tokens (with its object reference, when written).
_OBJECT = rf"\{{[^{{}}]*?(?:{POINT_PAIR}|{FOUR_VALUES})[^{{}}]*?\}}"
_ITEM = rf"(?:{_OBJECT}|{POINT_PAIR}|{FOUR_VALUES})"
_REF = r"(?:<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>\s*)?"
WRITTEN_BOX = re.compile(
    rf"\[\s*{_ITEM}(?:\s*,\s*{_ITEM})*\s*,?\s*\]"
    rf"|{_REF}<\|box_start\|>\s*(?:{POINT_PAIR}|{FOUR_VALUES})\s*<\|box_end\|>"
    rf"|{_OBJECT}|{POINT_PAIR}|{FOUR_VALUES}",
    re.DOTALL,
)
_OBJECT_PATTERN = re.compile(_OBJECT)
_LABEL = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')
# A box template's placeholder: the indices of the boxes one written box (or list) held.
PLACEHOLDER = re.compile(r"⟦box((?: \d+)+)⟧")
# The final answer of a reasoning model; an unclosed block runs to the end of a cut text.
ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def extract_quads(text: object) -> list[Quad]:
    """Every four-number box written in ``text``, in order of appearance, as the raw values.

    Reads JSON (any key, nested lists, fenced, single-quoted, cut short: every box complete
    before the cut), bare lists, tuples and ``(x1,y1),(x2,y2)`` pairs. When ``<answer>`` blocks
    hold boxes, only those are returned (the reference scorer's rule). Non-text gives ``[]``.

    >>> extract_quads("<think>(1,2),(3,4)</think><answer>[{'bbox_2d': [5, 6, 7, 8]}, [9,</answer>")
    [(5.0, 6.0, 7.0, 8.0)]
    >>> extract_quads('```json\\n[{"bbox": [-1.5, 2, 3e2, 4]}]\\n```')
    [(-1.5, 2.0, 300.0, 4.0)]
    """
    if not isinstance(text, str):
        return []
    in_answer = [quad for block in ANSWER_BLOCK.findall(text) for quad in _scan(block)]
    return in_answer or _scan(text)


def _scan(text: str) -> list[Quad]:
    quads = []
    for match in BOX_PATTERN.finditer(text):
        values = tuple(float(v) for v in match.groups() if v is not None)
        if all(math.isfinite(v) for v in values):
            quads.append(values)
    return quads


def is_fraction(quad: Quad) -> bool:
    """The reference scorer's rule: four values in [0, 1] summing to less than 4 are fractions.

    >>> is_fraction((0.1, 0.2, 0.5, 0.9)), is_fraction((0, 0, 1, 1)), is_fraction((1, 1, 1, 1))
    (True, True, False)
    """
    return all(0 <= v <= 1 for v in quad) and sum(quad) < 4


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The ``(height, width)`` the Qwen2-VL / Qwen2.5-VL image processor resizes an image to.

    Each side is rounded to a multiple of ``factor`` (Python's ``round``: halves go to the even
    multiple); if the area then leaves ``[min_pixels, max_pixels]``, both sides are rescaled from
    the original size by one factor, floored (too large) or ceiled (too small) to multiples of
    ``factor``. Aspect ratios above 200 raise ``ValueError``, as in transformers.

    >>> smart_resize(1792, 2240)   # 4 x max_pixels: both sides halve
    (896, 1120)
    >>> smart_resize(480, 70)      # 70 px is 2.5 x 28 and rounds down to 56
    (476, 56)
    """
    if not (height >= 1 and width >= 1):
        raise ValueError(f"image sides must be at least 1 pixel, got {height} x {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height} x {width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class BoxSpan:
    """Where ``text[start:end]`` writes one box or one list of boxes, and those boxes (pixels of
    the image) with their labels (None when unlabelled)."""

    start: int
    end: int
    boxes: tuple[Box, ...]
    labels: tuple[str | None, ...]


@dataclass(frozen=True)
class BoxCodec:
    """A coordinate frame plus a text format; subclasses set ``name`` and :meth:`frame`.

    The base format is a JSON list ``[x1, y1, x2, y2]`` (an object with ``bbox`` and ``label``
    when labelled); several boxes make a JSON list of those.

    >>> codec = PixelCodec()
    >>> codec.render(Box(10.4, 20, 110.6, 70), 640, 480)
    '[10, 20, 111, 70]'
    >>> codec.render_many([Box(1, 2, 3, 4), Box(5, 6, 7, 8)], 640, 480, labels=["a", "b"])
    '[{"bbox": [1, 2, 3, 4], "label": "a"}, {"bbox": [5, 6, 7, 8], "label": "b"}]'
    >>> codec.parse("first (110, 70, 10, 20), then [600, 400, 900, 900]", 640, 480)
    [Box(x1=10.0, y1=20.0, x2=110.0, y2=70.0), Box(x1=600.0, y1=400.0, x2=640.0, y2=480.0)]
    >>> codec.parse_last("no box here", 640, 480) is None
    True
    """

    name: ClassVar[str]
    decimals: ClassVar[int] = 0  # digits after the point when rendering; 0 writes integers

    def frame(self, width: int, height: int) -> tuple[float, float]:
        """The frame's extent over the whole image: the ``x2, y2`` of a full-image box."""
        raise NotImplementedError

    def unit(self, width: int, height: int) -> tuple[float, float]:
        """The size in pixels, on x and on y, of the smallest step the rendered text can take."""
        fw, fh = self._checked_frame(width, height)
        step = 10.0**-self.decimals
        return width / fw * step, height / fh * step

    def to_frame(self, box: Box, width: int, height: int) -> list[float]:
        """The box clipped to the image, in frame values rounded as they are rendered."""
        fw, fh = self._checked_frame(width, height)
        b = box.clip(width, height)
        values = (b.x1 * fw / width, b.y1 * fh / height, b.x2 * fw / width, b.y2 * fh / height)
        return [round(v, self.decimals) if self.decimals else round(v) for v in values]

    def render(self, box: Box, width: int, height: int, label: str | None = None) -> str:
        """One box as the model writes it."""
        return self._span(self.to_frame(box, width, height), label)

    def render_many(
        self,
        boxes: Sequence[Box],
        width: int,
        height: int,
        labels: Sequence[str | None] | None = None,
    ) -> str:
        """Several boxes as the model writes them, in the given order."""
        labels = [None] * len(boxes) if labels is None else labels
        spans = [
            self._span(self.to_frame(box, width, height), label)
            for box, label in zip(boxes, labels, strict=True)
        ]
        return self._join(spans)

    def parse(self, text: object, width: int, height: int) -> list[Box]:
        """Every box in ``text``, in order, in pixels of the image: corners put right, clipped to
        the image, degenerate boxes dropped. Values that are fractions (:func:`is_fraction`) are
        read as fractions of the image whatever the frame."""
        boxes = []
        for written in self.parse_as_written(text, width, height):
            box = Box.from_corners(*written.to_list()).clip(width, height)
            if not box.is_degenerate:
                boxes.append(box)
        return boxes

    def parse_as_written(
        self, text: object, width: int, height: int, fractions: bool = True
    ) -> list[Box]:
        """Every box in ``text``, in order, in pixels of the image, exactly as written: corners
        kept in the written order (an inverted box has x2 < x1 or y2 < y1, hence no area), not
        clipped, degenerate boxes kept. With ``fractions`` (the default, as :meth:`parse`)
        fraction-like values (:func:`is_fraction`) are read as fractions of the image; without,
        every value is read in the codec's frame.

        >>> PixelCodec().parse_as_written("[110, 70, 10, 20] [0.1, 0.1, 0.5, 0.5]", 640, 480, False)
        [Box(x1=110.0, y1=70.0, x2=10.0, y2=20.0), Box(x1=0.1, y1=0.1, x2=0.5, y2=0.5)]
        """
        frame = self._checked_frame(width, height)
        boxes = []
        for quad in extract_quads(text):
            fw, fh = (1.0, 1.0) if fractions and is_fraction(quad) else frame
            x1, x2 = (x * width / fw for x in quad[0::2])
            y1, y2 = (y * height / fh for y in quad[1::2])
            boxes.append(Box(x1, y1, x2, y2))
        return boxes

    def find_spans(self, text: str, width: int, height: int) -> list[BoxSpan]:
        """Every box written anywhere in ``text`` (answer block or not), grouped by its written
        form: a JSON list of boxes is one span holding them all, a Qwen2-VL box takes its tokens
        and object reference, a JSON object its label. Boxes are in pixels of the image, corners
        put right, not clipped; fraction-like values read as in :meth:`parse`.

        >>> text = 'left [{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [1, 2, 3, 4]}]'
        >>> span = PixelCodec().find_spans(text, 640, 480)[0]
        >>> text[span.start:span.end] == text[5:], span.labels
        (True, ('a', None))
        """
        frame = self._checked_frame(width, height)
        spans = []
        for match in WRITTEN_BOX.finditer(text):
            written = match.group(0)
            objects = list(_OBJECT_PATTERN.finditer(written))
            pieces = [o.group(0) for o in objects] if objects else [written]
            boxes, labels = [], []
            for piece in pieces:
                label = _LABEL.search(piece)
                for quad in _scan(piece):
                    fw, fh = (1.0, 1.0) if is_fraction(quad) else frame
                    x1, x2 = (x * width / fw for x in quad[0::2])
                    y1, y2 = (y * height / fh for y in quad[1::2])
                    boxes.append(Box.from_corners(x1, y1, x2, y2))
                    labels.append(json.loads(f'"{label.group(1)}"') if label else match["ref"])
            if boxes:
                spans.append(BoxSpan(match.start(), match.end(), tuple(boxes), tuple(labels)))
        return spans

    def parse_last(self, text: object, width: int, height: int) -> Box | None:
        """The last box in ``text`` (the final answer of a reasoning model), or ``None``."""
        boxes = self.parse(text, width, height)
        return boxes[-1] if boxes else None

    def _checked_frame(self, width: int, height: int) -> tuple[float, float]:
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive, got {width} x {height}")
        return self.frame(width, height)

    def _span(self, values: list[float], label: str | None) -> str:
        item = values if label is None else {"bbox": values, "label": label}
        return json.dumps(item, ensure_ascii=False)

    def _join(self, spans: list[str]) -> str:
        return "[" + ", ".join(spans) + "]"


@dataclass(frozen=True)
class PixelCodec(BoxCodec):
    """Integer pixels of the image itself.

    >>> PixelCodec().render(Box(64.2, 47.8, 320, 240), 640, 480)
    '[64, 48, 320, 240]'
    """

    name: ClassVar[str] = "pixel"

    def frame(self, width: int, height: int) -> tuple[float, float]:
        return width, height


@dataclass(frozen=True)
class Norm01Codec(BoxCodec):
    """Fractions of the image, three decimals.

    >>> Norm01Codec().render(Box(64, 48, 320, 240), 640, 480)
    '[0.1, 0.1, 0.5, 0.5]'
    >>> Norm01Codec().parse("[0.1, 0.1, 0.5, 1.2]", 640, 480)
    [Box(x1=64.0, y1=48.0, x2=320.0, y2=480.0)]
    """

    name: ClassVar[str] = "norm01"
    decimals: ClassVar[int] = 3

    def frame(self, width: int, height: int) -> tuple[float, float]:
        return 1.0, 1.0


@dataclass(frozen=True)
class Norm1000Codec(BoxCodec):
    """Qwen2-VL: ``(x1,y1),(x2,y2)`` in integers 0..1000 of the image, inside box tokens.

    With ``tokens=False`` the text is what decoding with ``skip_special_tokens`` leaves.

    >>> Norm1000Codec(tokens=False).render_many([Box(64, 48, 320, 240)] * 2, 640, 480, ["a", "b"])
    'a(100,100),(500,500) b(100,100),(500,500)'
    """

    name: ClassVar[str] = "norm1000"
    tokens: bool = True

    def frame(self, width: int, height: int) -> tuple[float, float]:
        return 1000.0, 1000.0

    def _span(self, values: list[float], label: str | None) -> str:
        x1, y1, x2, y2 = values
        box = f"({x1},{y1}),({x2},{y2})"
        if not self.tokens:
            return (label or "") + box
        ref = "" if label is None else f"<|object_ref_start|>{label}<|object_ref_end|>"
        return f"{ref}<|box_start|>{box}<|box_end|>"

    def _join(self, spans: list[str]) -> str:
        return ("" if self.tokens else " ").join(spans)


@dataclass(frozen=True)
class _BBox2dJson(BoxCodec):
    """The Qwen2.5-VL and Qwen3-VL format: a JSON list of ``{"bbox_2d": [...], "label": ...}``."""

    def render(self, box: Box, width: int, height: int, label: str | None = None) -> str:
        return self.render_many([box], width, height, [label])

    def _span(self, values: list[float], label: str | None) -> str:
        item = {"bbox_2d": values} if label is None else {"bbox_2d": values, "label": label}
        return json.dumps(item, ensure_ascii=False)


@dataclass(frozen=True)
class Qwen25VLCodec(_BBox2dJson):
    """Qwen2.5-VL: integer pixels of the image after the processor's :func:`smart_resize`.

    The defaults are those of the Qwen2-VL image processor class that Qwen2.5-VL uses.

    >>> codec = Qwen25VLCodec()
    >>> codec.render(Box(200, 100, 1000, 900), 2240, 1792, label="dog")   # resized to 1120 x 896
    '[{"bbox_2d": [100, 50, 500, 450], "label": "dog"}]'
    >>> codec.parse('[{"bbox_2d": [100, 50, 500, 450], "label": "dog"}]', 2240, 1792)
    [Box(x1=200.0, y1=100.0, x2=1000.0, y2=900.0)]
    """

    name: ClassVar[str] = "qwen25vl"
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    factor: int = 28

    def frame(self, width: int, height: int) -> tuple[float, float]:
        resized_height, resized_width = smart_resize(
            height, width, self.factor, self.min_pixels, self.max_pixels
        )
        return resized_width, resized_height


@dataclass(frozen=True)
class Qwen3VLCodec(_BBox2dJson):
    """Qwen3-VL: ``bbox_2d`` JSON in integers 0..1000 of the image.

    >>> Qwen3VLCodec().render(Box(64, 48, 320, 240), 640, 480)
    '[{"bbox_2d": [100, 100, 500, 500]}]'
    """

    name: ClassVar[str] = "qwen3vl"

    def frame(self, width: int, height: int) -> tuple[float, float]:
        return 1000.0, 1000.0


CODECS: dict[str, type[BoxCodec]] = {
    codec.name: codec
    for codec in (PixelCodec, Norm1000Codec, Qwen25VLCodec, Qwen3VLCodec, Norm01Codec)
}


def get_codec(name: str, **params: object) -> BoxCodec:
    """The codec called ``name`` (one of :data:`CODECS`), built with ``params``.

    >>> get_codec("qwen25vl", max_pixels=256 * 28 * 28)
    Qwen25VLCodec(min_pixels=3136, max_pixels=200704, factor=28)
    """
    if name not in CODECS:
        raise ValueError(f"unknown box codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name](**params)


def box_template(
    text: str, codec: BoxCodec, width: int, height: int
) -> tuple[str, tuple[Box, ...], tuple[str | None, ...]]:
    """``text`` with every box ``codec`` finds in it (:meth:`BoxCodec.find_spans`) replaced by a
    numbered placeholder, and those boxes in pixels of the image with their labels: a text whose
    boxes no longer depend on the frame it was written in (:func:`render_box_template`).

    >>> box_template("the flag <|box_start|>(100,100),(500,500)<|box_end|>.",
    ...              get_codec("norm1000"), 640, 480)
    ('the flag ⟦box 0⟧.', (Box(x1=64.0, y1=48.0, x2=320.0, y2=240.0),), (None,))
    """
    parts, boxes, labels, end = [], [], [], 0
    for span in codec.find_spans(text, width, height):
        indices = " ".join(str(i) for i in range(len(boxes), len(boxes) + len(span.boxes)))
        parts += [text[end : span.start], f"⟦box {indices}⟧"]
        boxes += span.boxes
        labels += span.labels
        end = span.end
    parts.append(text[end:])
    return "".join(parts), tuple(boxes), tuple(labels)


def render_box_template(
    template: str,
    boxes: Sequence[Box],
    codec: BoxCodec,
    width: int,
    height: int,
    labels: Sequence[str | None] | None = None,
) -> str:
    """A :func:`box_template` written out with ``codec`` for a ``width`` x ``height`` image
    (``boxes`` in its pixels): one box with :meth:`BoxCodec.render`, a list with
    :meth:`BoxCodec.render_many`. A text without placeholders comes back as it is.

    >>> render_box_template("the flag ⟦box 0⟧.", [Box(64, 48, 320, 240)], get_codec("qwen3vl"),
    ...                     640, 480)
    'the flag [{"bbox_2d": [100, 100, 500, 500]}].'
    """
    labels = [None] * len(boxes) if labels is None else labels
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")

    def fill(match: re.Match) -> str:
        indices = [int(i) for i in match.group(1).split()]
        if max(indices) >= len(boxes):
            raise ValueError(f"placeholder {match.group(0)} but only {len(boxes)} boxes")
        if len(indices) == 1:
            return codec.render(boxes[indices[0]], width, height, labels[indices[0]])
        return codec.render_many(
            [boxes[i] for i in indices], width, height, [labels[i] for i in indices]
        )

    return PLACEHOLDER.sub(fill, template)
