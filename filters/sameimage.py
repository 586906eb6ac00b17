"""Are two images the same picture? A verification that compares the pixels themselves.

Hashes and embeddings only propose candidates; :func:`same_picture` decides. Each image is first
reduced to a :class:`Look`: its uniform frame trimmed (a border of one colour on all four sides,
such as padding), the rest resized to ``LOOK_SIDE`` x ``LOOK_SIDE`` RGB, and its aspect ratio.
Two looks are the same picture when

- their aspect ratios agree within ``max_aspect_change`` (a crop of a few percent changes it a
  little; Monaco's 4:5 and Indonesia's 2:3 differ by 18%);
- after the best small alignment per axis (scales within ``max_aspect_change`` and shifts of
  up to ``max_shift`` look pixels, for crops; searched on half-size grey copies) and the best
  gain over all channels with a small offset (for brightness shifts), no ``BLOCK`` x ``BLOCK``
  block inside the outermost lines differs by more than ``max_block_difference`` on average on
  its worst channel, less ``edge_allowance`` times its mean gradient (alignment errors live on
  edges). A framed image is also compared whole, since a frame is found or missed by a few
  levels of noise on its ring, unless both were trimmed alike (the same number of frames of
  the same colours, parts of one aspect): then the framed comparison, the sharper one, decides
  (a star and a disc on one plain field differ by less than a whole look's block).

The block test is what global measures lack: a star or an emblem covering 2% of a flag moves a
hash or a mean colour by little, but makes one or two blocks differ by its full contrast. JPEG
noise, resampling and chroma subsampling average out within a block after a light blur; in an
image too small for that (JPEG keeps one colour sample per 2x2 pixels, which in a 16-pixel image
is a whole look block), colours are blurred over ``_CHROMA_SPREAD`` source pixels and
brightness is not.

>>> same_picture(look_of(png), look_of(jpeg_copy_of_png)).same       # doctest: +SKIP
True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from groundforge.filters.image import open_rgb

LOOK_SIDE = 64
BLOCK = 4

# The trimming works on a copy at most this long so that a frame is found in one pass.
_TRIM_SIDE = 256
_FRAME_TOLERANCE = 24
_MAX_TRIM = 0.45
_FRAMES = 3
_EDGE = 2  # lines of the trimming copy
_SLACK = 0.02
_OUTER = 2  # look lines left out at each edge, at least
_DARK, _BRIGHT = 4, 251  # saturated values
_MAX_OFFSET = 8.0
_FRAMED_RING = 0.98  # share of the outer ring in the frame colour
_CHROMA_SPREAD = 1.5  # chroma blur in source pixels of the smaller image


@dataclass(frozen=True)
class Look:
    """An image reduced for comparison: ``pixels`` are ``LOOK_SIDE**2 * 3`` bytes of RGB of the
    image without its uniform frame, ``aspect`` that part's width / height; ``whole`` and
    ``whole_aspect`` the same of the untrimmed image (empty when nothing was trimmed);
    ``shortest`` and ``whole_shortest`` the shorter sides of both in source pixels; ``frames``
    the RGB colour of each frame trimmed, outermost first."""

    pixels: bytes
    aspect: float
    whole: bytes = b""
    whole_aspect: float = 0.0
    shortest: int = LOOK_SIDE
    whole_shortest: int = LOOK_SIDE
    frames: tuple[tuple[int, int, int], ...] = ()

    def untrimmed(self) -> Look:
        if not self.whole:
            return self
        return Look(self.whole, self.whole_aspect, shortest=self.whole_shortest)


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`same_picture`: the decision and what it rests on."""

    same: bool
    aspect_change: float
    block_difference: float


@dataclass(frozen=True)
class SameSettings:
    """Thresholds of :func:`same_picture` (see the module docstring)."""

    max_aspect_change: float = 0.08
    max_shift: int = 5
    max_block_difference: float = 16.0
    edge_allowance: float = 1.0
    max_gain: float = 1.25


DEFAULT_SAME = SameSettings()


def look_of(image: bytes | Image.Image) -> Look:
    """The :class:`Look` of image bytes (decoded upright, RGB) or of an RGB PIL image."""
    rgb = open_rgb(image) if isinstance(image, bytes) else image.convert("RGB")
    content, frames = _trimmed(rgb)
    shortest = min(content.size)
    look = Look(_side(content), content.width / content.height, shortest=shortest)
    if not frames:
        return look
    return Look(
        look.pixels,
        look.aspect,
        _side(rgb),
        rgb.width / rgb.height,
        shortest,
        min(rgb.size),
        frames,
    )


def _side(rgb: Image.Image) -> bytes:
    return rgb.resize((LOOK_SIDE, LOOK_SIDE), Image.Resampling.BOX).tobytes()


def content_of(rgb: Image.Image) -> Image.Image:
    """``rgb`` without its uniform frames (:func:`frame_box`, applied until none is left)."""
    return _trimmed(rgb)[0]


def _trimmed(rgb: Image.Image) -> tuple[Image.Image, tuple[tuple[int, int, int], ...]]:
    # A padded picture whose own edge is one colour has two frames: trim both, like the original.
    colours = []
    for depth in range(_FRAMES):
        box, colour = _frame(rgb, outermost=depth == 0)
        if colour is None:
            break
        colours.append(colour)
        rgb = rgb.crop(box)
    return rgb, tuple(colours)


def frame_box(rgb: Image.Image) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of ``rgb`` inside its uniform frame (the whole image when
    its outer ring is not one colour).

    The ring is read ``_EDGE`` lines in, so an outline or the blend at a pasted edge does not
    hide a frame; those lines go with it. Each side is then trimmed while its outer line stays
    the frame colour, by at most ``_MAX_TRIM`` of the side, and never more than ``_SLACK`` of
    the side beyond what the opposite side lost: padding is added evenly, so a side that keeps
    going has reached a stripe of the frame's colour (Angola's black half on black padding).
    """
    return _frame(rgb)[0]


def _frame(
    rgb: Image.Image, outermost: bool = True
) -> tuple[tuple[int, int, int, int], tuple[int, int, int] | None]:
    """:func:`frame_box` and the frame's colour (None: no frame). ``outermost``: ``rgb`` is a
    whole image, not what an outer frame left."""
    width, height = rgb.size
    scale = min(1.0, _TRIM_SIDE / max(width, height))
    small = (
        rgb
        if scale == 1.0
        else rgb.resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
        )
    )
    a = np.asarray(small, dtype=np.int16)
    h, w = a.shape[:2]
    # In a tiny image those lines are the picture itself, and its pad may be a single line.
    e = 0 if outermost and min(h, w) < 32 * _EDGE else _EDGE
    whole = (0, 0, width, height)
    if min(h, w) < max(8, 8 * e):
        return whole, None
    inner = a[e : h - e, e : w - e]
    ring = np.concatenate([inner[0], inner[-1], inner[:, 0], inner[:, -1]])
    colour = np.median(ring, axis=0)
    if (np.abs(ring - colour).max(axis=1) <= _FRAME_TOLERANCE).mean() < _FRAMED_RING:
        return whole, None

    def uniform(line: np.ndarray) -> bool:
        return bool(np.abs(line - colour).max() <= _FRAME_TOLERANCE)

    top, bottom, left, right = e, h - e, e, w - e
    limit_h, limit_w = int(h * _MAX_TRIM), int(w * _MAX_TRIM)
    while top < limit_h and uniform(a[top, left:right]):
        top += 1
    while h - bottom < limit_h and uniform(a[bottom - 1, left:right]):
        bottom -= 1
    while left < limit_w and uniform(a[top:bottom, left]):
        left += 1
    while w - right < limit_w and uniform(a[top:bottom, right - 1]):
        right -= 1
    slack_h, slack_w = max(e, round(_SLACK * h)), max(e, round(_SLACK * w))
    top, bottom = min(top, h - bottom + slack_h), max(bottom, h - top - slack_h)
    left, right = min(left, w - right + slack_w), max(right, w - left - slack_w)
    if uniform(a[top:bottom, left:right].reshape(-1, a.shape[-1])):
        return whole, None  # one colour throughout: a plain field, not a frame
    box = (
        round(left / scale),
        round(top / scale),
        max(round(left / scale) + 1, round(right / scale)),
        max(round(top / scale) + 1, round(bottom / scale)),
    )
    if box == whole:
        return whole, None
    return box, (int(colour[0]), int(colour[1]), int(colour[2]))


def same_picture(a: Look, b: Look, settings: SameSettings = DEFAULT_SAME) -> Verification:
    """Whether two looks show the same picture (see the module docstring): compared without
    their frames, and also whole when either had one (a frame is found or not by a few levels
    of noise on its ring, so a copy may lose one its original kept)."""
    framed = _same(a, b, settings)
    if framed.same or not (a.whole or b.whole) or _trimmed_alike(a, b, framed, settings):
        return framed
    whole = _same(a.untrimmed(), b.untrimmed(), settings)
    return whole if whole.block_difference < framed.block_difference else framed


def _same(a: Look, b: Look, settings: SameSettings) -> Verification:
    change = abs(np.log(a.aspect / b.aspect))
    if change > np.log1p(settings.max_aspect_change):
        return Verification(False, float(np.expm1(change)), float("inf"))
    # An image smaller than the look was enlarged: blur away the detail it never had. Its
    # colours had less still: JPEG keeps one chroma sample per 2 x 2 pixels, which in a tiny
    # image covers whole blocks of the look.
    shortest = max(1, min(a.shortest, b.shortest))
    sigma = max(1.0, LOOK_SIDE / (2 * shortest))
    chroma = max(sigma, _CHROMA_SPREAD * LOOK_SIDE / shortest)
    pa, pb = _blurred(a.pixels, sigma, chroma), _blurred(b.pixels, sigma, chroma)
    # Align on half-size grey copies (cheap), then compare the full looks.
    ga, gb = _half_grey(pa), _half_grey(pb)
    x = y = (1.0, 0.0)
    for _ in range(_ROUNDS):
        x = _best_axis(ga, _sample(gb, _positions(*y, ga.shape[0]), axis=0), settings, axis=1)
        y = _best_axis(ga, _sample(gb, _positions(*x, ga.shape[1]), axis=1), settings, axis=0)
    rows, cols = _positions(*y, LOOK_SIDE), _positions(*x, LOOK_SIDE)
    warped = _sample(_sample(pb, rows, axis=0), cols, axis=1)
    valid = _inside(rows)[:, None] & _inside(cols)[None, :]
    best = _block_difference(pa, warped, valid, settings)
    return Verification(
        best <= settings.max_block_difference, float(np.expm1(change)), round(best, 3)
    )


_ROUNDS = 2


def _trimmed_alike(a: Look, b: Look, framed: Verification, settings: SameSettings) -> bool:
    """Whether both looks lost the same frames (count and colours, within the gain of a
    brightness shift) down to parts of one aspect."""
    if not a.frames or len(a.frames) != len(b.frames):
        return False
    if framed.aspect_change > settings.max_aspect_change:
        return False
    return all(
        max(abs(x - y) for x, y in zip(p, q, strict=True)) <= 2 * _FRAME_TOLERANCE
        for p, q in zip(a.frames, b.frames, strict=True)
    )


def _positions(scale, shift, side: int) -> np.ndarray:
    """Where an axis of ``side`` pixels samples for an alignment: ``scale`` about the centre,
    ``shift`` in look pixels. Arrays of scales and shifts give one row per alignment."""
    centre = (side - 1) / 2
    u = np.arange(side, dtype=np.float64) - centre
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    return scale[..., None] * u + centre + shift[..., None] * (side / LOOK_SIDE)


def _sample(image: np.ndarray, where: np.ndarray, axis: int) -> np.ndarray:
    """``image`` read at fractional positions ``where`` along ``axis`` (linear; clamped at the
    edges). ``where`` of shape ``(k, n)`` gives ``k`` images stacked on ``axis``."""
    side = image.shape[axis]
    where = np.clip(where, 0, side - 1)
    lo = np.minimum(np.floor(where).astype(np.int64), side - 2)
    frac = (where - lo).astype(np.float32)
    first, second = np.take(image, lo, axis=axis), np.take(image, lo + 1, axis=axis)
    shape = [1] * first.ndim
    shape[axis : axis + frac.ndim] = frac.shape
    return first + (second - first) * frac.reshape(shape)


def _best_axis(a: np.ndarray, b: np.ndarray, settings: SameSettings, axis: int):
    """``(scale, shift)`` along ``axis`` (0 rows, 1 columns) that best align grey ``b`` with
    ``a``, comparing brightness-normalised pixels: a coarse search over scales (crops change the
    aspect) and shifts (crops off one side), then a fine one around the best. Ties (an image
    flat along the axis) go to the smallest change."""
    m, side = settings.max_aspect_change, a.shape[axis]
    scales, shifts = np.meshgrid(
        np.linspace(1 - m, 1 + m, 5), np.arange(-settings.max_shift, settings.max_shift + 0.01)
    )
    scale, shift = _pick(a, b, scales.ravel(), shifts.ravel(), axis, side)
    scales, shifts = np.meshgrid(
        scale + np.linspace(-m / 2, m / 2, 5), shift + np.linspace(-0.75, 0.75, 7)
    )
    scales, shifts = np.r_[scale, scales.ravel()], np.r_[shift, shifts.ravel()]
    return _pick(a, b, scales, shifts, axis, side)


def _pick(a, b, scales, shifts, axis, side):
    order = np.argsort(np.abs(scales - 1) * side / 2 + np.abs(shifts), kind="stable")
    scales, shifts = scales[order], shifts[order]
    candidates = _sample(b, _positions(scales, shifts, side), axis=axis)
    candidates = np.moveaxis(candidates, axis, 0).reshape(len(scales), -1)
    norm_a = ((a - a.mean()) / (a.std() + 1.0)).reshape(1, -1)
    centred = candidates - candidates.mean(axis=1, keepdims=True)
    norm_b = centred / (candidates.std(axis=1, keepdims=True) + 1.0)
    errors = np.abs(norm_b - norm_a).mean(axis=1)
    best = int(np.argmin(np.round(errors, 4)))
    return float(scales[best]), float(shifts[best])


def _inside(where: np.ndarray) -> np.ndarray:
    return (where >= 0) & (where <= LOOK_SIDE - 1)


def _half_grey(pixels: np.ndarray) -> np.ndarray:
    grey = pixels.mean(axis=-1)
    n = LOOK_SIDE // 2
    return grey.reshape(n, 2, n, 2).mean(axis=(1, 3))


@lru_cache(maxsize=4096)
def _blurred(pixels: bytes, sigma: float, chroma: float) -> np.ndarray:
    """The look's RGB, its luma blurred by ``sigma`` and its chroma by ``chroma``."""
    image = Image.frombytes("RGB", (LOOK_SIDE, LOOK_SIDE), pixels)
    blurred = image.filter(ImageFilter.GaussianBlur(sigma))
    if chroma > sigma:
        luma = blurred.convert("YCbCr").getchannel(0)
        _, cb, cr = image.filter(ImageFilter.GaussianBlur(chroma)).convert("YCbCr").split()
        blurred = Image.merge("YCbCr", (luma, cb, cr)).convert("RGB")
    out = np.asarray(blurred, dtype=np.float32)
    out.setflags(write=False)
    return out


def _block_difference(
    a: np.ndarray, b: np.ndarray, valid: np.ndarray, settings: SameSettings
) -> float:
    """The largest block difference of ``b`` from ``a`` over blocks wholly ``valid``: a block's
    mean absolute difference on its worst channel, less ``edge_allowance`` times its mean
    gradient, after the gain (and small offset) that best map ``b`` onto ``a``.

    Alignment and resampling errors live on edges (a tenth of a pixel off across a stripe's edge
    is many levels); a different colour or emblem fills a flat block. Saturated values of ``b``
    only bound ``a`` (a brightened white stays 255), so they count only on the wrong side.
    """
    fit = valid[..., None] & (b > _DARK) & (b < _BRIGHT) & (a > _DARK) & (a < _BRIGHT)
    x, y = b[fit], a[fit]
    gain, offset = 1.0, 0.0
    # Brightness scales values (black stays black): a gain, and only a small offset, so that
    # a flat field cannot be mapped onto another colour.
    if x.size > 16 and (x * x).sum() > 1e-6:
        gain = float((x * y).sum() / (x * x).sum())
        gain = min(max(gain, 1 / settings.max_gain), settings.max_gain)
        offset = float(np.clip(y.mean() - gain * x.mean(), -_MAX_OFFSET, _MAX_OFFSET))
    predicted = gain * b + offset
    diff = np.abs(a - predicted)
    diff = np.where(b >= _BRIGHT, np.maximum(predicted - a, 0), diff)
    diff = np.where(b <= _DARK, np.maximum(a - predicted, 0), diff)
    rows, cols = np.gradient(a, axis=(0, 1))
    edges = np.sqrt(rows**2 + cols**2).max(axis=-1)
    # The outermost lines hold what a pad or a crop leaves at the edge (a line of padding, a
    # cut stripe): blocks start inside them.
    m = _OUTER
    n = (LOOK_SIDE - 2 * m) // BLOCK
    inner = slice(m, m + n * BLOCK)
    blocks = diff[inner, inner].reshape(n, BLOCK, n, BLOCK, 3).mean(axis=(1, 3)).max(axis=-1)
    edge = edges[inner, inner].reshape(n, BLOCK, n, BLOCK).mean(axis=(1, 3))
    whole = valid[inner, inner].reshape(n, BLOCK, n, BLOCK).all(axis=(1, 3))
    if not whole.any():
        return float("inf")
    return float((blocks - settings.edge_allowance * edge)[whole].max())
