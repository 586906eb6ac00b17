"""The foreground box: alpha cut-outs, plain borders, busy borders and blank images."""

from __future__ import annotations

import pickle

import badinput
import numpy as np
from PIL import Image

from groundforge.annotators.foreground import ForegroundAnnotator, foreground_box
from groundforge.filters.image import check_image, open_rgb
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord, sha256_hex


def white(width: int = 50, height: int = 40) -> Image.Image:
    return Image.new("RGB", (width, height), (255, 255, 255))


def record_of(image: Image.Image, **fields) -> ImageRecord:
    data = badinput.encode(image, "PNG")
    return ImageRecord(sha256_hex(data), data, image.width, image.height, "flag", **fields)


def test_single_pixel_gives_exclusive_edges():
    image = white(20, 12)
    image.putpixel((5, 7), (0, 0, 0))
    assert foreground_box(image) == Box(5, 7, 6, 8)


def test_object_on_a_white_border():
    image = white()
    image.paste((200, 30, 30), (12, 8, 30, 25))
    assert foreground_box(image) == Box(12, 8, 30, 25)


def test_differences_within_tolerance_are_ground():
    image = white()
    image.paste((250, 250, 244), (2, 2, 48, 38))  # off-white, 11 from the border colour
    image.paste((0, 128, 0), (20, 10, 22, 30))
    assert foreground_box(image, tolerance=12) == Box(20, 10, 22, 30)
    assert foreground_box(image, tolerance=10) == Box(2, 2, 48, 38)


def test_object_touching_the_edge_keeps_the_border_uniform():
    image = white(50, 40)
    image.paste((0, 0, 0), (0, 10, 8, 20))  # 8% of the 2-pixel ring is covered
    assert foreground_box(image) == Box(0, 10, 8, 20)


def test_any_plain_colour_is_a_ground():
    image = Image.new("RGB", (30, 30), (10, 60, 200))
    image.paste((255, 255, 0), (3, 4, 20, 9))
    assert foreground_box(image) == Box(3, 4, 20, 9)


def test_busy_border_means_the_whole_image():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    assert foreground_box(Image.fromarray(pixels)) == Box(0, 0, 50, 40)
    # A flag filling its canvas: two halves, so no colour owns the border.
    image = white(50, 40)
    image.paste((200, 0, 0), (0, 20, 50, 40))
    assert foreground_box(image) == Box(0, 0, 50, 40)


def test_blank_image_has_no_box():
    assert foreground_box(white()) is None
    assert foreground_box(Image.new("RGB", (30, 20), (0, 0, 0))) is None
    assert foreground_box(Image.new("RGBA", (30, 20), (9, 9, 9, 0))) is None


def test_alpha_cut_out():
    image = Image.new("RGBA", (40, 30), (255, 255, 255, 0))
    image.paste((30, 30, 30, 255), (10, 5, 20, 15))
    image.putpixel((25, 20), (0, 0, 0, 1))  # faint anti-aliasing still counts at threshold 0
    assert foreground_box(image) == Box(10, 5, 26, 21)
    assert foreground_box(image, alpha_threshold=1) == Box(10, 5, 20, 15)


def test_alpha_wins_over_colour():
    # Transparent pixels keep a random colour: only alpha says where the object is.
    pixels = np.random.default_rng(1).integers(0, 256, (30, 40, 4), np.uint8)
    pixels[..., 3] = 0
    pixels[12:14, 3:9, 3] = 255
    assert foreground_box(Image.fromarray(pixels)) == Box(3, 12, 9, 14)


def test_opaque_alpha_falls_back_to_the_border_rule():
    image = Image.new("RGBA", (40, 30), (255, 255, 255, 255))
    image.paste((0, 0, 255, 255), (4, 6, 9, 10))
    assert foreground_box(image) == Box(4, 6, 9, 10)


def test_palette_transparency_is_alpha():
    image = Image.new("P", (32, 32), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, (8, 9, 24, 20))
    image.info["transparency"] = 0
    assert foreground_box(image) == Box(8, 9, 24, 20)


def test_min_fraction_drops_specks():
    image = white(20, 10)
    image.paste((0, 0, 0), (2, 2, 6, 7))  # 20 of 200 pixels
    assert foreground_box(image, min_fraction=0.1) == Box(2, 2, 6, 7)
    assert foreground_box(image, min_fraction=0.11) is None


def test_greyscale_input():
    image = Image.new("L", (20, 20), 255)
    image.paste(0, (5, 6, 7, 8))
    assert foreground_box(image) == Box(5, 6, 7, 8)


def test_tiny_image_is_all_border():
    image = white(4, 4)
    image.putpixel((1, 1), (0, 0, 0))  # 1 of 16 pixels differs: still a white ground
    assert foreground_box(image) == Box(1, 1, 2, 2)


def test_annotator_adds_the_candidate():
    image = white()
    image.paste((200, 30, 30), (12, 8, 30, 25))
    before = {"detector": (Detection(Box(0, 0, 5, 5), 0.5, "x"),)}
    record = record_of(image, candidates=before)
    out = ForegroundAnnotator()(record)
    assert out.candidates == {
        **before,
        "foreground": (Detection(Box(12, 8, 30, 25), 1.0, "foreground"),),
    }
    assert record.candidates == before  # the input record is not changed
    assert out.image == record.image


def test_annotator_on_blank_gives_no_candidate():
    assert ForegroundAnnotator()(record_of(white())).candidates == {"foreground": ()}


def test_annotator_honours_min_fraction():
    image = white(20, 10)
    image.paste((0, 0, 0), (2, 2, 6, 7))
    record = record_of(image)
    assert ForegroundAnnotator(min_fraction=0.11)(record).candidates == {"foreground": ()}


def test_annotator_after_the_image_filter_uses_the_composited_white():
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((0, 90, 0, 255), (6, 3, 31, 22))
    normalised = check_image(record_of(rgba)).value
    found = ForegroundAnnotator()(normalised).candidates["foreground"]
    assert found == (Detection(Box(6, 3, 31, 22), 1.0, "foreground"),)


def test_white_object_on_transparent_ground_keeps_its_white_part():
    # A flag with a white top stripe on a transparent canvas: after compositing onto white the
    # stripe merges with the ground, so only the opaque extent measured before can find it.
    rgba = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (5, 4, 50, 14))
    rgba.paste((0, 150, 0, 255), (5, 14, 50, 24))
    rgba.paste((200, 0, 0, 255), (5, 24, 50, 34))
    normalised = check_image(record_of(rgba)).value
    assert normalised.opaque_box == Box(5, 4, 50, 34)
    assert foreground_box(open_rgb(normalised.image)) == Box(5, 14, 50, 34)
    found = ForegroundAnnotator()(normalised).candidates["foreground"]
    assert found == (Detection(Box(5, 4, 50, 34), 1.0, "foreground"),)


def test_opaque_sources_have_no_opaque_box():
    assert check_image(record_of(white())).value.opaque_box is None
    rgba_opaque = Image.new("RGBA", (30, 20), (10, 20, 30, 255))
    assert check_image(record_of(rgba_opaque)).value.opaque_box is None


def test_white_background_rule_keeps_a_plain_coloured_field():
    # A full-bleed red flag with a white emblem: with any border colour as the ground the box is
    # the emblem; with a white ground the red field is the object.
    flag = Image.new("RGB", (60, 40), (200, 0, 0))
    flag.paste((255, 255, 255), (25, 15, 35, 25))
    assert foreground_box(flag) == Box(25, 15, 35, 25)
    assert foreground_box(flag, background=(255, 255, 255)) == Box(0, 0, 60, 40)
    on_white = white(60, 40)
    on_white.paste((200, 0, 0), (10, 5, 50, 30))
    assert foreground_box(on_white, background=(255, 255, 255)) == Box(10, 5, 50, 30)
    record = record_of(flag)
    found = ForegroundAnnotator(background="white")(record).candidates["foreground"]
    assert found[0].box == Box(0, 0, 60, 40)


def test_annotator_pickles():
    annotate = ForegroundAnnotator(tolerance=20, min_fraction=0.05, border=1)
    again = pickle.loads(pickle.dumps(annotate))
    assert again == annotate
    image = white()
    image.paste((0, 0, 0), (10, 10, 30, 30))
    record = record_of(image)
    assert again(record) == annotate(record)
