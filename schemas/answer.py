"""The layout of a reasoning model's reply: its tagged blocks and the box list of its answer.

A KVG reply is ``<think>T</think><answer>A</answer>`` (:func:`split_think_answer`).
A detection reply (DIP-R1) is ``<think>T</think><look>L</look><answer>A</answer>``: each tag once,
in that order, only whitespace around and between the blocks. The GRPO format reward and the
teacher-rationale check read it with the same helpers, so what the check keeps is what the reward
pays for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from groundforge.schemas.box import Box
from groundforge.schemas.codecs import BoxCodec

_THINK_ANSWER = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)
_THINK_LOOK_ANSWER = re.compile(
    r"\s*<think>(.*?)</think>\s*<look>(.*?)</look>\s*<answer>(.*?)</answer>\s*", re.DOTALL
)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def tags_once(text: str, names: Sequence[str]) -> bool:
    """True when each of ``names`` opens and closes exactly once in ``text``.

    >>> tags_once("<think>a</think><answer>b</answer>", ("think", "answer"))
    True
    >>> tags_once("<think>a</think><think>b</think>", ("think",))
    False
    """
    return all(text.count(f"<{n}>") == 1 and text.count(f"</{n}>") == 1 for n in names)


def split_think_answer(text: object) -> tuple[str, str] | None:
    """The stripped think and answer parts, or None when the layout is not exactly one think
    block then one answer block (whitespace aside): the KVG reply.

    >>> split_think_answer("<think> left one is longer </think>\\n<answer>[1, 2, 3, 4]</answer>")
    ('left one is longer', '[1, 2, 3, 4]')
    >>> split_think_answer("<think>cut short</think><answer>[1, 2,") is None
    True
    """
    if not isinstance(text, str) or not tags_once(text, ("think", "answer")):
        return None
    match = _THINK_ANSWER.fullmatch(text)
    if match is None:
        return None
    think, answer = (part.strip() for part in match.groups())
    return think, answer


def split_think_look_answer(text: object) -> tuple[str, str, str] | None:
    """The stripped think, look and answer parts, or None when the layout is not exactly one
    think, one look and one answer block in that order (whitespace aside).

    >>> text = "<think> crowd </think>\\n<look>[1, 2, 3, 4]</look><answer>[]</answer>"
    >>> split_think_look_answer(text)
    ('crowd', '[1, 2, 3, 4]', '[]')
    >>> split_think_look_answer("<think>t</think><answer>[]</answer><look>x</look>") is None
    True
    """
    if not isinstance(text, str) or not tags_once(text, ("think", "look", "answer")):
        return None
    match = _THINK_LOOK_ANSWER.fullmatch(text)
    if match is None:
        return None
    think, look, answer = (part.strip() for part in match.groups())
    return think, look, answer


def is_empty_list(answer: str, codec: BoxCodec, width: int, height: int) -> bool:
    """True when ``answer`` is an explicit empty box list: ``[]``, optionally in a code fence,
    or what the codec renders for no boxes (the empty string for ``norm1000``).

    >>> from groundforge.schemas.codecs import get_codec
    >>> is_empty_list("```json\\n[ ]\\n```", get_codec("pixel"), 64, 48)
    True
    """
    compact = re.sub(r"\s+", "", _FENCE.sub("", answer.strip()))
    rendered = re.sub(r"\s+", "", codec.render_many([], width, height))
    return compact in ("[]", rendered)


def box_list(answer: str | None, codec: BoxCodec, width: int, height: int) -> list[Box] | None:
    """The answer's boxes in pixels of a ``width`` x ``height`` image, ``[]`` for an explicit
    empty list (``[]``, optionally in a code fence, or what the codec renders for no boxes, the
    empty string for ``norm1000``), None when the answer is no box list.

    >>> from groundforge.schemas.codecs import get_codec
    >>> pixel = get_codec("pixel")
    >>> box_list("[[0, 0, 10, 10], [20, 0, 30, 10]]", pixel, 64, 48)
    [Box(x1=0.0, y1=0.0, x2=10.0, y2=10.0), Box(x1=20.0, y1=0.0, x2=30.0, y2=10.0)]
    >>> box_list("```json\\n[]\\n```", pixel, 64, 48), box_list("none", pixel, 64, 48)
    ([], None)
    """
    if answer is None:
        return None
    boxes = codec.parse(answer, width, height)
    if boxes:
        return boxes
    return [] if is_empty_list(answer, codec, width, height) else None


@dataclass(frozen=True)
class DetectionReply:
    """A well-formed detection reply: its stripped parts, the look regions and the answer boxes
    (both in pixels of the image)."""

    think: str
    look: str
    answer: str
    regions: tuple[Box, ...]
    boxes: tuple[Box, ...]


def parse_detection_reply(
    text: object, codec: BoxCodec, width: int, height: int
) -> DetectionReply | None:
    """The reply read with ``codec`` for a ``width`` x ``height`` image, or None unless it is
    well formed: the think/look/answer layout (:func:`split_think_look_answer`), a non-blank think
    part, at least one region in the look part and a box list (:func:`box_list`, empty allowed)
    as the answer.

    >>> from groundforge.schemas.codecs import get_codec
    >>> pixel = get_codec("pixel")
    >>> reply = parse_detection_reply(
    ...     "<think>two people</think><look>[0, 0, 9, 9] half hidden</look><answer>[]</answer>",
    ...     pixel, 64, 48)
    >>> reply.regions, reply.boxes
    ((Box(x1=0.0, y1=0.0, x2=9.0, y2=9.0),), ())
    >>> parse_detection_reply("<think>t</think><look>nothing</look><answer>[]</answer>",
    ...                       pixel, 64, 48) is None
    True
    """
    parts = split_think_look_answer(text)
    if parts is None or not parts[0]:
        return None
    think, look, answer = parts
    regions = codec.parse(look, width, height)
    boxes = box_list(answer, codec, width, height)
    if not regions or boxes is None:
        return None
    return DetectionReply(think, look, answer, tuple(regions), tuple(boxes))
