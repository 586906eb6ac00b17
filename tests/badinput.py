"""Awkward image files, and paths that cannot be read, for the filter and pipeline tests.

:func:`make_bad_corpus` writes the corpus into a folder and returns file name -> expected outcome
of :func:`groundforge.filters.image.check_image`: :data:`KEEP` or the drop reason code.
:data:`KEPT_SIZES` gives each kept file's upright ``(width, height)``. Some files carry known
content for the tests to check:

- ``exif_rotated.jpg``: stored :data:`EXIF_STORED_SIZE` (landscape) with EXIF orientation 6
  ("rotate 90 degrees clockwise to display"); blue with a red :data:`EXIF_MARK` square in the
  stored top-left corner, which must end up in the top-right corner of the upright image.
- ``cmyk.jpg``: vertical stripes :data:`CMYK_STRIPE_WIDTH` wide, one per :data:`CMYK_STRIPES`
  entry ``(cmyk, expected rgb)``.
- ``gray16.png``: 16-bit grey, 256 wide; column ``x`` holds ``x * 257`` (so 8-bit ``x``).
- ``palette_transparent.png``: palette image whose index 0 (red in the palette) is transparent;
  :data:`PALETTE_SQUARE` (``xyxy``) is opaque blue.

:func:`make_unreadable_paths` makes paths that look like images but cannot be read (for the
source reader and pipeline tests; they are not part of the corpus).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

KEEP = "keep"

EXIF_STORED_SIZE = (60, 40)
EXIF_MARK = 12
EXIF_RED = (255, 0, 0)
EXIF_BLUE = (0, 0, 255)

CMYK_STRIPE_WIDTH = 8
CMYK_STRIPES = (
    ((255, 0, 0, 0), (0, 255, 255)),  # cyan
    ((0, 255, 0, 0), (255, 0, 255)),  # magenta
    ((0, 0, 255, 0), (255, 255, 0)),  # yellow
    ((0, 0, 0, 255), (0, 0, 0)),  # black
)

PALETTE_SQUARE = (8, 8, 24, 24)

KEPT_SIZES = {
    "rgb.png": (48, 32),
    "rgb.jpg": (48, 32),
    "cmyk.jpg": (CMYK_STRIPE_WIDTH * len(CMYK_STRIPES), 24),
    "gray16.png": (256, 16),
    "palette_transparent.png": (32, 32),
    "exif_rotated.jpg": (EXIF_STORED_SIZE[1], EXIF_STORED_SIZE[0]),
}

NOT_FOUND_PAGE = b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"


def make_bad_corpus(folder: str | Path) -> dict[str, str]:
    """Write the corpus into ``folder``; return file name -> ``"keep"`` or the reason code.

    >>> make_bad_corpus(tmp_path)["bomb_30000x30000.png"]             # doctest: +SKIP
    'too_many_pixels'
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    png_noise = encode(noise, "PNG")
    jpeg_noise = encode(noise, "JPEG", quality=90)
    webp_noise = encode(noise, "WEBP", lossless=True)
    files = {
        "empty.png": (b"", "empty_file"),
        # Cut inside the pixel data: a PNG missing only its IEND chunk still decodes.
        "truncated.png": (png_noise[: len(png_noise) // 2], "truncated"),
        "truncated.jpg": (jpeg_noise[: len(jpeg_noise) // 2], "truncated"),
        "truncated.webp": (webp_noise[: len(webp_noise) // 2], "truncated"),
        "text_renamed.jpg": (NOT_FOUND_PAGE, "not_an_image"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "too_small"),
        "bomb_30000x30000.png": (declared_size_png(30000, 30000), "too_many_pixels"),
        "cmyk.jpg": (_cmyk_jpeg(), KEEP),
        "gray16.png": (_grey16_png(), KEEP),
        "palette_transparent.png": (_palette_png(), KEEP),
        "exif_rotated.jpg": (_exif_rotated_jpeg(), KEEP),
        "rgb.png": (encode(_pattern(48, 32), "PNG"), KEEP),
        "rgb.jpg": (encode(_pattern(48, 32), "JPEG", quality=90), KEEP),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}


def make_unreadable_paths(folder: str | Path) -> dict[str, Path]:
    """Make paths named like images that cannot be read; return kind -> path.

    - ``"directory"``: a directory named ``directory.png`` (reading raises IsADirectoryError).
    - ``"dangling_symlink"``: ``dangling.png``, a symlink to a file that does not exist
      (reading raises FileNotFoundError, though the name is listed in the folder).

    A file without read permission is not used: tests often run as root, which reads it anyway.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    directory = folder / "directory.png"
    directory.mkdir()
    dangling = folder / "dangling.png"
    dangling.symlink_to(folder / "missing-target.png")
    return {"directory": directory, "dangling_symlink": dangling}


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """``image`` saved as ``fmt`` into bytes."""
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def declared_size_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels (a decompression bomb).

    The pixel data is a few bytes, so the file is small on disk and only a decoder that trusts
    the header would allocate the pixels.
    """
    return handmade_png(width, height, b"\x00" * 16)


def handmade_png(
    width: int, height: int, scanlines: bytes, bit_depth: int = 8, colour_type: int = 2
) -> bytes:
    """A PNG built chunk by chunk (with correct CRCs) around already-filtered ``scanlines``.

    For what PIL cannot write: headers that lie about the data, or 16-bit RGB (colour type 2).
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _pattern(width: int, height: int) -> Image.Image:
    """A smooth RGB pattern: red grows to the right, green downwards."""
    x = np.linspace(0, 255, width).astype(np.uint8)
    y = np.linspace(0, 255, height).astype(np.uint8)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = x[None, :]
    rgb[..., 1] = y[:, None]
    rgb[..., 2] = 128
    return Image.fromarray(rgb)


def _cmyk_jpeg() -> bytes:
    width, height = KEPT_SIZES["cmyk.jpg"]
    image = Image.new("CMYK", (width, height))
    for i, (cmyk, _) in enumerate(CMYK_STRIPES):
        image.paste(cmyk, (i * CMYK_STRIPE_WIDTH, 0, (i + 1) * CMYK_STRIPE_WIDTH, height))
    return encode(image, "JPEG", quality=95)


def _grey16_png() -> bytes:
    width, height = KEPT_SIZES["gray16.png"]
    ramp = (np.arange(width, dtype=np.uint16) * 257)[None, :].repeat(height, axis=0)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def _palette_png() -> bytes:
    image = Image.new("P", KEPT_SIZES["palette_transparent.png"], 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, PALETTE_SQUARE)
    return encode(image, "PNG", transparency=0)


def _exif_rotated_jpeg() -> bytes:
    image = Image.new("RGB", EXIF_STORED_SIZE, EXIF_BLUE)
    image.paste(EXIF_RED, (0, 0, EXIF_MARK, EXIF_MARK))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif)
