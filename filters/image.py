"""Image validity and normalisation: every image leaves as upright 8-bit RGB, or is dropped.

:func:`check_image` is a filter (``record -> Verdict``). It decodes the bytes a source delivered,
drops what cannot be used with one reason code per failure, and keeps a changed record whose
``image`` decodes to upright RGB and whose ``width``/``height`` are that upright size.

Reason codes (:data:`REASONS`):

- ``empty_file``: zero bytes.
- ``not_an_image``: PIL cannot identify the format (an HTML error page saved as ``.jpg``).
  ``head`` shows the first bytes.
- ``truncated``: the data ends early (PIL's ``LOAD_TRUNCATED_IMAGES`` is left ``False``).
- ``too_small``: the shorter side is below ``ImageLimits.min_side``.
- ``too_large``: the longer side is above ``ImageLimits.max_side`` (when set).
- ``too_many_pixels``: the header declares more than ``ImageLimits.max_pixels`` pixels; decided
  from the header, before any pixel is decoded (the decompression-bomb guard).
- ``decode_error``: anything else the decoder raises; ``error`` holds its text.

Drop metrics carry ``bytes`` and, once the header is read, ``format``, ``mode``, ``width`` and
``height`` (as declared), plus ``error`` text where PIL raised. Keep metrics carry the source
``format`` and ``mode``, the upright ``width`` and ``height``, the EXIF ``orientation`` applied,
``reencoded`` and, when the EXIF block could not be read (the image is still kept), ``exif_error``.

Encoding: the source bytes are kept untouched when they already are an 8-bit RGB JPEG or PNG
with nothing to undo (no EXIF rotation, no transparency, one frame), so nothing is recompressed
for nothing. Otherwise JPEG sources are re-encoded as JPEG (quality 95, 4:4:4 chroma so colour
edges of flags and clipart stay sharp) and every other source as PNG, which adds no loss of its
own. Re-encoded bytes carry no metadata (no EXIF, comments, dpi or timestamps), so the same input
always gives the same bytes; the one exception is an RGB ICC profile, which still describes the
unchanged pixel values and is kept. Other profiles (CMYK, grey) no longer fit RGB output and
are dropped; CMYK is converted with PIL's profile-free formula.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from groundforge.filters.verdict import Verdict
from groundforge.schemas.box import Box, mask_box
from groundforge.schemas.records import ImageRecord

REASONS = (
    "empty_file",
    "not_an_image",
    "truncated",
    "too_small",
    "too_large",
    "too_many_pixels",
    "decode_error",
)

JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 6

_ORIENTATION = 0x0112
_ROTATED = range(2, 9)  # EXIF orientations other than "upright" (1)
_WHITE = (255, 255, 255, 255)
_DEEP_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_JPEG_SOURCES = frozenset({"JPEG", "MPO"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class ImageLimits:
    """Size limits for :func:`check_image`.

    ``max_pixels`` is checked against the header before decoding. PIL itself refuses images
    above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179M pixels) when opening them, so a larger
    ``max_pixels`` has no effect beyond that.
    """

    min_side: int = 16
    max_pixels: int = 64_000_000
    max_side: int | None = None


DEFAULT_LIMITS = ImageLimits()


class _PilWarningsOff:
    """Silence PIL's warnings (decompression bomb, corrupt EXIF, ...) while images are decoded.

    ``warnings.catch_warnings`` swaps process-wide state, so threads entering and leaving it out
    of order can leave a filter installed for good. All decoding threads share one counted
    window instead: the first one in installs the filter, the last one out restores the state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            self._users += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._saved is not None:
                self._saved.__exit__(None, None, None)
                self._saved = None


_PIL_WARNINGS_OFF = _PilWarningsOff()


def check_image(record: ImageRecord, limits: ImageLimits = DEFAULT_LIMITS) -> Verdict:
    """Decode, validate and normalise ``record.image``; never raises.

    A kept verdict's ``value`` is the record with upright RGB ``image`` bytes and their size;
    its metrics give the source ``format`` and ``mode``, the EXIF ``orientation`` applied and
    whether the bytes were ``reencoded``.

    >>> v = check_image(record)                                          # doctest: +SKIP
    >>> v.keep, v.value.width, v.value.height, v.metrics["reencoded"]    # doctest: +SKIP
    (True, 40, 60, True)
    """
    data = record.image
    if not data:
        return Verdict.drop("empty_file", bytes=0)
    with _PIL_WARNINGS_OFF:
        return _check(record, data, limits)


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes kept by :func:`check_image` into a loaded RGB image.

    >>> open_rgb(check_image(record).value.image).mode                  # doctest: +SKIP
    'RGB'
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _check(record: ImageRecord, data: bytes, limits: ImageLimits) -> Verdict:
    detail: dict = {"bytes": len(data)}
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        detail.update(_declared_header(data))
        if "width" in detail:
            detail["pixels"] = detail["width"] * detail["height"]
        return Verdict.drop(
            "too_many_pixels", **detail, max_pixels=limits.max_pixels, error=_error_text(exc)
        )
    except UnidentifiedImageError:
        head = data[:16].decode("ascii", "backslashreplace")
        return Verdict.drop("not_an_image", **detail, head=head)
    except Exception as exc:
        return _decode_failure(data, exc, detail)

    width, height = image.size
    detail.update(format=image.format, mode=image.mode, width=width, height=height)
    refused = _refuse(width, height, limits, detail)
    if refused is not None:
        return refused

    try:
        image.load()
        orientation = _orientation(image, detail)
        upright = ImageOps.exif_transpose(image) if orientation in _ROTATED else image
        rgb = _to_rgb(upright)
    except Exception as exc:
        return _decode_failure(data, exc, detail)

    # A few formats (ICO) only learn their true size while loading: check it again.
    detail.update(width=rgb.width, height=rgb.height)
    refused = _refuse(*rgb.size, limits, detail)
    if refused is not None:
        return refused

    untouched = (
        orientation not in _ROTATED
        and image.mode == "RGB"
        and not image.has_transparency_data
        and getattr(image, "n_frames", 1) == 1
        and (
            image.format == "JPEG"
            # PIL decodes 16-bit PNGs to 8-bit RGB; the file itself must be 8-bit to keep it.
            or (image.format == "PNG" and data[12:16] == b"IHDR" and data[24] == 8)
        )
    )
    if untouched:
        out = data
    else:
        icc = image.info.get("icc_profile")
        keep_icc = isinstance(icc, bytes) and icc[16:20] == b"RGB "
        out = encode_rgb(rgb, image.format, icc if keep_icc else None)

    kept = replace(
        record, image=out, width=rgb.width, height=rgb.height, opaque_box=_opaque_box(upright)
    )
    return Verdict.ok(kept, **detail, orientation=orientation, reencoded=not untouched)


def _refuse(width: int, height: int, limits: ImageLimits, detail: dict) -> Verdict | None:
    """The drop verdict for a size outside ``limits``, or None when it fits."""
    if width * height > limits.max_pixels:
        return Verdict.drop(
            "too_many_pixels", **detail, pixels=width * height, max_pixels=limits.max_pixels
        )
    if min(width, height) < limits.min_side:
        return Verdict.drop("too_small", **detail, min_side=limits.min_side)
    if limits.max_side is not None and max(width, height) > limits.max_side:
        return Verdict.drop("too_large", **detail, max_side=limits.max_side)
    return None


def _orientation(image: Image.Image, detail: dict) -> int:
    """The EXIF (or XMP) orientation, 1..8; 1 when absent, invalid or the EXIF is unreadable.

    Broken EXIF says nothing about the pixels, so it is noted in ``detail`` but never drops.
    """
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception as exc:
        detail["exif_error"] = _error_text(exc)
        return 1
    return value if isinstance(value, int) and value in _ROTATED else 1


def _opaque_box(image: Image.Image) -> Box | None:
    """The extent of the non-transparent pixels, or None when nothing is transparent."""
    if not image.has_transparency_data:
        return None
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return None if alpha.min() == 255 else mask_box(alpha > 0)


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: deep greys scaled, any transparency composited on white."""
    if image.mode in _DEEP_GREY:
        return _deep_grey_to_rgb(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _deep_grey_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float greys to 8 bits (PIL's own convert clips them).

    Values within 0..65535 are 16-bit samples (PIL opens 16-bit PGM and some TIFFs as ``I``) and
    map linearly so that 65535 is 255. Floats and integers outside that range have no fixed
    white point and are stretched from their minimum to their maximum.
    """
    values = np.asarray(image)
    if image.mode != "F" and values.min() >= 0 and values.max() <= 65535:
        grey = ((values.astype(np.int32) + 128) // 257).astype(np.uint8)
    else:
        grey = _stretch(values.astype(np.float64))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey[values == transparent] = 255
    return Image.fromarray(grey).convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    span = high - low if high > low else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.round((values - low) * (255.0 / span))
    return np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255).astype(np.uint8)


def encode_rgb(rgb: Image.Image, source_format: str | None, icc: bytes | None = None) -> bytes:
    """Encode an RGB image the way checked images are kept: JPEG (quality 95, 4:4:4) when its
    source was JPEG, else lossless PNG; no metadata but ``icc``, so the same pixels always give
    the same bytes."""
    # save() falls back to image.info for comments, ICC profiles and transparency: clear it so
    # that only what is passed here is written.
    rgb.info = {}
    buf = io.BytesIO()
    if source_format in _JPEG_SOURCES:
        rgb.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0, icc_profile=icc)
    else:
        rgb.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL, icc_profile=icc)
    return buf.getvalue()


def _decode_failure(data: bytes, exc: Exception, detail: dict) -> Verdict:
    """``truncated`` when the data visibly ends early, else ``decode_error``."""
    text = _error_text(exc)
    # PIL reports early ends as OSError "image file is truncated ..." or "Truncated File Read";
    # its WebP decoder only says "could not create decoder object", so the RIFF length decides.
    riff_short = data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 > len(data)
    if isinstance(exc, EOFError) or "truncated" in text.lower() or riff_short:
        return Verdict.drop("truncated", **detail, error=text)
    return Verdict.drop("decode_error", **detail, error=text)


def _declared_header(data: bytes) -> dict:
    """Format, mode and size declared by an image ``Image.open`` refused as a decompression bomb.

    ``Image.open`` raises before handing the image back, so the header is parsed again by the
    plugin that claims it (the same plugin lookup ``Image.open`` does); this reads the header
    only and never allocates pixels. Empty when no plugin reads it.
    """
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        claimed = accept(prefix) if accept else True
        if claimed and not isinstance(claimed, str):
            try:
                header = factory(io.BytesIO(data), "")
            except Exception:
                continue
            width, height = header.size
            return {"format": header.format, "mode": header.mode, "width": width, "height": height}
    return {}


def _error_text(exc: BaseException) -> str:
    # PIL's messages can embed the BytesIO object's address; drop it to keep rejections stable.
    return f"{type(exc).__name__}: {_ADDRESS.sub('', str(exc))}"
