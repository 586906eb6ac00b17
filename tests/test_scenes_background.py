"""Readable scenes: the canvas colour makes every box edge visible, for white-ground,
black-ground and palette-coloured members, transparent margins, real flags and crowds."""

from __future__ import annotations

import doctest
import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundforge.annotators.foreground import ForegroundAnnotator
from groundforge.filters.image import check_image
from groundforge.scenes import background as background_module
from groundforge.scenes.background import CLEAR, PALETTE, pick_background, sides
from groundforge.scenes.compose import compose_scene
from groundforge.scenes.crowd import CrowdSpec, compose_crowd
from groundforge.scenes.layout import LAYOUTS, CanvasSpec
from groundforge.schemas.box import Box
from groundforge.schemas.records import ImageRecord, sha256_hex

FLAGS = Path(__file__).resolve().parent.parent / "examples" / "data" / "flags"
WHITE, BLACK, RED, BLUE = (255, 255, 255), (0, 0, 0), (200, 16, 46), (0, 47, 108)
# An edge reads when at least three quarters of the pixel pairs across it differ this much.
VISIBLE = 64
SPEC = CanvasSpec(cell_size=96)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def checked(image: Image.Image, entity: str) -> ImageRecord:
    """The record the image check makes (transparency composited, ``opaque_box`` measured),
    boxed as the foreground annotator boxes a flag: its opaque extent, or the whole image."""
    data = png(image)
    record = check_image(ImageRecord(sha256_hex(data), data, 0, 0, "flag")).value
    box = record.opaque_box or Box(0, 0, record.width, record.height)
    return replace(record, entity=entity, box=box)


def disc_flag(field, disc, size=(90, 60)) -> Image.Image:
    """A plain field with a centred disc that touches no edge (Japan, Bangladesh)."""
    image = Image.new("RGB", size, field)
    w, h = size
    ImageDraw.Draw(image).ellipse((w * 0.3, h * 0.2, w * 0.7, h * 0.8), fill=disc)
    return image


def cross_flag(field, cross, size=(90, 60)) -> Image.Image:
    """A Nordic cross whose arms reach every edge, a fifth of each edge's length (Finland)."""
    image = Image.new("RGB", size, field)
    w, h = size
    draw = ImageDraw.Draw(image)
    draw.rectangle((w * 0.3, 0, w * 0.5 - 1, h - 1), fill=cross)
    draw.rectangle((0, h * 0.4, w - 1, h * 0.6 - 1), fill=cross)
    return image


def on_transparent(flag: Image.Image, margin=(7, 5, 9, 4)) -> Image.Image:
    """The flag inside a transparent margin (left, top, right, bottom), as clipart comes."""
    left, top, right, bottom = margin
    image = Image.new("RGBA", (flag.width + left + right, flag.height + top + bottom))
    image.paste(flag.convert("RGBA"), (left, top))
    return image


def edge_pairs(pixels: np.ndarray, box: Box) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per box edge, the pixels just outside it and those just inside it, along its whole
    length; a pixel that a fractional edge cuts through is skipped on both sides."""
    x1, y1, x2, y2 = box.to_list()
    rows = slice(math.ceil(y1), math.floor(y2))
    cols = slice(math.ceil(x1), math.floor(x2))
    return {
        "left": (pixels[rows, math.floor(x1) - 1], pixels[rows, math.ceil(x1)]),
        "right": (pixels[rows, math.ceil(x2)], pixels[rows, math.floor(x2) - 1]),
        "top": (pixels[math.floor(y1) - 1, cols], pixels[math.ceil(y1), cols]),
        "bottom": (pixels[math.ceil(y2), cols], pixels[math.floor(y2) - 1, cols]),
    }


def readable_share(outside: np.ndarray, inside: np.ndarray) -> float:
    """The share of pixel pairs across an edge that differ by at least ``VISIBLE``."""
    distance = np.sqrt(np.square(outside.astype(float) - inside.astype(float)).sum(axis=-1))
    return float(np.mean(distance >= VISIBLE))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def assert_every_edge_visible(scene) -> None:
    pixels = decode(scene.image)
    for entity in scene.entities:
        for side, (outside, inside) in edge_pairs(pixels, entity.box).items():
            share = readable_share(outside, inside)
            assert share >= 0.75, (entity.name, side, share, scene.background)


WHITE_GROUND = [
    checked(disc_flag(WHITE, RED), "white field, red disc"),
    checked(cross_flag(WHITE, BLUE, (80, 50)), "white field, blue cross"),
    checked(on_transparent(disc_flag(WHITE, RED, (70, 70))), "white square, transparent margin"),
    checked(disc_flag((250, 250, 250), (0, 120, 60), (60, 90)), "near-white field"),
]
BLACK_GROUND = [
    checked(disc_flag(BLACK, WHITE), "black field, white disc"),
    checked(cross_flag(BLACK, (255, 210, 0), (80, 50)), "black field, yellow cross"),
    checked(on_transparent(disc_flag(BLACK, RED, (64, 48))), "black, transparent margin"),
]
# One member on each of the first six palette colours: only the last two remain for the canvas.
PALETTE_GROUND = [
    checked(disc_flag(colour, WHITE if sum(colour) < 384 else BLACK, (70 + 5 * i, 50)), str(i))
    for i, colour in enumerate(PALETTE[:6])
]


@pytest.mark.parametrize(
    "members",
    [WHITE_GROUND, BLACK_GROUND, PALETTE_GROUND, WHITE_GROUND[:2] + BLACK_GROUND[:2]],
    ids=["white", "black", "palette", "white-and-black"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_box_edge_is_visible_against_the_canvas(members, layout):
    scene = compose_scene(members, layout, SPEC, seed=f"readable-{layout}")
    assert_every_edge_visible(scene)
    # The canvas is a palette colour clear of every full-bleed member's field (its corner).
    assert scene.background in PALETTE
    for member in members:
        if member.opaque_box is None:
            assert math.dist(decode(member.image)[0, 0], scene.background) >= CLEAR


def test_the_old_white_canvas_hides_white_ground_edges():
    # The check above fails where the canvas is the members' own ground colour.
    scene = compose_scene(WHITE_GROUND, "grid", replace(SPEC, background=WHITE), seed=0)
    assert scene.background == WHITE
    with pytest.raises(AssertionError):
        assert_every_edge_visible(scene)


def test_white_stays_the_canvas_while_it_shows_every_edge():
    coloured = [checked(disc_flag(c, WHITE), str(c)) for c in [RED, BLUE, (0, 120, 60)]]
    scene = compose_scene(coloured, "horizontal", SPEC, seed=0)
    assert scene.background == WHITE
    assert_every_edge_visible(scene)
    # One white-ground member among them changes it.
    assert compose_scene([*coloured, WHITE_GROUND[0]], "grid", SPEC).background != WHITE


def test_transparent_margins_show_the_canvas_and_boxes_stay_exact():
    member = WHITE_GROUND[2]
    assert (member.width, member.height, member.opaque_box) == (86, 79, Box(7, 5, 77, 75))
    for background in ("auto", (30, 80, 170)):
        spec = replace(SPEC, background=background)
        scene = compose_scene([member, BLACK_GROUND[0]], "horizontal", spec)
        p = scene.placements[0]
        # The whole image is pasted (86 x 79 at a scale of 96 / 86), its box remapped exactly.
        assert (p.width, p.height) == (96, 88)
        assert scene.entities[0].box == Box(
            p.x + 7 * 96 / 86, p.y + 5 * 88 / 79, p.x + 77 * 96 / 86, p.y + 75 * 88 / 79
        )
        # The margin shows the canvas colour, not the white it was composited on.
        pixels = decode(scene.image).astype(int)
        for y, x in [(p.y + p.height // 2, p.x), (p.y, p.x + p.width // 2)]:
            assert np.abs(pixels[y, x] - scene.background).max() <= 2
        assert scene.background != WHITE
        assert_every_edge_visible(scene)


def test_an_explicit_colour_is_kept():
    scene = compose_scene(WHITE_GROUND, "grid", replace(SPEC, background=(10, 20, 30)), seed=3)
    assert scene.background == (10, 20, 30)
    assert (decode(scene.image)[0, 0] == (10, 20, 30)).all()


def test_real_white_field_flags():
    annotate = ForegroundAnnotator(background="white")
    members = []
    for name in ("europe/cyprus.png", "europe/greece.png", "america/canada.png"):
        data = (FLAGS / name).read_bytes()
        record = annotate(check_image(ImageRecord(sha256_hex(data), data, 0, 0, "flag")).value)
        (found,) = record.candidates["foreground"]
        members.append(replace(record, box=found.box, entity=name))
    # Cyprus is a white field on a transparent margin: on white its box is invisible.
    assert members[0].opaque_box is not None
    for layout in LAYOUTS:
        scene = compose_scene(members, layout, CanvasSpec(cell_size=160), seed=layout)
        assert scene.background != WHITE
        assert_every_edge_visible(scene)


def test_choice_is_byte_identical_and_seed_free():
    a = compose_scene(PALETTE_GROUND, "random", SPEC, seed="s")
    assert a == compose_scene(PALETTE_GROUND, "random", SPEC, seed="s")
    # The colour depends on the members, not on where the layout put them.
    assert {compose_scene(PALETTE_GROUND, "random", SPEC, seed=s).background for s in "abc"} == {
        a.background
    }


def test_no_clear_colour_takes_the_most_contrasting():
    near_cyan = np.array([[60, 190, 150]] * 8, dtype=np.uint8)
    members = [np.full((8, 3), c, dtype=np.uint8) for c in PALETTE[:-1]] + [near_cyan]
    # Cyan is 50 from its nearest side (below CLEAR); every other palette colour is 0 from one.
    assert pick_background(members, "auto") == PALETTE[-1]
    # A quarter of a side may be the canvas's colour; more rules the colour out.
    side = np.array([WHITE] * 3 + [RED] * 9, dtype=np.uint8)
    assert pick_background([side], "auto") == WHITE
    side = np.array([WHITE] * 4 + [RED] * 8, dtype=np.uint8)
    assert pick_background([side], "auto") == BLACK


def test_palette_colours_are_pairwise_clear():
    for i, a in enumerate(PALETTE):
        for b in PALETTE[i + 1 :]:
            assert math.dist(a, b) > CLEAR
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[0], image[-1], image[:, 0], image[:, -1] = 1, 2, 3, 4
    top, bottom, left, right = sides(image)
    assert (len(top), len(bottom), len(left), len(right)) == (7, 7, 5, 5)
    assert (top[1:-1] == 1).all() and (bottom[1:-1] == 2).all()
    assert (left[1:-1] == 3).all() and (right == 4).all()


@pytest.mark.parametrize("bad", [(0, 0, 256), (1, 2), "white", (1.5, 2, 3)])
def test_bad_backgrounds_are_refused(bad):
    with pytest.raises(ValueError, match="background must be 'auto' or 3 values"):
        CanvasSpec(background=bad)
    with pytest.raises(ValueError, match="background must be 'auto' or 3 values"):
        CrowdSpec(background=bad)


def crowd_member(flag: Image.Image) -> ImageRecord:
    """A member whose trusted box is the whole flag, inside a surround the crop leaves out."""
    image = Image.new("RGB", (flag.width + 10, flag.height + 10), (250, 250, 5))
    image.paste(flag, (5, 5))
    data = png(image)
    box = Box(5, 5, 5 + flag.width, 5 + flag.height)
    return ImageRecord(sha256_hex(data), data, image.width, image.height, "flag", box=box)


def canvas_edge_shares(crowd) -> list[float]:
    """Per instance edge inside the canvas with the canvas (not another instance) beside it,
    the readable share of its pixel pairs there."""
    pixels = decode(crowd.image)
    height, width = pixels.shape[:2]
    shares = []
    for instance in crowd.instances:
        x1, y1, x2, y2 = (int(v) for v in instance.box.to_list())
        across = []
        if x1 > 0:
            across.append((pixels[y1:y2, x1 - 1], pixels[y1:y2, x1]))
        if x2 < width:
            across.append((pixels[y1:y2, x2], pixels[y1:y2, x2 - 1]))
        if y1 > 0:
            across.append((pixels[y1 - 1, x1:x2], pixels[y1, x1:x2]))
        if y2 < height:
            across.append((pixels[y2, x1:x2], pixels[y2 - 1, x1:x2]))
        for outside, inside in across:
            on_canvas = (outside == crowd.background).all(axis=-1)
            if on_canvas.sum() >= 8:
                shares.append(readable_share(outside[on_canvas], inside[on_canvas]))
    return shares


def test_crowds_of_white_ground_flags_show_every_outline_against_the_canvas():
    members = [
        crowd_member(disc_flag(WHITE, RED)),
        crowd_member(cross_flag(WHITE, BLUE)),
        crowd_member(disc_flag(WHITE, BLUE, (60, 60))),
    ]
    spec = CrowdSpec(width=320, height=240, count=(6, 8), scale=(0.15, 0.25), overlap=0)
    for seed in range(4):
        crowd = compose_crowd(members, spec, seed)
        assert crowd.background != WHITE
        shares = canvas_edge_shares(crowd)
        assert len(shares) >= 3 * len(crowd.instances)
        assert min(shares) >= 0.75
        # On a white canvas asked for explicitly, the same crowd's outlines vanish.
        white = compose_crowd(members, replace(spec, background=WHITE), seed)
        assert white.instances == crowd.instances
        assert max(canvas_edge_shares(white)) < 0.75


def test_crowds_of_coloured_objects_keep_a_white_canvas():
    members = [crowd_member(disc_flag(c, WHITE)) for c in [RED, BLUE, (0, 120, 60)]]
    spec = CrowdSpec(width=200, height=150, count=(5, 5), scale=(0.15, 0.25), overlap=0)
    crowd = compose_crowd(members, spec, "c")
    assert crowd.background == WHITE
    assert min(canvas_edge_shares(crowd)) >= 0.75


def test_doctests():
    assert doctest.testmod(background_module).failed == 0
