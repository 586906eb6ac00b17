"""The pixel check behind dedup and decontamination: what counts as the same picture."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageEnhance

from groundforge.filters.sameimage import content_of, frame_box, look_of, same_picture


def flag(size=(300, 200), field=(0, 122, 61), emblem: int = 0) -> Image.Image:
    image = Image.new("RGB", size, field)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0] // 3, size[1]), fill=(206, 17, 38))
    if emblem:
        c = (size[0] * 2 // 3, size[1] // 2)
        draw.ellipse((c[0] - emblem, c[1] - emblem, c[0] + emblem, c[1] + emblem), fill="white")
    return image


def jpeg(image: Image.Image, quality: int = 60) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def padded(image: Image.Image, pad: int, colour=(0, 0, 0)) -> Image.Image:
    out = Image.new("RGB", (image.width + 2 * pad, image.height + 2 * pad), colour)
    out.paste(image, (pad, pad))
    return out


def same(a, b) -> bool:
    return same_picture(look_of(a), look_of(b)).same


def test_a_uniform_frame_is_trimmed_and_a_striped_edge_is_not():
    original = flag()
    assert frame_box(original) == (0, 0, 300, 200)
    box = frame_box(padded(original, 15))
    assert all(abs(got - want) <= 3 for got, want in zip(box, (15, 15, 315, 215), strict=True))
    assert abs(content_of(padded(original, 15)).width - 300) <= 6


def test_copies_are_the_same_picture():
    original = flag()
    assert same(original, jpeg(original, 40))
    assert same(original, jpeg(original.resize((150, 100), Image.LANCZOS), 85))
    assert same(original, original.crop((6, 4, 300, 196)))
    assert same(original, jpeg(padded(original, 12, (255, 255, 255)), 85))
    assert same(original, jpeg(ImageEnhance.Brightness(original).enhance(1.1), 90))


def test_a_small_emblem_another_shade_or_another_aspect_is_another_picture():
    original = flag()
    assert not same(original, flag(emblem=8))  # a disc of 2.6% of the height
    # Another shade that no brightness change makes (a brighter field is brighter in every
    # channel).
    assert not same(original, flag(field=(0, 122, 95)))
    assert not same(original, flag(size=(250, 200)))  # 4:5 against 3:2
    verdict = same_picture(look_of(flag()), look_of(flag(size=(250, 200))))
    assert verdict.aspect_change > 0.08


def test_two_flat_colours_are_two_pictures_whatever_the_brightness_fit():
    red, darker_red = (
        Image.new("RGB", (90, 60), (200, 30, 40)),
        Image.new("RGB", (90, 60), (150, 60, 40)),
    )
    assert not same(red, darker_red)
    assert same(red, ImageEnhance.Brightness(red).enhance(0.95))


def cross(size=(27, 16)) -> Image.Image:
    """A Nordic cross flag, as small as the bundle's smallest (its bars one or two pixels)."""
    w, h = size
    image = Image.new("RGB", size, (186, 12, 47))
    draw = ImageDraw.Draw(image)
    draw.rectangle((w * 6 // 22, 0, w * 10 // 22 - 1, h), fill="white")
    draw.rectangle((0, h * 6 // 16, w, h * 10 // 16 - 1), fill="white")
    draw.rectangle((w * 7 // 22, 0, w * 9 // 22 - 1, h), fill=(0, 32, 91))
    draw.rectangle((0, h * 7 // 16, w, h * 9 // 16 - 1), fill=(0, 32, 91))
    return image


def test_a_tiny_image_survives_jpeg_chroma_subsampling():
    # At 22 x 16 pixels JPEG keeps 11 x 8 colour samples: the cross's thin blue bars become
    # a smear the size of a look block. Colours are compared at the resolution JPEG kept.
    for size in ((27, 16), (22, 16)):
        original = cross(size)
        for quality in (40, 60, 90):
            assert same(original, jpeg(original, quality)), (size, quality)
    # ... and tiny images stay tellable apart where their colours differ over areas.
    assert not same(cross(), cross().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    small = (36, 24)
    assert not same(flag(small), flag(small, field=(0, 122, 95)))
    assert not same(flag(small), flag(small, field=(0, 56, 147)))


def test_emblems_on_one_plain_field_are_told_apart():
    # Both trim to their emblem: the framed comparison, sharper than the whole one, decides.
    field = (0, 122, 61)
    star, disc = Image.new("RGB", (300, 200), field), Image.new("RGB", (300, 200), field)
    points = [(150, 82), (156, 96), (171, 96), (159, 105), (164, 119), (150, 110), (136, 119)]
    ImageDraw.Draw(star).polygon([*points, (141, 105), (129, 96), (144, 96)], fill="yellow")
    ImageDraw.Draw(disc).ellipse((138, 88, 162, 112), fill="yellow")
    assert not same(star, disc)
    assert not same(star, Image.new("RGB", (300, 200), field))
    assert same(star, jpeg(star, 60))


def test_a_crop_into_a_border_is_still_the_same_picture():
    # A bordered flag: a crop that cuts the border leaves a thinner one, or none.
    inner = flag((280, 180), emblem=20)
    bordered = padded(padded(inner, 6, (255, 255, 255)), 8, (206, 17, 38))
    w, h = bordered.size
    assert same(bordered, bordered.crop((9, 3, w - 2, h - 9)))
    assert same(bordered, jpeg(bordered.crop((10, 10, w - 10, h - 10)), 85))
