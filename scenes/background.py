"""The canvas colour of a scene: one that every member's outline stands out against.

A member pasted on a canvas of its own border colour loses its outline (a white-field flag on a
white canvas shows only its emblem, and its box spans white nobody can see). With ``"auto"``
the canvas takes the first :data:`PALETTE` colour that contrasts clearly with every side of
every pasted member, measured on the outermost ring of the pixels actually pasted. A side
contrasts clearly when at least three quarters of its pixels lie at least :data:`CLEAR` from
the colour (Euclidean RGB distance), so a stripe or an antialiased corner of the canvas's colour
does not disqualify it. When no palette colour clears every side (more distinct border colours
than the palette can avoid), the one whose weakest side contrasts most is taken.

Everything is integer arithmetic on the pasted pixels, so the choice is the same on any runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

RGB = tuple[int, int, int]
AUTO = "auto"
Background = RGB | Literal["auto"]

# In order of preference: white while it works (the usual ground of composed scenes), then
# neutrals, then colours. Every two of them lie more than CLEAR apart, so a member whose border
# is one palette colour never rules out the next.
PALETTE: tuple[RGB, ...] = (
    (255, 255, 255),
    (0, 0, 0),
    (128, 128, 128),
    (30, 80, 170),
    (30, 140, 70),
    (235, 190, 40),
    (180, 40, 140),
    (60, 190, 200),
)
CLEAR = 96
# The share of a side's pixels that may lie closer than CLEAR to the canvas.
_LENIENCE = 4  # one pixel in four


def check_background(value: object) -> None:
    """Raise ValueError unless ``value`` is ``"auto"`` or 3 values in 0..255."""
    if value == AUTO:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in value)
    ):
        raise ValueError(f"background must be 'auto' or 3 values in 0..255, got {value!r}")


def sides(pixels: np.ndarray) -> list[np.ndarray]:
    """The four one-pixel sides (top, bottom, left, right) of an ``(h, w, 3)`` image."""
    return [pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]


def side_contrast(side: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Per colour, the squared distance that all but one in ``_LENIENCE`` of the side's pixels
    reach or exceed."""
    diff = side.astype(np.int64)[None, :, :] - colours[:, None, :]
    squared = np.square(diff).sum(axis=2)
    rank = squared.shape[1] // _LENIENCE
    return np.partition(squared, rank, axis=1)[:, rank]


def pick_background(member_sides: Sequence[np.ndarray], background: Background) -> RGB:
    """The canvas colour for members with these sides: ``background`` itself unless "auto".

    >>> white_field = np.full((4, 6, 3), 255, dtype=np.uint8)
    >>> pick_background(sides(white_field), "auto")
    (0, 0, 0)
    >>> pick_background(sides(white_field), (255, 255, 255))
    (255, 255, 255)
    """
    if background != AUTO:
        return tuple(int(c) for c in background)
    palette = np.array(PALETTE, dtype=np.int64)
    weakest = np.full(len(PALETTE), np.iinfo(np.int64).max)
    for side in member_sides:
        weakest = np.minimum(weakest, side_contrast(side, palette))
    clear = np.flatnonzero(weakest >= CLEAR * CLEAR)
    best = int(clear[0]) if clear.size else int(np.argmax(weakest))
    return PALETTE[best]
