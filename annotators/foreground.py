"""The foreground box of an isolated object: a product shot or a clipart flag on a plain ground.

Rules, in order:

1. An image with transparency: the bounding box of the pixels whose alpha is above
   ``alpha_threshold``. (An alpha channel that is opaque everywhere says nothing, and falls
   through to rule 2.)
2. A near-uniform border (at least ``border_agreement`` of the outer ``border``-pixel ring within
   ``tolerance`` of the ring's median colour) that is the ground: any colour by default, or only
   ``background`` when it is given. The bounding box of the pixels that differ from that colour
   by more than ``tolerance`` in some channel.
3. Otherwise the object fills the frame: the whole image.

No box (None) when nothing differs from the ground (a blank image) or when the box covers less
than ``min_fraction`` of the image. Boxes are pixel ``xyxy`` with exclusive right/bottom edges: a
single foreground pixel at ``(5, 7)`` gives ``Box(5, 7, 6, 8)``.

Records reach :class:`ForegroundAnnotator` already normalised by
:func:`groundforge.filters.image.check_image` (RGB, transparency composited on white); rule 1 then
uses the record's ``opaque_box``, measured before compositing. A full-bleed flag whose field is
one plain colour shows the limit of rule 2 with ``background=None``: its box is the emblem, not the
flag. Clipart on a white ground wants ``background=(255, 255, 255)``: a plain red field is then the
object, not the ground (a plain *white* field remains ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

from groundforge.filters.image import open_rgb
from groundforge.pixels import image_bytes
from groundforge.schemas.box import Box, mask_box
from groundforge.schemas.records import Detection, ImageRecord

_WHITE = (255, 255, 255)


def foreground_box(
    image: Image.Image,
    tolerance: int = 12,
    min_fraction: float = 0.0,
    *,
    border: int = 2,
    border_agreement: float = 0.9,
    alpha_threshold: int = 0,
    background: tuple[int, int, int] | None = None,
) -> Box | None:
    """The box of what stands out from a transparent or plain ground (see the module rules).

    >>> im = Image.new("RGB", (20, 10), "white")
    >>> im.putpixel((5, 7), (200, 0, 0))
    >>> foreground_box(im)
    Box(x1=5.0, y1=7.0, x2=6.0, y2=8.0)
    >>> foreground_box(Image.new("RGB", (20, 10), "white")) is None
    True
    """
    width, height = image.size
    if image.has_transparency_data:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            return _big_enough(mask_box(alpha > alpha_threshold), width * height, min_fraction)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # int16 so that differences of uint8 values cannot wrap around.
    pixels = np.asarray(rgb).astype(np.int16)
    ring = pixels[_ring_mask(height, width, border)]
    ground = np.median(ring, axis=0)
    agreeing = np.abs(ring - ground).max(axis=1) <= tolerance
    if agreeing.mean() < border_agreement or (
        background is not None and np.abs(ground - np.array(background)).max() > tolerance
    ):
        return Box(0, 0, width, height)
    found = mask_box(np.abs(pixels - ground).max(axis=2) > tolerance)
    return _big_enough(found, width * height, min_fraction)


@dataclass(frozen=True)
class ForegroundAnnotator:
    """Adds ``candidates["foreground"]``: one :class:`Detection` (score 1.0) or ``()``.

    The record's ``opaque_box`` (the source had transparency) wins; otherwise the border rule runs
    on the pixels. ``background`` is ``"border"`` (any uniform border colour is the ground) or
    ``"white"``. Picklable, so it can be shipped to Beam workers as is.

    >>> annotate = ForegroundAnnotator(tolerance=12, min_fraction=0.05)
    >>> annotate(record).candidates["foreground"]                     # doctest: +SKIP
    (Detection(box=Box(x1=12.0, y1=8.0, x2=30.0, y2=25.0), score=1.0, label='foreground'),)
    """

    tolerance: int = 12
    min_fraction: float = 0.0
    border: int = 2
    border_agreement: float = 0.9
    background: Literal["border", "white"] = "border"

    name: ClassVar[str] = "foreground"

    def __call__(self, record: ImageRecord) -> ImageRecord:
        if record.opaque_box is not None:
            box = _big_enough(record.opaque_box, record.width * record.height, self.min_fraction)
        else:
            box = foreground_box(
                open_rgb(image_bytes(record)),
                self.tolerance,
                self.min_fraction,
                border=self.border,
                border_agreement=self.border_agreement,
                background=_WHITE if self.background == "white" else None,
            )
        found = () if box is None else (Detection(box, 1.0, self.name),)
        return replace(record, candidates={**record.candidates, self.name: found})


def _ring_mask(height: int, width: int, border: int) -> np.ndarray:
    """True on the outer ``border``-pixel ring (the whole image when it is that thin)."""
    border = max(border, 1)
    mask = np.ones((height, width), dtype=bool)
    mask[border : height - border, border : width - border] = False
    return mask


def _big_enough(box: Box | None, image_area: int, min_fraction: float) -> Box | None:
    return box if box is not None and box.area >= min_fraction * image_area else None
