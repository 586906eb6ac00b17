"""Planted copies of bundled flags are found and distinct look-alikes kept (a small version of
benchmarks/dedup_quality.py): dedup and decontamination, with the pixels verifying."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageEnhance

from groundforge.filters.decontaminate import BenchmarkIndex, check_contamination
from groundforge.filters.dedup import find_duplicates, pixel_check, signature_of
from groundforge.filters.image import check_image
from groundforge.filters.sameimage import look_of
from groundforge.schemas.records import ImageRecord, sha256_hex

FLAGS = Path(__file__).resolve().parents[1] / "examples" / "data" / "flags"
# Look-alike pairs (one shade, one star, mirrored colours, same colours in another order) and
# flags with fine emblems.
NAMES = [
    "africa/chad.png",
    "europe/romania.png",
    "africa/mali.png",
    "africa/senegal.png",
    "europe/ireland.png",
    "africa/cote_divoire.png",
    "europe/monaco.png",
    "europe/poland.png",
    "america/el_salvador.png",
    "america/nicaragua.png",
    "africa/kenya.png",
    "europe/andorra.png",
    "europe/moldova.png",
]


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def copies(rgb: Image.Image) -> dict[str, bytes]:
    """Near-copies a crawl meets, at the strong end of each range."""
    w, h = rgb.size
    p = round(0.05 * max(w, h))
    padded = Image.new("RGB", (w + 2 * p, h + 2 * p), (0, 0, 0))
    padded.paste(rgb, (p, p))
    return {
        "jpeg40": encode(rgb, "JPEG", quality=40),
        "half": encode(rgb.resize((w // 2, h // 2), Image.LANCZOS), "JPEG", quality=85),
        "crop": encode(rgb.crop((round(0.03 * w), round(0.02 * h), w, h - round(0.03 * h)))),
        "pad": encode(padded, "JPEG", quality=85),
        "webp": encode(rgb, "WEBP", quality=80),
        "brighter": encode(ImageEnhance.Brightness(rgb).enhance(1.08), "JPEG", quality=90),
    }


def with_emblem(emblem: bool) -> bytes:
    im = Image.new("RGB", (300, 200), (0, 122, 61))
    if emblem:
        ImageDraw.Draw(im).ellipse((140, 90, 160, 110), fill=(252, 209, 22))
    return encode(im)


def record(key: str, data: bytes) -> ImageRecord:
    return check_image(ImageRecord(sha256_hex(data), data, 0, 0, "t", location=key)).value


@pytest.fixture(scope="module")
def planted():
    originals = {f"a/{n}": record(f"a/{n}", (FLAGS / n).read_bytes()) for n in NAMES}
    originals["a/field.png"] = record("a/field.png", with_emblem(False))
    originals["a/field-disc.png"] = record("a/field-disc.png", with_emblem(True))
    planted = {}
    for key, rec in list(originals.items())[: len(NAMES)]:
        rgb = Image.open(io.BytesIO(rec.image)).convert("RGB")
        for kind, data in copies(rgb).items():
            copy_key = f"z/{key[2:]}/{kind}"
            planted[copy_key] = (key, record(copy_key, data))
    return originals, planted


def test_dedup_drops_every_planted_copy_and_keeps_every_look_alike(planted):
    originals, copied = planted
    everything = {**originals, **{k: r for k, (_, r) in copied.items()}}
    looks = {k: look_of(r.image) for k, r in everything.items()}
    verify = pixel_check(looks.__getitem__)
    found = find_duplicates([signature_of(r) for r in everything.values()], verify=verify)
    assert set(found) == set(copied)
    for key, (original, _) in copied.items():
        # The twin shows the same flag: its original or an earlier copy of it.
        twin = found[key].kept_key
        assert twin == original or twin.startswith(f"z/{original[2:]}/"), (key, twin)


def test_decontamination_catches_benchmark_copies_and_keeps_their_look_alikes(planted):
    originals, copied = planted
    # The benchmark holds one copy of every other flag: Chad's, not Romania's, and so on.
    in_bench = [f"a/{n}" for n in NAMES[::2]] + ["a/field.png"]
    chosen = {k: r for k, (o, r) in copied.items() if o in in_bench and k.endswith("/half")}
    chosen["bench/field"] = record(
        "bench/field",
        encode(Image.open(io.BytesIO(originals["a/field.png"].image)), "JPEG", quality=70),
    )
    index = BenchmarkIndex.from_images(list(chosen), [r.image for r in chosen.values()])
    dropped = {k for k, r in originals.items() if not check_contamination(r, index).keep}
    assert dropped == set(in_bench)
