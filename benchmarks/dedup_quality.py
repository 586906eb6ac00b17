"""Dedup and decontamination quality on planted copies and distinct look-alikes.

Built at run time from the bundled flags (examples/data/flags):

- **copies**: every decodable flag copied ``--copies`` times, each by one transform with
  random strength: JPEG quality 40..90, resize to 40..100%, crop of up to 3% per side, padding
  of 2..6% in white, black or grey, a format change (WebP, GIF, BMP), brightness x0.9..1.1;
- **look-alikes**: distinct pictures that must all be kept: bundled pairs (Chad / Romania,
  Mali / Senegal, Ireland / Cote d'Ivoire, Monaco / Poland, ...) and drawn ones (a bicolour in
  2:3 and 4:5, tricolours one shade apart, a field with and without a small star or emblem).

Dedup runs on originals, look-alikes and copies together (copies sort last, so each should
name its original's family as twin). Printed: recall on copies (dropped / planted), the
look-alikes dropped, and the originals dropped as duplicates of each other (the bundle's own
copies: listed, to be checked by eye). Decontamination indexes a copy of every second original
as the benchmark and checks every kept original: recall (originals of benchmark images
dropped) and distinct originals dropped.

    python benchmarks/dedup_quality.py [--copies 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from groundforge.filters.decontaminate import BenchmarkIndex, check_contamination
from groundforge.filters.dedup import (
    DEFAULT_SETTINGS,
    find_duplicates,
    pixel_check,
    signature_of,
)
from groundforge.filters.image import check_image
from groundforge.filters.sameimage import look_of
from groundforge.schemas.records import ImageRecord, sha256_hex

FLAGS = Path(__file__).resolve().parents[1] / "examples" / "data" / "flags"
BUNDLED_PAIRS = [
    ("africa/chad.png", "europe/romania.png"),
    ("africa/mali.png", "africa/senegal.png"),
    ("europe/ireland.png", "africa/cote_divoire.png"),
    ("europe/monaco.png", "europe/poland.png"),
]


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def copy_of(rgb: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    """One planted copy: a transform picked at random, at a random strength."""
    w, h = rgb.size
    kind = rng.choice(["jpeg", "resize", "crop", "pad", "format", "brightness"])
    if kind == "jpeg":
        return kind, encode(rgb, "JPEG", quality=rng.randint(40, 90))
    if kind == "resize":
        # Never below the pipeline's 16-pixel minimum side, and never out of proportion.
        f = max(rng.uniform(0.4, 1.0), min(1.0, 16 / min(w, h)))
        small = rgb.resize((round(w * f), round(h * f)), Image.LANCZOS)
        return kind, encode(small, "JPEG", quality=85)
    if kind == "crop":
        c = [rng.uniform(0, 0.03) for _ in range(4)]
        box = (round(c[0] * w), round(c[1] * h), w - round(c[2] * w), h - round(c[3] * h))
        return kind, encode(rgb.crop(box))
    if kind == "pad":
        p = round(rng.uniform(0.02, 0.06) * max(w, h))
        colour = rng.choice([(255, 255, 255), (0, 0, 0), (128, 128, 128)])
        canvas = Image.new("RGB", (w + 2 * p, h + 2 * p), colour)
        canvas.paste(rgb, (p, p))
        return kind, encode(canvas, "JPEG", quality=85)
    if kind == "format":
        fmt = rng.choice(["WEBP", "GIF", "BMP"])
        return kind, encode(rgb, fmt, **({"quality": 80} if fmt == "WEBP" else {}))
    factor = rng.uniform(0.9, 1.1)
    return kind, encode(ImageEnhance.Brightness(rgb).enhance(factor), "JPEG", quality=90)


def drawn_lookalikes() -> dict[str, bytes]:
    """Distinct pictures that differ by one thing: aspect, one shade, one small emblem."""
    out = {}
    for name, size in (("bicolour-2x3", (300, 200)), ("bicolour-4x5", (250, 200))):
        im = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(im).rectangle((0, 0, size[0], size[1] // 2), fill=(0, 56, 147))
        out[name] = encode(im)
    shades = {"tricolour-a": (0, 38, 100), "tricolour-b": (0, 43, 127)}
    for name, blue in shades.items():
        im = Image.new("RGB", (300, 200))
        draw = ImageDraw.Draw(im)
        for i, colour in enumerate([blue, (254, 203, 0), (198, 12, 48)]):
            draw.rectangle((i * 100, 0, (i + 1) * 100, 200), fill=colour)
        out[name] = encode(im)
    for name, emblem in (("field", None), ("field-star", "star"), ("field-disc", "disc")):
        im = Image.new("RGB", (300, 200), (0, 122, 61))
        draw = ImageDraw.Draw(im)
        if emblem == "star":
            draw.polygon(
                [
                    (150, 82),
                    (156, 96),
                    (171, 96),
                    (159, 105),
                    (164, 119),
                    (150, 110),
                    (136, 119),
                    (141, 105),
                    (129, 96),
                    (144, 96),
                ],
                fill=(252, 209, 22),
            )
        elif emblem == "disc":
            draw.ellipse((138, 88, 162, 112), fill=(252, 209, 22))
        out[name] = encode(im)
    return out


def record(key: str, data: bytes) -> ImageRecord:
    verdict = check_image(ImageRecord(sha256_hex(data), data, 0, 0, "bench", location=key))
    if not verdict.keep:
        raise ValueError(f"{key}: {verdict.reason}")
    return verdict.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=6, help="planted copies per flag")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    originals: dict[str, ImageRecord] = {}
    for path in sorted(FLAGS.rglob("*")):
        if not path.is_file():
            continue
        key = f"a/{path.relative_to(FLAGS).as_posix()}"
        try:
            originals[key] = record(key, path.read_bytes())
        except ValueError:
            continue  # the bundle holds some broken files on purpose
    alikes = {
        f"a/drawn/{n}.png": record(f"a/drawn/{n}.png", d) for n, d in drawn_lookalikes().items()
    }
    lookalike_keys = set(alikes) | {f"a/{p}" for pair in BUNDLED_PAIRS for p in pair}
    copies: dict[str, tuple[str, ImageRecord]] = {}
    for key, rec in originals.items():
        rgb = Image.open(io.BytesIO(rec.image)).convert("RGB")
        for i in range(args.copies):
            kind, data = copy_of(rgb, rng)
            copy_key = f"z/{key[2:]}/{i}-{kind}"
            copies[copy_key] = (key, record(copy_key, data))
    everything = {**originals, **alikes, **{k: r for k, (_, r) in copies.items()}}
    print(
        f"{len(originals)} bundled flags, {len(alikes)} drawn look-alikes, "
        f"{len(copies)} planted copies",
        flush=True,
    )

    looks: dict[str, object] = {}

    def look(key):
        if key not in looks:
            looks[key] = look_of(everything[key].image)
        return looks[key]

    verify = pixel_check(look)
    start = time.perf_counter()
    sigs = [signature_of(r) for r in everything.values()]
    found = find_duplicates(sigs, DEFAULT_SETTINGS, verify)
    seconds = time.perf_counter() - start
    missed = [k for k in copies if k not in found]
    by_kind: dict[str, list[str]] = {}
    for k in missed:
        by_kind.setdefault(k.rsplit("-", 1)[1], []).append(k)
    dropped_alikes = sorted(k for k in lookalike_keys if k in found)
    dropped_originals = sorted(k for k in originals if k in found and k not in lookalike_keys)
    print(f"\ndedup ({seconds:.0f} s)")
    print(
        f"  recall on planted copies: {1 - len(missed) / len(copies):.4f} "
        f"({len(copies) - len(missed)} of {len(copies)})"
    )
    for kind, keys in sorted(by_kind.items()):
        print(f"    missed {kind}: {len(keys)} (e.g. {keys[0]})")
    print(
        f"  distinct look-alikes dropped: {len(dropped_alikes)} of {len(lookalike_keys)}"
        + (f": {dropped_alikes}" if dropped_alikes else "")
    )
    print(f"  bundled originals dropped as duplicates of other originals: {len(dropped_originals)}")
    for k in dropped_originals:
        print(f"    {k} -> {found[k].kept_key} ({found[k].kind})")

    # Decontamination: a copy of every second kept original is the benchmark; the others must stay.
    kept = [k for k in sorted(originals) if k not in found]
    bench_sources = kept[::2]
    bench = {
        f"bench/{i}": copy_of(Image.open(io.BytesIO(originals[k].image)).convert("RGB"), rng)[1]
        for i, k in enumerate(bench_sources)
    }
    bench_alikes = [f"a/{a}" for a, _ in BUNDLED_PAIRS] + [
        "a/drawn/tricolour-a.png",
        "a/drawn/field.png",
    ]
    for i, key in enumerate(bench_alikes):
        bench[f"bench/alike-{i}"] = encode(
            Image.open(io.BytesIO(everything[key].image)).convert("RGB"), "JPEG", quality=85
        )
    start = time.perf_counter()
    index = BenchmarkIndex.from_images(list(bench), list(bench.values()))
    training = kept + sorted(alikes)
    verdicts = {k: check_contamination(everything[k], index) for k in training}
    seconds = time.perf_counter() - start
    expected = (set(bench_sources) | set(bench_alikes)) & set(training)
    caught = [k for k in expected if not verdicts[k].keep]
    wrong = sorted(k for k in training if not verdicts[k].keep and k not in expected)
    print(f"\ndecontamination ({seconds:.0f} s, {len(bench)} benchmark images)")
    print(
        f"  recall on benchmark copies: {len(caught) / len(expected):.4f} "
        f"({len(caught)} of {len(expected)})"
    )
    missed = sorted(expected - set(caught))
    if missed:
        print(f"    missed: {missed}")
    print(
        f"  distinct images dropped: {len(wrong)} of {len(training) - len(expected)}"
        + (f": {wrong}" if wrong else "")
    )


if __name__ == "__main__":
    main()
