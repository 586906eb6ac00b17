"""Paste member images onto one canvas and carry every trusted box into the canvas frame.

Members are resized with LANCZOS (PIL's sharpest filter, with proper antialiasing when
shrinking), always the same filter so the same inputs give the same pixels. Each box is remapped
through the per-axis scale that resize actually applied (``placement.width / source width``,
``placement.height / source height``), which can differ slightly from the nominal cell scale
because pasted sizes are rounded to whole pixels.

The canvas colour is the spec's ``background``; with ``"auto"`` it is chosen per scene from the
pasted members' outer pixels (:mod:`groundforge.scenes.background`), so no member's outline
melts into the canvas. A member whose source had a transparent margin (its ``opaque_box`` is not
the whole image) shows the canvas there, as if composited onto it: the image check composited
it on white, so its outline is measured on the opaque part and the margin is repainted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from groundforge.filters.image import encode_rgb, open_rgb
from groundforge.pixels import image_bytes
from groundforge.scenes.background import RGB, pick_background, sides
from groundforge.scenes.layout import CanvasSpec, Placement, check_layout, plan_layout
from groundforge.schemas.box import Box
from groundforge.schemas.records import Entity, ImageRecord

RESAMPLE = Image.Resampling.LANCZOS
# The image check composites transparent pixels on white: outside a member's opaque extent
# every pixel is this colour.
COMPOSITED_ON = (255, 255, 255)
DEFAULT_SPEC = CanvasSpec()


@dataclass(frozen=True)
class Scene:
    """A composed scene: PNG bytes, its size, its canvas colour, and each member's entity in
    the canvas frame.

    ``entities``, ``source_image_ids`` and ``placements`` are in member order.
    """

    image: bytes
    width: int
    height: int
    layout: str
    entities: tuple[Entity, ...]
    source_image_ids: tuple[str, ...]
    placements: tuple[Placement, ...]
    background: RGB


def remap_box(box: Box, src_size: tuple[int, int], placement: Placement) -> Box:
    """``box`` in a ``src_size`` image, moved into the canvas frame of ``placement``.

    >>> remap_box(Box(20, 10, 120, 60), (200, 100), Placement(0, 10, 20, 100, 50))
    Box(x1=20.0, y1=25.0, x2=70.0, y2=50.0)
    """
    src_w, src_h = src_size
    # Multiplying before dividing keeps whole-pixel edges exact: the full image maps to exactly
    # the pasted rectangle, which x * (width / src_w) does not always give in floating point.
    return Box(
        placement.x + box.x1 * placement.width / src_w,
        placement.y + box.y1 * placement.height / src_h,
        placement.x + box.x2 * placement.width / src_w,
        placement.y + box.y2 * placement.height / src_h,
    )


def decoded_member(member: ImageRecord, role: str = "scene") -> tuple[Image.Image, Box]:
    """A composition member's decoded image and its trusted box clipped to it; ``ValueError``
    (naming the ``role`` member) when there is no box, no area, or the size disagrees."""
    if member.box is None:
        raise ValueError(f"{role} member {member.image_id!r} has no trusted box")
    image = open_rgb(image_bytes(member))
    if image.size != (member.width, member.height):
        raise ValueError(
            f"{role} member {member.image_id!r} decodes to {image.width}x{image.height}, "
            f"but the record says {member.width}x{member.height}"
        )
    box = member.box.clip(image.width, image.height)
    if box.is_degenerate:
        raise ValueError(
            f"{role} member {member.image_id!r} has a box with no area inside the image: "
            f"{member.box}"
        )
    return image, box


def compose_scene(
    members: Sequence[ImageRecord],
    layout: str,
    spec: CanvasSpec = DEFAULT_SPEC,
    seed: int | str = 0,
) -> Scene:
    """Compose ``members`` (each with a trusted ``box`` and an ``entity`` name) into one scene.

    ``seed`` seeds ``random.Random`` for the random layout; CPython turns a str seed into an
    int through SHA-512, so it does not depend on ``PYTHONHASHSEED`` and is stable across
    processes. The same members, layout, spec and seed give the same bytes: JPEG (as the image
    check keeps photos) when every member is a JPEG, else PNG.

    >>> scene = compose_scene([plane_a, plane_b], "grid", seed="s1")  # doctest: +SKIP
    >>> [e.name for e in scene.entities]                               # doctest: +SKIP
    ['Boeing 757', 'Airbus A321']
    """
    check_layout(layout)
    if not members:
        raise ValueError("a scene needs at least one member")
    images, boxes = [], []
    for member in members:
        if not member.entity.strip():
            raise ValueError(f"scene member {member.image_id!r} has no entity name")
        image, box = decoded_member(member, "scene")
        images.append(image)
        boxes.append(box)

    width, height, placements = plan_layout(
        [image.size for image in images], layout, spec, random.Random(seed)
    )
    opaque = [_margined(member, image) for member, image in zip(members, images, strict=True)]
    pasted = [
        image.resize((p.width, p.height), RESAMPLE)
        for image, p in zip(images, placements, strict=True)
    ]
    shown = [
        _scaled_inside(np.asarray(pasted_image), rect, image.size)
        for pasted_image, rect, image in zip(pasted, opaque, images, strict=True)
    ]
    background = pick_background([side for part in shown for side in sides(part)], spec.background)
    if background != COMPOSITED_ON:
        pasted = [
            pasted_image
            if rect is None
            else _on_ground(image, rect, background).resize(pasted_image.size, RESAMPLE)
            for pasted_image, rect, image in zip(pasted, opaque, images, strict=True)
        ]
    canvas = Image.new("RGB", (width, height), background)
    for image, p in zip(pasted, placements, strict=True):
        canvas.paste(image, (p.x, p.y))

    # Photos stay JPEG (PNG of a photo is several times larger and slower to write); a scene
    # with any lossless member is lossless.
    photos = all(image.format == "JPEG" for image in images)
    return Scene(
        image=encode_rgb(canvas, "JPEG" if photos else "PNG"),
        width=width,
        height=height,
        layout=layout,
        entities=tuple(
            Entity(member.entity, remap_box(box, image.size, p))
            for member, box, image, p in zip(members, boxes, images, placements, strict=True)
        ),
        source_image_ids=tuple(member.image_id for member in members),
        placements=tuple(placements),
        background=background,
    )


Rect = tuple[int, int, int, int]


def _margined(member: ImageRecord, image: Image.Image) -> Rect | None:
    """The member's opaque extent when its source had a transparent margin around it."""
    if member.opaque_box is None:
        return None
    o = member.opaque_box
    rect = (int(o.x1), int(o.y1), int(o.x2), int(o.y2))
    return None if rect == (0, 0, image.width, image.height) else rect


def _scaled_inside(pasted: np.ndarray, rect: Rect | None, size: tuple[int, int]) -> np.ndarray:
    """The pasted pixels wholly inside ``rect`` (a rectangle of the ``size`` source), or all of
    them when there is no such rectangle or it covers no whole pasted pixel."""
    if rect is None:
        return pasted
    (w, h), (ph, pw) = size, pasted.shape[:2]
    x1, y1 = -(-rect[0] * pw // w), -(-rect[1] * ph // h)
    x2, y2 = rect[2] * pw // w, rect[3] * ph // h
    return pasted[y1:y2, x1:x2] if x1 < x2 and y1 < y2 else pasted


def _on_ground(image: Image.Image, rect: Rect, colour: tuple[int, int, int]) -> Image.Image:
    """``image`` with everything outside ``rect`` painted ``colour``."""
    grounded = Image.new("RGB", image.size, colour)
    grounded.paste(image.crop(rect), rect[:2])
    return grounded
