"""Image validation and normalisation: every awkward input is kept as upright RGB or dropped."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import badinput
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile

from groundforge.filters.image import REASONS, ImageLimits, check_image, open_rgb
from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import ImageRecord, sha256_hex


def record_of(data: bytes) -> ImageRecord:
    return ImageRecord(
        image_id=sha256_hex(data), image=data, width=0, height=0, domain="test", entity="x"
    )


def check(data: bytes, limits: ImageLimits | None = None) -> Verdict:
    return check_image(record_of(data)) if limits is None else check_image(record_of(data), limits)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, badinput.make_bad_corpus(folder)


@pytest.fixture(scope="module")
def verdicts(corpus: tuple[Path, dict[str, str]]) -> dict[str, Verdict]:
    folder, expected = corpus
    return {name: check((folder / name).read_bytes()) for name in expected}


def upright(verdict: Verdict) -> np.ndarray:
    """The kept image's pixels, opened the way any consumer would (no conversion)."""
    image = Image.open(io.BytesIO(verdict.value.image))
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# -- the corpus ---------------------------------------------------------------------------------


def test_every_corpus_item_gets_its_expected_outcome(corpus, verdicts):
    _, expected = corpus
    got = {name: "keep" if v.keep else v.reason for name, v in verdicts.items()}
    assert got == expected
    assert set(expected.values()) - {badinput.KEEP} <= set(REASONS)


def test_kept_corpus_items_are_rgb_at_their_upright_size(verdicts):
    kept = {name: v for name, v in verdicts.items() if v.keep}
    assert set(kept) == set(badinput.KEPT_SIZES)
    for name, verdict in kept.items():
        size = badinput.KEPT_SIZES[name]
        assert (verdict.value.width, verdict.value.height) == size, name
        assert (verdict.metrics["width"], verdict.metrics["height"]) == size, name
        assert upright(verdict).shape == (size[1], size[0], 3), name


def test_kept_record_keeps_its_identity_and_fields(corpus, verdicts):
    folder, _ = corpus
    source = (folder / "exif_rotated.jpg").read_bytes()
    kept = verdicts["exif_rotated.jpg"].value
    assert kept.image_id == sha256_hex(source)
    assert kept.image != source
    assert (kept.domain, kept.entity) == ("test", "x")


def test_drop_metrics_carry_the_detail(verdicts):
    assert verdicts["empty.png"].metrics == {"bytes": 0}
    assert verdicts["text_renamed.jpg"].metrics["head"] == "<!DOCTYPE html>\n"
    small = verdicts["one_pixel.png"].metrics
    assert (small["width"], small["height"], small["min_side"]) == (1, 1, 16)
    assert (small["format"], small["mode"]) == ("PNG", "RGB")
    for name in ("truncated.png", "truncated.jpg"):
        metrics = verdicts[name].metrics
        assert metrics["error"].startswith("OSError: image file is truncated"), name
        assert (metrics["width"], metrics["height"]) == (64, 64)


def test_error_text_is_stable_across_runs(corpus):
    folder, expected = corpus
    for name in expected:
        data = (folder / name).read_bytes()
        assert check(data).metrics == check(data).metrics, name


def test_truncated_images_leave_pil_global_alone(verdicts):
    assert verdicts["truncated.png"].reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_no_warning_escapes(corpus):
    folder, expected = corpus
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in expected:
            check((folder / name).read_bytes())
        check(badinput.declared_size_png(10000, 10000))  # in PIL's warning band
    assert caught == []


def test_concurrent_checks_restore_the_warning_filters(corpus):
    folder, expected = corpus
    blobs = [(folder / name).read_bytes() for name in expected]
    blobs.append(badinput.declared_size_png(10000, 10000))
    alone = [check(data).reason for data in blobs]
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda data: check(data).reason, blobs * 20))
    assert together == alone * 20
    assert warnings.filters == before


# -- orientation and colour ---------------------------------------------------------------------


def test_exif_rotated_image_is_upright_with_the_mark_top_right(verdicts):
    verdict = verdicts["exif_rotated.jpg"]
    assert verdict.metrics["orientation"] == 6
    assert verdict.metrics["reencoded"] is True
    pixels = upright(verdict)
    height, width, _ = pixels.shape
    assert (width, height) == (40, 60)
    m = badinput.EXIF_MARK
    corners = {
        "top_left": pixels[2 : m - 2, 2 : m - 2],
        "top_right": pixels[2 : m - 2, width - m + 2 : width - 2],
        "bottom_left": pixels[height - m + 2 : height - 2, 2 : m - 2],
        "bottom_right": pixels[height - m + 2 : height - 2, width - m + 2 : width - 2],
    }
    means = {name: block.reshape(-1, 3).mean(axis=0) for name, block in corners.items()}
    assert np.abs(means["top_right"] - badinput.EXIF_RED).max() < 20
    for name in ("top_left", "bottom_left", "bottom_right"):
        assert np.abs(means[name] - badinput.EXIF_BLUE).max() < 20, name


def test_reencoded_jpeg_carries_no_exif(verdicts):
    image = Image.open(io.BytesIO(verdicts["exif_rotated.jpg"].value.image))
    assert image.format == "JPEG"
    assert dict(image.getexif()) == {}
    assert "exif" not in image.info


def test_palette_transparency_becomes_white(verdicts):
    pixels = upright(verdicts["palette_transparent.png"])
    x1, y1, x2, y2 = badinput.PALETTE_SQUARE
    inside = np.zeros(pixels.shape[:2], bool)
    inside[y1:y2, x1:x2] = True
    assert (pixels[inside] == (0, 0, 255)).all()
    assert (pixels[~inside] == (255, 255, 255)).all()


def test_sixteen_bit_gradient_fills_the_8bit_range(verdicts):
    pixels = upright(verdicts["gray16.png"])
    row = pixels[0, :, 0]
    assert row.tolist() == list(range(256))
    assert (pixels == pixels[:1, :, :1]).all()  # every row the same grey ramp


def test_cmyk_comes_out_rgb_with_plausible_colours(verdicts):
    verdict = verdicts["cmyk.jpg"]
    assert (verdict.metrics["mode"], verdict.metrics["format"]) == ("CMYK", "JPEG")
    pixels = upright(verdict)
    w = badinput.CMYK_STRIPE_WIDTH
    for i, (_, rgb) in enumerate(badinput.CMYK_STRIPES):
        stripe = pixels[2:-2, i * w + 2 : (i + 1) * w - 2].reshape(-1, 3)
        assert np.abs(stripe.mean(axis=0) - rgb).max() < 16, rgb


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 128), (5, 5, 15, 15))
    pixels = upright(check(badinput.encode(rgba, "PNG")))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[10, 10].tolist() == [127, 127, 127]


def test_sixteen_bit_transparent_grey_becomes_white():
    values = np.full((16, 16), 1000, np.uint16)
    values[4:8, 4:8] = 65535
    data = badinput.encode(Image.fromarray(values), "PNG", transparency=1000)
    pixels = upright(check(data))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[5, 5].tolist() == [255, 255, 255]
    values[0, 0] = 2000  # no longer the transparent value: a dark grey, 2000 / 257 -> 8
    pixels = upright(check(badinput.encode(Image.fromarray(values), "PNG", transparency=1000)))
    assert pixels[0, 0].tolist() == [8, 8, 8]


def test_wide_integer_and_float_greys_are_stretched():
    ints = np.linspace(-100_000, 100_000, 16 * 16).reshape(16, 16).astype(np.int32)
    pixels = upright(check(badinput.encode(Image.fromarray(ints), "TIFF")))
    assert (pixels[0, 0, 0], pixels[-1, -1, 0]) == (0, 255)
    floats = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16).astype(np.float32)
    pixels = upright(check(badinput.encode(Image.fromarray(floats), "TIFF")))
    assert (pixels[0, 0, 0], pixels[-1, -1, 0]) == (0, 255)
    assert (np.diff(pixels[..., 0].ravel()) >= 0).all()


# -- decompression bombs and limits --------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size of every image PIL is asked to decode."""
    calls: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_bomb_is_rejected_from_the_header(corpus, load_calls):
    folder, _ = corpus
    verdict = check((folder / "bomb_30000x30000.png").read_bytes())
    assert verdict.reason == "too_many_pixels"
    assert (verdict.metrics["width"], verdict.metrics["height"]) == (30000, 30000)
    assert verdict.metrics["pixels"] == 900_000_000
    assert verdict.metrics["format"] == "PNG"
    assert load_calls == []


@pytest.mark.parametrize("side", [9000, 10000])  # below and inside PIL's own warning band
def test_header_above_our_limit_is_rejected_before_decoding(side, load_calls):
    verdict = check(badinput.declared_size_png(side, side))
    assert verdict.reason == "too_many_pixels"
    assert verdict.metrics["pixels"] == side * side
    assert verdict.metrics["max_pixels"] == 64_000_000
    assert load_calls == []


def test_custom_limits():
    data = badinput.encode(Image.new("RGB", (40, 20), "red"), "PNG")
    assert check(data).keep
    assert check(data, ImageLimits(min_side=21)).reason == "too_small"
    assert check(data, ImageLimits(max_pixels=799)).reason == "too_many_pixels"
    assert check(data, ImageLimits(max_pixels=800)).keep
    assert check(data, ImageLimits(max_side=39)).reason == "too_large"
    assert check(data, ImageLimits(max_side=40)).keep


def test_limits_apply_to_the_upright_image():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = badinput.encode(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif)
    verdict = check(data, ImageLimits(min_side=20, max_side=40))
    assert (verdict.value.width, verdict.value.height) == (20, 40)


# -- bytes out ----------------------------------------------------------------------------------


def test_plain_rgb_png_and_jpeg_bytes_are_kept_untouched(corpus, verdicts):
    folder, _ = corpus
    for name in ("rgb.png", "rgb.jpg"):
        assert verdicts[name].metrics["reencoded"] is False
        assert verdicts[name].value.image == (folder / name).read_bytes()


def test_reencoding_is_deterministic(corpus, verdicts):
    folder, _ = corpus
    for name, verdict in verdicts.items():
        if verdict.keep and verdict.metrics["reencoded"]:
            again = check((folder / name).read_bytes())
            assert again.value.image == verdict.value.image, name


def test_output_format_follows_the_source(verdicts):
    def fmt(name):
        return Image.open(io.BytesIO(verdicts[name].value.image)).format

    assert fmt("cmyk.jpg") == fmt("exif_rotated.jpg") == "JPEG"
    assert fmt("gray16.png") == fmt("palette_transparent.png") == "PNG"
    gif = badinput.encode(Image.new("P", (16, 16)), "GIF")
    assert Image.open(io.BytesIO(check(gif).value.image)).format == "PNG"


def test_sixteen_bit_rgb_png_is_reencoded_to_8_bit():
    # PIL opens 16-bit RGB as mode "RGB"; the file itself is still 16-bit and must be rewritten.
    row = b"\x00" + b"\xff\xff\x00\x00\x80\x00" * 16  # filter byte, then (R, G, B) 16-bit
    data = badinput.handmade_png(16, 16, row * 16, bit_depth=16)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    verdict = check(data)
    assert verdict.metrics["reencoded"] is True
    assert verdict.value.image[24] == 8
    assert upright(verdict)[0, 0].tolist() == [255, 0, 128]


def test_rgb_icc_profile_is_kept_and_others_dropped():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated = badinput.encode(
        Image.new("RGB", (20, 20), "red"), "JPEG", exif=exif, icc_profile=srgb
    )
    kept = Image.open(io.BytesIO(check(rotated).value.image))
    assert kept.info.get("icc_profile") == srgb
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    grey = badinput.encode(Image.new("L", (20, 20), 90), "PNG", icc_profile=lab)
    kept = Image.open(io.BytesIO(check(grey).value.image))
    assert "icc_profile" not in kept.info


def test_open_rgb_decodes_kept_bytes(verdicts):
    for name, verdict in verdicts.items():
        if verdict.keep:
            image = open_rgb(verdict.value.image)
            assert image.mode == "RGB", name
            assert image.size == badinput.KEPT_SIZES[name], name


# -- properties ---------------------------------------------------------------------------------

FORMAT_MODES = [
    ("PNG", "1"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "P+trns"), ("PNG", "RGB"),
    ("PNG", "RGBA"), ("PNG", "I;16"), ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"),
    ("GIF", "P"), ("GIF", "P+trns"), ("GIF", "L"), ("BMP", "1"), ("BMP", "P"), ("BMP", "RGB"),
    ("TIFF", "LA"), ("TIFF", "RGBA"), ("TIFF", "CMYK"), ("TIFF", "I;16"), ("TIFF", "I"),
    ("TIFF", "F"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("PPM", "L"), ("PPM", "RGB"),
]  # fmt: skip
EXIF_FORMATS = {"PNG", "JPEG", "WEBP", "TIFF"}


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) > 0.5)
    if mode in ("L", "LA", "RGB", "RGBA"):
        shape = (height, width) if mode == "L" else (height, width, len(mode))
        return Image.fromarray(rng.integers(0, 256, shape, np.uint8))
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), rng.bytes(width * height * 4))
    if mode.startswith("P"):
        image = Image.frombytes("P", (width, height), rng.integers(0, 8, width * height, np.uint8))
        image.putpalette(rng.bytes(24))
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (height, width)).astype(np.int32))
    return Image.fromarray(rng.normal(0, 1, (height, width)).astype(np.float32))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(FORMAT_MODES),
    width=st.integers(16, 48),
    height=st.integers(16, 48),
    seed=st.integers(0, 2**32 - 1),
    orientation=st.integers(1, 8),
)
def test_any_small_image_is_kept_upright_rgb(case, width, height, seed, orientation):
    fmt, mode = case
    image = random_image(mode, width, height, seed)
    params = {"transparency": 3} if mode == "P+trns" else {}
    if fmt in EXIF_FORMATS:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif
    else:
        orientation = 1
    data = badinput.encode(image, fmt, **params)
    verdict = check(data)
    assert verdict.keep, verdict
    expected = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    assert (verdict.value.width, verdict.value.height) == expected
    decoded = Image.open(io.BytesIO(verdict.value.image))
    assert decoded.mode == "RGB"
    assert decoded.size == expected
    assert check(data).value.image == verdict.value.image


VALID_PNG = badinput.encode(random_image("RGB", 20, 20, 0), "PNG")


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), max_size=8
        ).map(lambda edits: bytes(_edit(VALID_PNG, edits))),
        st.integers(0, len(VALID_PNG)).map(lambda n: VALID_PNG[:n]),
    )
)
def test_any_bytes_give_a_verdict(data):
    verdict = check(data)
    assert verdict.keep or verdict.reason in REASONS


def _edit(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for at, value in edits:
        out[at] = value
    return out
