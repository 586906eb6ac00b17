"""Run-wide duplicates: exact copies, perceptual near-copies, embedding near-copies."""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundforge.filters.dedup import (
    DEFAULT_SETTINGS,
    BandEntry,
    DedupSettings,
    Duplicate,
    Signature,
    band_entries,
    best_candidates,
    chunk_pairs,
    colour_thumbnail,
    confirm_duplicate,
    dedup_verdict,
    embedding_bands,
    exact_findings,
    find_duplicates,
    first_verified,
    group_findings,
    layout_vector,
    perceptual_hash,
    phash_band_layout,
    phash_bands,
    pixel_check,
    signature_of,
    simhash_parameters,
    simhash_recall,
    split,
)
from groundforge.filters.sameimage import DEFAULT_SAME, look_of
from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import ImageRecord, sha256_hex

W, H = 240, 160

# Vertical tricolours keep their pHash under re-encoding; horizontal bands (and vertical
# gradients) do not: most of their low DCT coefficients are zero, and JPEG noise flips the sign of
# those against the median. Those are compared as distinct images only.
VERTICAL = {
    "belgium": [(0, 0, 0), (253, 218, 36), (239, 51, 64)],
    "chad": [(0, 38, 100), (254, 203, 0), (198, 12, 48)],
    "france": [(0, 35, 149), (255, 255, 255), (237, 41, 57)],
    "ireland": [(22, 155, 98), (255, 255, 255), (255, 136, 62)],
    "italy": [(0, 146, 70), (255, 255, 255), (206, 43, 55)],
    "mali": [(20, 181, 58), (252, 209, 22), (206, 17, 38)],
    "romania": [(0, 43, 127), (252, 209, 22), (206, 17, 38)],
}
HORIZONTAL = {
    "germany": [(0, 0, 0), (221, 0, 0), (255, 206, 0)],
    "hungary": [(205, 42, 62), (255, 255, 255), (67, 111, 77)],
    "netherlands": [(174, 28, 40), (255, 255, 255), (33, 70, 139)],
    "russia": [(255, 255, 255), (0, 57, 166), (213, 43, 30)],
}


def tricolour(colours, vertical: bool = True) -> Image.Image:
    image = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(colours):
        if vertical:
            draw.rectangle((i * W // 3, 0, (i + 1) * W // 3, H), fill=colour)
        else:
            draw.rectangle((0, i * H // 3, W, (i + 1) * H // 3), fill=colour)
    return image


def gradient(start, end) -> Image.Image:
    t = np.linspace(0.0, 1.0, W)[None, :, None]
    pixels = np.array(start) * (1 - t) + np.array(end) * t
    return Image.fromarray(np.repeat(pixels, H, axis=0).astype(np.uint8))


def shapes(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (W, H), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, W - 40)), int(rng.integers(0, H - 40))
        box = (x, y, x + int(rng.integers(20, 120)), y + int(rng.integers(20, 100)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    return image


def photo(seed: int) -> Image.Image:
    """Smooth colour fields with fine grain: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((W, H), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-20, 20, (H, W, 3))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def stable_images() -> dict[str, Image.Image]:
    """Distinct images whose pHash survives re-encoding and small resizes."""
    images = {name: tricolour(colours) for name, colours in VERTICAL.items()}
    images["gradient-grey"] = gradient((0, 0, 0), (255, 255, 255))
    images["gradient-red-blue"] = gradient((255, 0, 0), (0, 0, 255))
    images.update({f"shapes-{i}": shapes(i) for i in range(4)})
    images.update({f"photo-{i}": photo(i) for i in range(4)})
    return images


def distinct_images() -> dict[str, Image.Image]:
    images = stable_images()
    images.update({name: tricolour(c, vertical=False) for name, c in HORIZONTAL.items()})
    return images


def derived(image: Image.Image) -> dict[str, bytes]:
    """Near-copies a crawl would meet: re-encodes, a 0.9x resize, PNG to JPEG."""
    small = image.resize((round(W * 0.9), round(H * 0.9)), Image.Resampling.LANCZOS)
    return {
        "jpeg70.jpg": encode(image, "JPEG", 70),
        "jpeg90.jpg": encode(image, "JPEG", 90),
        "resized.png": encode(small),
        "resized.jpg": encode(small, "JPEG", 85),
    }


FLAGS = Path(__file__).resolve().parents[1] / "examples" / "data" / "flags"


def record(key: str, data: bytes, embedding=None) -> ImageRecord:
    width, height = Image.open(io.BytesIO(data)).size
    return ImageRecord(
        sha256_hex(data), data, width, height, "test", location=key, embedding=embedding
    )


def by_pixels(data_of: dict[str, bytes]):
    """``verify`` for :func:`find_duplicates` over images held by key (looks made once)."""
    looks: dict[str, object] = {}

    def look(key: str):
        if key not in looks:
            looks[key] = look_of(data_of[key])
        return looks[key]

    return pixel_check(look)


def sig(key: str, phash: int = 0, embedding=None, item_id: str | None = None) -> Signature:
    return Signature(key, item_id or f"id-{key}", phash, embedding)


# Hashes at least 32 bits apart from each other.
FAR = (0, 0xFFFFFFFF00000000, 0x00000000FFFFFFFF, 0xFFFF0000FFFF0000, 0x0000FFFF0000FFFF)


def unit(angle: float) -> tuple[float, float]:
    return (math.cos(angle), math.sin(angle))


# -- hashes and signatures ---------------------------------------------------------------------


def test_perceptual_hash_is_imagehash_phash_as_a_64_bit_int():
    image = tricolour(VERTICAL["france"])
    value = perceptual_hash(encode(image))
    assert isinstance(value, int) and 0 <= value < 1 << 64
    assert f"{value:016x}" == str(imagehash.phash(image))
    # The hash depends on the pixels, not on how they were stored.
    assert perceptual_hash(encode(image, "BMP")) == value
    assert perceptual_hash(encode(image.convert("P"))) == perceptual_hash(
        encode(image.convert("P").convert("RGB"))
    )


def test_colour_thumbnail_is_the_4x4_mean_colour():
    assert colour_thumbnail(encode(Image.new("RGB", (40, 20), (255, 0, 7)))) == bytes(
        [255, 0, 7] * 16
    )
    halves = Image.new("RGB", (40, 40), (0, 0, 0))
    halves.paste((200, 100, 50), (20, 0, 40, 40))
    assert colour_thumbnail(encode(halves)) == bytes(([0, 0, 0] * 2 + [200, 100, 50] * 2) * 4)


def test_signature_of_keys_by_location_then_image_id():
    data = encode(photo(0))
    with_location = record("web/a.png", data, embedding=(1.0, 0.0))
    s = signature_of(with_location)
    assert s == Signature(
        "web/a.png", sha256_hex(data), perceptual_hash(data), (1.0, 0.0), colour_thumbnail(data)
    )
    no_location = ImageRecord(sha256_hex(data), data, W, H, "test")
    assert signature_of(no_location).key == sha256_hex(data)


# -- images --------------------------------------------------------------------------------------


def test_copies_are_dropped_naming_their_original():
    originals, copies = {}, {}
    for name, image in stable_images().items():
        data = encode(image)
        originals[f"a/{name}.png"] = data
        copies[f"b/{name}/exact.png"] = (f"a/{name}.png", data)
        for variant, copy in derived(image).items():
            copies[f"b/{name}/{variant}"] = (f"a/{name}.png", copy)
    sigs = [signature_of(record(k, d)) for k, d in originals.items()]
    sigs += [signature_of(record(k, d)) for k, (_, d) in copies.items()]

    data_of = {**originals, **{k: d for k, (_, d) in copies.items()}}
    dups = find_duplicates(sigs, verify=by_pixels(data_of))

    assert set(dups) == set(copies)
    hashes = {s.key: [s.phash, *(h for h, _ in s.views)] for s in sigs}

    def bits(a: str, b: str) -> int:
        # The nearest of the two images' views (without their frames, and whole).
        return min(bin(x ^ y).count("1") for x in hashes[a] for y in hashes[b])

    for key, (original, _) in copies.items():
        dup = dups[key]
        if key.endswith("/exact.png"):
            assert dup == Duplicate("exact", sha256_hex(originals[original]), original, 0.0)
            continue
        # The twin is the nearest earlier image of the same picture (the original, or a copy
        # sorting before this one), and the reported distance is the true one.
        family = [original] + [k for k, (o, _) in copies.items() if o == original and k < key]
        assert dup.kept_key in family
        assert dup.kept_id == sha256_hex(data_of[dup.kept_key])
        if dup.kind == "perceptual":
            assert dup.distance == bits(key, dup.kept_key) <= 4
            assert dup.distance <= min(bits(key, k) for k in family)
        else:
            assert dup.kind == "layout" and bits(key, dup.kept_key) > 4


def test_distinct_images_are_all_kept():
    images = distinct_images()
    assert len(images) == 21
    data_of = {f"{name}.png": encode(im) for name, im in images.items()}
    sigs = [signature_of(record(k, d)) for k, d in data_of.items()]
    assert find_duplicates(sigs, verify=by_pixels(data_of)) == {}
    # Hashes and layouts alone would merge some of them: the pixels decide.
    assert find_duplicates(sigs) != {}


def test_phash_is_colour_blind_and_the_pixels_tell_flags_apart():
    data_of = {n: encode(tricolour(VERTICAL[n])) for n in ("france", "ireland")}
    france, ireland = (signature_of(record(n, d)) for n, d in data_of.items())
    assert france.phash == ireland.phash

    assert find_duplicates([france, ireland], verify=by_pixels(data_of)) == {}
    unverified = find_duplicates([france, ireland])
    assert unverified == {"ireland": Duplicate("perceptual", france.item_id, "france", 0.0)}
    # The thumbnail check, where wanted, screens candidates before the pixels are compared.
    assert find_duplicates([france, ireland], DedupSettings(max_colour_difference=16)) == {}


def test_chad_and_romania_differ_by_one_shade_of_blue_and_are_both_kept():
    data_of = {n: encode(tricolour(VERTICAL[n])) for n in ("chad", "romania")}
    chad, romania = (signature_of(record(n, d)) for n, d in data_of.items())
    assert bin(chad.phash ^ romania.phash).count("1") <= 4
    assert find_duplicates([chad, romania], verify=by_pixels(data_of)) == {}
    assert find_duplicates([chad, romania])["romania"].kept_key == "chad"


# -- the rule ----------------------------------------------------------------------------------


def test_the_first_in_key_order_is_kept_whatever_the_input_order():
    data = {name: encode(image) for name, image in stable_images().items()}
    data_of = {f"z/{name}.png": d for name, d in data.items()}
    data_of.update(
        {f"m/{n}.jpg": encode(Image.open(io.BytesIO(d)), "JPEG", 70) for n, d in data.items()}
    )
    sigs = [signature_of(record(k, d)) for k, d in data_of.items()]
    verify = by_pixels(data_of)
    expected = find_duplicates(sigs, verify=verify)
    # "m/" sorts before "z/": the JPEG copies are kept and the PNG originals dropped.
    assert set(expected) == {f"z/{name}.png" for name in data}
    assert {d.kept_key for d in expected.values()} == {f"m/{name}.jpg" for name in data}
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(sigs)
        assert find_duplicates(sigs, verify=verify) == expected


def test_a_chain_drops_every_item_with_an_earlier_match():
    # B is 4 bits from A, C 4 bits from B and 8 from A: C still has an earlier match (B).
    sigs = [sig("a", 0x0), sig("b", 0xF), sig("c", 0xFF)]
    assert find_duplicates(sigs) == {
        "b": Duplicate("perceptual", "id-a", "a", 4.0),
        "c": Duplicate("perceptual", "id-b", "b", 4.0),
    }

    step = math.acos(0.98)
    sigs = [sig(k, FAR[i], unit(i * step)) for i, k in enumerate("abcd")]
    dups = find_duplicates(sigs)
    # Each item is too far from all but its neighbours, and names the earlier one.
    assert set(dups) == {"b", "c", "d"}
    assert [dups[k].kept_key for k in "bcd"] == ["a", "b", "c"]
    assert dups["b"].distance == pytest.approx(0.02, abs=1e-12)
    # So no two kept items ever match: here only the first is kept.
    kept = [s for s in sigs if s.key not in dups]
    assert [s.key for s in kept] == ["a"]


@pytest.mark.parametrize("max_hamming", [0, 4, 6])
def test_hamming_threshold_is_inclusive(max_hamming):
    at = (1 << max_hamming) - 1  # max_hamming bits set
    beyond = ((1 << (max_hamming + 1)) - 1) << 30  # max_hamming + 1 bits, far from `at`
    settings = DedupSettings(max_hamming=max_hamming)
    sigs = [sig("a", 0), sig("b", at), sig("c", beyond)]
    assert find_duplicates(sigs, settings) == {
        "b": Duplicate("perceptual", "id-a", "a", float(max_hamming))
    }


def test_cosine_threshold_is_inclusive_to_the_last_bit():
    below = 0.97 - 1e-12
    sigs = [
        sig("a", FAR[0], (1.0, 0.0, 0.0)),
        sig("b", FAR[1], (0.97, math.sqrt(1 - 0.97**2), 0.0)),
        sig("c", FAR[2], (below, 0.0, math.sqrt(1 - below**2))),
    ]
    assert find_duplicates(sigs) == {"b": Duplicate("embedding", "id-a", "a", 1.0 - 0.97)}
    looser = find_duplicates(sigs, DedupSettings(min_cosine=0.969))
    assert set(looser) == {"b", "c"}


def test_kinds_rank_exact_then_perceptual_then_embedding():
    e = (1.0, 0.0)
    sigs = [
        sig("a", FAR[0], e),  # x's embedding twin
        sig("b", FAR[1], (0.0, 1.0)),  # x's perceptual twin
        sig("c", FAR[2], (-1.0, 0.0), item_id="same-bytes"),  # x's exact twin
        sig("x", FAR[1] ^ 0x1, e, item_id="same-bytes"),
    ]
    assert find_duplicates(sigs)["x"] == Duplicate("exact", "same-bytes", "c", 0.0)
    no_exact = find_duplicates(sigs, DedupSettings(exact=False))
    assert no_exact["x"] == Duplicate("perceptual", "id-b", "b", 1.0)
    embedding_only = DedupSettings(exact=False, perceptual=False)
    assert find_duplicates(sigs, embedding_only)["x"] == Duplicate("embedding", "id-a", "a", 0.0)


def test_a_duplicate_names_the_nearest_kept_item_then_the_earliest():
    # a and b are 5 bits apart, so both are kept; x is 3 bits from a and 2 from b.
    sigs = [sig("a", 0b111 << 40), sig("b", 0b11 << 20), sig("x", 0)]
    assert find_duplicates(sigs)["x"] == Duplicate("perceptual", "id-b", "b", 2.0)
    tied = [sig("a", 0b111 << 40), sig("b", 0b111 << 20), sig("x", 0)]
    assert find_duplicates(tied)["x"].kept_key == "a"


def test_many_items_with_one_hash_all_name_the_first():
    sigs = [sig(f"{i:03d}", 12345) for i in range(50)]
    dups = find_duplicates(sigs)
    assert set(dups) == {f"{i:03d}" for i in range(1, 50)}
    assert {d.kept_key for d in dups.values()} == {"000"}


def test_items_without_embeddings_are_only_compared_by_hash():
    sigs = [sig("a", FAR[0], (1.0, 0.0)), sig("b", FAR[1]), sig("c", FAR[2], (1.0, 0.0))]
    assert find_duplicates(sigs) == {"c": Duplicate("embedding", "id-a", "a", 0.0)}


def test_near_copies_are_only_matched_within_a_scope():
    data = encode(tricolour(VERTICAL["chad"]))
    copy = encode(tricolour(VERTICAL["chad"]), "JPEG", 70)
    chad = ImageRecord(sha256_hex(data), data, W, H, "flag", entity="Chad", location="a.png")
    same_bytes = ImageRecord(sha256_hex(data), data, W, H, "flag", entity="Romania", location="b")
    jpeg = ImageRecord(sha256_hex(copy), copy, W, H, "flag", entity="Romania", location="c.jpg")
    entity = [signature_of(r, scope="entity") for r in (chad, same_bytes, jpeg)]
    assert [s.scope for s in entity] == ["Chad", "Romania", "Romania"]
    # Exact copies are found across entities; near-copies only within one: the JPEG names the
    # Romania copy (a duplicate itself), never the Chad original.
    # Each names its twin's entity, for the alias table.
    assert find_duplicates(entity) == {
        "b": Duplicate("exact", chad.image_id, "a.png", 0.0, kept_entity="Chad"),
        "c.jpg": Duplicate("perceptual", chad.image_id, "b", 0.0, kept_entity="Romania"),
    }
    no_exact = find_duplicates(entity, DedupSettings(exact=False))
    assert no_exact == {
        "c.jpg": Duplicate("perceptual", chad.image_id, "b", 0.0, kept_entity="Romania")
    }
    everywhere = find_duplicates([signature_of(r) for r in (chad, same_bytes, jpeg)])
    assert set(everywhere) == {"b", "c.jpg"}
    assert everywhere["c.jpg"].kind == "perceptual"
    scoped = [Signature(k, k, FAR[0], (1.0, 0.0), scope=k[0]) for k in ("a1", "a2", "b1")]
    assert find_duplicates(scoped) == {"a2": Duplicate("perceptual", "a1", "a1", 0.0)}
    with pytest.raises(ValueError, match="scope"):
        signature_of(chad, scope="domain")


def test_zero_embeddings_match_nothing():
    sigs = [
        sig("a", FAR[0], (0.0, 0.0)),
        sig("b", FAR[1], (0.0, 0.0)),
        sig("c", FAR[2], (1.0, 0.0)),
    ]
    assert find_duplicates(sigs, DedupSettings(min_cosine=-1.0)) == {}


def test_kinds_can_be_switched_off():
    sigs = [sig("a", 0, (1.0, 0.0), item_id="x"), sig("b", 0, (1.0, 0.0), item_id="x")]
    off = DedupSettings(exact=False, perceptual=False, layout=False, embedding=False)
    assert find_duplicates(sigs, off) == {}
    assert find_duplicates([]) == {}


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="'a' appears twice"):
        find_duplicates([sig("a"), sig("a", 1)])
    with pytest.raises(ValueError, match="L2-normalised"):
        find_duplicates([sig("a", 0, (3.0, 4.0))])
    with pytest.raises(ValueError, match="64-bit"):
        find_duplicates([sig("a", 1 << 64)])
    with pytest.raises(ValueError, match="48 bytes"):
        find_duplicates([Signature("a", "a", 0, thumbnail=b"xy")])
    with pytest.raises(ValueError, match="max_hamming"):
        DedupSettings(max_hamming=65)
    with pytest.raises(ValueError, match="recall"):
        DedupSettings(recall=1.0)


def test_embeddings_of_different_lengths_are_never_compared():
    sigs = [sig("a", FAR[0], (1.0, 0.0)), sig("b", FAR[1], (1.0, 0.0, 0.0))]
    assert find_duplicates(sigs) == {}
    keys = {k for s in sigs for k, _ in band_entries(s) if k.startswith("embedding:0:")}
    assert {k.split(":")[2] for k in keys} == {"2", "3"}


# -- bands ---------------------------------------------------------------------------------------


def flipped(rng: np.random.Generator, code: int, bits: int) -> int:
    for b in rng.choice(64, bits, replace=False):
        code ^= 1 << int(b)
    return code


@pytest.mark.parametrize("max_hamming", [0, 1, 4, 6, 9, 64])
def test_every_pair_within_max_hamming_shares_a_band(max_hamming):
    layout = phash_band_layout(max_hamming)
    assert len(layout) == max_hamming + 1
    assert sum(width for _, width in layout) == 64
    assert max(w for _, w in layout) - min(w for _, w in layout) <= 1
    rng = np.random.default_rng(max_hamming)
    codes = [int(c) for c in rng.integers(0, 1 << 63, 3000, dtype=np.uint64) * 2 + 1]
    near = [flipped(rng, c, int(rng.integers(0, max_hamming + 1))) for c in codes]
    a = phash_bands(np.array(codes, dtype=np.uint64), max_hamming)
    b = phash_bands(np.array(near, dtype=np.uint64), max_hamming)
    assert (a == b).any(axis=1).all()
    if max_hamming < 64:
        # Tight: one flip in every band leaves no band shared.
        spread = [c ^ sum(1 << shift for shift, _ in layout) for c in codes]
        c = phash_bands(np.array(spread, dtype=np.uint64), max_hamming)
        assert not (a == c).any()


def test_band_keys_carry_the_scope_except_for_exact_copies():
    settings = DedupSettings(max_hamming=1)
    s = Signature("k", "id", 0xFFFF_0000_0000_0001, (0.6, 0.8), scope="Chad")
    keys = [k for k, _ in band_entries(s, settings)]
    bits, bands = simhash_parameters(0.97)
    assert len(keys) == 1 + 2 + bands
    assert keys[:3] == ["exact:id", "perceptual:0:ffff0000:Chad", "perceptual:1:1:Chad"]
    assert [k.split(":")[:3] for k in keys[3:]] == [
        ["embedding", str(b), "2"] for b in range(bands)
    ]
    assert all(k.endswith(":Chad") for k in keys[1:])
    entries = dict(band_entries(s, settings))
    # Each entry carries only what its kind compares.
    assert entries["exact:id"].signature.embedding is None
    assert entries["perceptual:1:1:Chad"].signature.embedding is None
    embedding = entries[keys[3]]
    assert embedding.signature.thumbnail == b"" and len(embedding.sketch) == bands
    blank = Signature("z", "z", 0, (0.0, 0.0))
    assert not [k for k, _ in band_entries(blank) if k.startswith("embedding")]
    off = DedupSettings(exact=False, perceptual=False, layout=False, embedding=False)
    assert band_entries(s, off) == []


def test_simhash_parameters_reach_the_recall_with_the_fewest_collisions():
    for min_cosine in (0.9, 0.95, 0.97, 0.99):
        bits, bands = simhash_parameters(min_cosine, 0.99, 48)
        assert 1 <= bands <= 48
        assert simhash_recall(min_cosine, bits, bands) >= 0.99
        # One more bit per band would need more bands than allowed.
        assert simhash_recall(min_cosine, bits + 1, 48) < 0.99
    assert simhash_parameters(0.97) == (29, 47)
    assert simhash_parameters(-1.0) == (0, 1)  # every pair matches: one band of everything
    assert simhash_parameters(1.0) == (64, 1)


def pairs_at(rng, n: int, dim: int, low: float, high: float):
    """``n`` pairs of unit vectors with cosines uniform in ``[low, high]``."""
    a = rng.standard_normal((n, dim))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    other = rng.standard_normal((n, dim))
    other -= np.einsum("ij,ij->i", other, a)[:, None] * a
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    cosines = rng.uniform(low, high, n)
    b = cosines[:, None] * a + np.sqrt(1 - cosines**2)[:, None] * other
    return a, b, np.einsum("ij,ij->i", a, b)


def test_planted_embedding_pairs_at_the_threshold_share_a_band():
    rng = np.random.default_rng(11)
    a, b, cosines = pairs_at(rng, 3000, 64, 0.970, 0.975)
    assert cosines.min() >= 0.97
    shared = (embedding_bands(a) == embedding_bands(b)).any(axis=1)
    assert shared.mean() >= 0.99
    # Random pairs almost never share a band (29 bits each).
    c, d, _ = pairs_at(rng, 3000, 64, -0.1, 0.1)
    assert (embedding_bands(c) == embedding_bands(d)).any(axis=1).sum() == 0
    # The same vector gets the same bands alone or among others (one BLAS call or many).
    alone = np.stack([embedding_bands(v[None])[0] for v in a[:50]])
    np.testing.assert_array_equal(alone, embedding_bands(a[:50]))


# -- the banded search against the rule, pair by pair ------------------------------------------


def rank(d: Duplicate):
    return ("exact", "perceptual", "layout", "embedding").index(d.kind), d.distance, d.kept_key


def brute_force(sigs: list[Signature], settings: DedupSettings) -> dict[str, Duplicate]:
    """The rule, literally: every item against every earlier one (one length of embedding)."""
    ordered = sorted(sigs, key=lambda s: s.key)
    ids = np.array([s.item_id for s in ordered])
    scopes = np.array([s.scope for s in ordered])
    codes = np.array([s.phash for s in ordered], dtype=np.uint64)
    has = np.array([len(s.thumbnail) == 48 for s in ordered])
    thumbs = np.array([np.frombuffer(s.thumbnail or bytes(48), np.uint8) for s in ordered], int)
    vectors = np.array([s.embedding for s in ordered], dtype=np.float64)
    blank = np.linalg.norm(vectors, axis=1) < 1e-6
    found = {}
    for j, later in enumerate(ordered):
        options = []
        same = scopes[:j] == later.scope
        if settings.exact and (ids[:j] == later.item_id).any():
            first = ordered[int(np.flatnonzero(ids[:j] == later.item_id)[0])]
            options.append(Duplicate("exact", first.item_id, first.key, 0.0))
        if settings.perceptual:
            bits = np.bitwise_count(codes[:j] ^ codes[j])
            ok = same & (bits <= settings.max_hamming)
            if settings.max_colour_difference is not None:
                diff = np.abs(thumbs[:j] - thumbs[j]).max(axis=1)
                ok &= (diff <= settings.max_colour_difference) | ~has[:j] | ~has[j]
            for i in np.flatnonzero(ok):
                options.append(Duplicate("perceptual", ids[i], ordered[i].key, float(bits[i])))
        if settings.embedding and not blank[j]:
            cosines = vectors[:j] @ vectors[j]
            ok = same & ~blank[:j] & (cosines >= settings.min_cosine)
            for i in np.flatnonzero(ok):
                twin = ordered[i]
                options.append(Duplicate("embedding", twin.item_id, twin.key, 1 - cosines[i]))
        if options:
            found[later.key] = min(options, key=rank)
    return found


def planted(n: int, dim: int, seed: int, scopes: int = 1):
    """Random signatures, with 5% embedding near-copies (cosine 0.97 to 0.995), 5% hash
    near-copies (0 to 4 bits; half of them in other colours), 2% exact copies of other items,
    and a crowd of 40 items with one hash and one thumbnail."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    codes = [int(c) for c in rng.integers(0, 1 << 63, n, dtype=np.uint64) * 2]
    thumbs = [bytes(rng.integers(0, 256, 48, dtype=np.uint8)) for _ in range(n)]
    ids = [f"id{i}" for i in range(n)]
    perm = rng.permutation(n)
    k = n // 20
    for item, source in zip(perm[:k], perm[k : 2 * k], strict=True):
        a, b, _ = pairs_at(rng, 1, dim, 0.97, 0.995)
        vectors[source], vectors[item] = a[0], b[0]
    for item, source in zip(perm[2 * k : 3 * k], perm[3 * k : 4 * k], strict=True):
        codes[item] = flipped(rng, codes[source], int(rng.integers(0, 5)))
        # Half of them agree in colour (within 10), half do not (up to 30 apart).
        spread = 10 if rng.random() < 0.5 else 30
        jitter = rng.integers(-spread, spread + 1, 48)
        near = np.clip(np.frombuffer(thumbs[source], np.uint8) + jitter, 0, 255)
        thumbs[item] = near.astype(np.uint8).tobytes()
    for item, source in zip(perm[4 * k : 4 * k + n // 50], perm[-n // 50 :], strict=True):
        ids[item] = ids[source]
    for item in perm[-n // 50 - 40 : -n // 50]:
        codes[item], thumbs[item] = 0xABCDEF, thumbs[perm[-1]]
    return [
        Signature(
            f"k{i:05d}", ids[i], codes[i], tuple(vectors[i].tolist()), thumbs[i], f"s{i % scopes}"
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("scopes", [1, 3])
def test_the_banded_search_finds_exactly_what_all_pairs_finds_for_hashes(scopes):
    sigs = planted(900, 8, seed=scopes, scopes=scopes)
    hashes = DedupSettings(embedding=False, layout=False, max_colour_difference=16)
    truth = brute_force(sigs, hashes)
    # The crowd of 40 gives 39 (fewer when split by scope), the near-copies the rest.
    assert sum(d.kind == "perceptual" for d in truth.values()) >= (54 if scopes == 1 else 40)
    assert sum(d.kind == "exact" for d in truth.values()) >= 18
    assert find_duplicates(sigs, hashes) == truth
    # Small chunks split the crowd of 40 and the band groups; the answer stays.
    assert find_duplicates(sigs, replace(hashes, chunk_size=3)) == truth
    rng = random.Random(scopes)
    shuffled = list(sigs)
    rng.shuffle(shuffled)
    assert find_duplicates(shuffled, hashes) == truth


def test_the_banded_search_recalls_embedding_duplicates_and_reports_true_twins():
    sigs = planted(900, 32, seed=7)
    embeddings = DedupSettings(exact=False, perceptual=False, layout=False)
    truth = brute_force(sigs, embeddings)
    found = find_duplicates(sigs, embeddings)
    assert len(truth) >= 45
    assert len(set(found) & set(truth)) >= 0.99 * len(truth)
    assert set(found) <= set(truth)
    for key, dup in found.items():
        # The banded search may miss a twin, so it may name a farther one, never a false one.
        best = truth[key]
        assert dup.kind == best.kind == "embedding"
        assert dup.distance >= best.distance - 1e-12
        if dup.kept_key == best.kept_key:
            assert dup.distance == pytest.approx(best.distance, abs=1e-12)
        else:
            i, j = int(key[1:]), int(dup.kept_key[1:])
            assert 1 - np.dot(sigs[i].embedding, sigs[j].embedding) == pytest.approx(dup.distance)
    assert find_duplicates(sigs[::-1], replace(embeddings, chunk_size=2)) == found


# -- resolution and chunks -----------------------------------------------------------------------


def test_best_candidates_are_order_free_and_limited_per_kind():
    options = [
        Duplicate("embedding", "i1", "a", 0.0),
        Duplicate("perceptual", "i2", "c", 2.0),
        Duplicate("perceptual", "i3", "b", 2.0),
        Duplicate("perceptual", "i4", "a", 3.0),
        Duplicate("perceptual", "i6", "d", 4.0),
        Duplicate("perceptual", "i6", "d", 1.0),
        Duplicate("layout", "i2", "c", 0.01),
        Duplicate("layout", "i7", "e", 0.02),
    ]
    # One per (kind, twin) at its nearest, best first, at most ``limit`` of each kind: the
    # crowd of perceptual candidates leaves the layout ones their places.
    expected = (
        Duplicate("perceptual", "i6", "d", 1.0),
        Duplicate("perceptual", "i3", "b", 2.0),
        Duplicate("perceptual", "i2", "c", 2.0),
        Duplicate("layout", "i2", "c", 0.01),
        Duplicate("layout", "i7", "e", 0.02),
        Duplicate("embedding", "i1", "a", 0.0),
    )
    rng = random.Random(3)
    for _ in range(10):
        rng.shuffle(options)
        assert best_candidates([options], limit=3) == expected
        for cut in range(len(options)):
            halves = [best_candidates([options[:cut]], 3), best_candidates([options[cut:]], 3)]
            assert best_candidates(halves, limit=3) == expected
    with_exact = best_candidates([options, (Duplicate("exact", "i5", "z", 0.0),)], limit=2)
    assert [d.kind for d in with_exact] == [
        "exact",
        "perceptual",
        "perceptual",
        "layout",
        "layout",
        "embedding",
    ]


def test_a_twin_refused_once_is_not_compared_again():
    candidates = [
        Duplicate("perceptual", "i1", "a", 1.0),
        Duplicate("perceptual", "i2", "b", 2.0),
        Duplicate("layout", "i1", "a", 0.01),
        Duplicate("layout", "i3", "c", 0.02),
    ]
    asked = []

    def verify(dup):
        asked.append(dup.kept_key)
        return dup.kept_key == "c"

    assert first_verified(candidates, verify).kept_key == "c"
    assert asked == ["a", "b", "c"]


def test_the_first_candidate_the_pixels_confirm_is_the_twin():
    near = Duplicate("perceptual", "i1", "a", 1.0)
    far = Duplicate("layout", "i2", "b", 0.05)
    assert first_verified([near, far], lambda d: d.kept_key == "b") == far
    assert first_verified([near, far], lambda d: False) is None
    assert first_verified([near, far], None) == near
    exact = Duplicate("exact", "i3", "c", 0.0)
    assert first_verified([exact], lambda d: False) == exact


def test_exact_copies_are_matched_across_scopes_and_name_the_earliest():
    sigs = [
        Signature("c", "same", FAR[0], scope="Chad"),
        Signature("a", "same", FAR[1], scope="Romania"),
        Signature("b", "same", FAR[2], scope="Mali"),
        Signature("d", "other", FAR[0], scope="Chad"),
    ]
    assert find_duplicates(sigs) == {
        "b": Duplicate("exact", "same", "a", 0.0),
        "c": Duplicate("exact", "same", "a", 0.0),
        # A near-copy of "c" in its scope: named, although "c" is itself dropped.
        "d": Duplicate("perceptual", "same", "c", 0.0),
    }


def test_split_and_chunk_pairs_meet_every_pair_of_a_group_once():
    for count in range(1, 40):
        members = list(range(count))
        for size in (1, 2, 3, 7, 64):
            chunks = list(split(iter(members), size))
            assert [m for c in chunks for m in c] == members
            assert all(1 <= len(c) <= size for c in chunks)
            met = []
            for i, j in chunk_pairs(len(chunks)):
                if i == j:
                    met += [(a, b) for n, a in enumerate(chunks[i]) for b in chunks[i][n + 1 :]]
                else:
                    met += [(a, b) for a in chunks[i] for b in chunks[j]]
            assert sorted(met) == [(a, b) for a in members for b in members if a < b]


def test_a_huge_group_is_compared_in_bounded_chunks():
    # 1000 blank images: one hash, one thumbnail, distinct bytes; and a near-copy of a photo.
    blank = [Signature(f"blank/{i:04d}", f"b{i}", 0x5A5A, thumbnail=bytes(48)) for i in range(1000)]
    photo = [Signature("photo/a", "p1", FAR[1]), Signature("photo/b", "p2", FAR[1] ^ 0b101)]
    sigs = blank + photo
    settings = DedupSettings(chunk_size=50, layout=False)
    groups: dict[str, list[BandEntry]] = {}
    for s in sigs:
        for key, entry in band_entries(s, settings):
            groups.setdefault(key, []).append(entry)
    crowd = groups["perceptual:0:0:"]
    assert len(crowd) == 1000
    chunks = list(split(crowd, settings.chunk_size))
    assert max(len(c) for c in chunks) == 50 and len(chunk_pairs(len(chunks))) == 210
    expected = {
        **{
            f"blank/{i:04d}": Duplicate("perceptual", "b0", "blank/0000", 0.0)
            for i in range(1, 1000)
        },
        "photo/b": Duplicate("perceptual", "p1", "photo/a", 2.0),
    }
    assert find_duplicates(sigs, settings) == expected
    assert find_duplicates(sigs, replace(settings, chunk_size=5000)) == expected
    # The other bands of the crowd compare the same pairs again, and skip them all: a pair is
    # compared only in the first band it shares.
    assert list(group_findings(groups["perceptual:3:5:"], settings)) == []
    found = list(group_findings(crowd, settings))
    assert len(found) <= len(chunk_pairs(len(chunks))) * settings.chunk_size
    # An exact group is never paired up: one pass for its earliest key, one for the others.
    same = [BandEntry("exact", 0, Signature(f"{i:03d}", "x", 0)) for i in (5, 3, 9, 4)]
    assert dict(exact_findings(same)) == {
        f"{i:03d}": (Duplicate("exact", "x", "003", 0.0),) for i in (4, 5, 9)
    }


# -- verdicts ----------------------------------------------------------------------------------


def test_dedup_verdict_reasons_and_metrics():
    data = encode(photo(1))
    original, copy = record("a.png", data), record("b.png", data)
    dups = find_duplicates([signature_of(copy), signature_of(original)])
    assert set(dups) == {"b.png"}
    assert dedup_verdict(original, dups.get("a.png")) == Verdict.ok()
    assert dedup_verdict(copy, dups["b.png"]) == Verdict.drop(
        "duplicate_exact", kept_id=sha256_hex(data), kept_key="a.png", distance=0.0
    )
    for kind in ("perceptual", "embedding"):
        verdict = dedup_verdict(copy, Duplicate(kind, "k", "a.png", 0.25))
        assert (verdict.keep, verdict.reason) == (False, f"duplicate_{kind}")
        assert verdict.metrics == {"kept_id": "k", "kept_key": "a.png", "distance": 0.25}


def test_confirm_duplicate_names_the_first_twin_the_pixels_confirm():
    chad, romania = (encode(tricolour(VERTICAL[n])) for n in ("chad", "romania"))
    copy = record("z/romania.jpg", encode(tricolour(VERTICAL["romania"]), "JPEG", 70))
    looks = {"a/chad.png": look_of(chad), "a/romania.png": look_of(romania)}
    # Chad ranks first (nearer hash) and is refused by the pixels; Romania is confirmed.
    candidates = (
        Duplicate("perceptual", "id-chad", "a/chad.png", 1.0),
        Duplicate("perceptual", "id-rom", "a/romania.png", 2.0),
    )
    verdict = confirm_duplicate(copy, candidates, lambda d: looks[d.kept_key])
    assert verdict.reason == "duplicate_perceptual"
    assert verdict.metrics["kept_key"] == "a/romania.png"
    assert 0 <= verdict.metrics["block_difference"] <= DEFAULT_SAME.max_block_difference
    assert confirm_duplicate(copy, candidates[:1], lambda d: looks[d.kept_key]).keep
    # An exact copy is dropped without loading its twin.
    exact = (Duplicate("exact", "id-rom", "a/romania.png", 0.0),)
    unloadable = confirm_duplicate(copy, exact, lambda d: 1 / 0)
    assert unloadable.metrics == {"kept_id": "id-rom", "kept_key": "a/romania.png", "distance": 0.0}


def test_a_copy_that_lost_its_frames_is_found_through_the_whole_view():
    # Wyoming's flag has a red and a white border round a blue field: trimmed, it is the bison
    # emblem. A crop into the red border changes what trims (and every trimmed fingerprint),
    # but not the whole image's.
    data = (FLAGS / "america" / "united_states" / "usa_wyoming.png").read_bytes()
    original = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = original.size
    cropped = encode(original.crop((0, 0, w - 15, h - 15)))
    a, b = signature_of(record("a.png", data)), signature_of(record("b.png", cropped))
    assert a.views and b.views
    assert bin(a.phash ^ b.phash).count("1") > DEFAULT_SETTINGS.max_hamming
    assert layout_vector(a.thumbnail) @ layout_vector(b.thumbnail) < DEFAULT_SETTINGS.layout_cosine
    verify = by_pixels({"a.png": data, "b.png": cropped})
    assert find_duplicates([a, b], verify=verify)["b.png"].kept_key == "a.png"
    assert find_duplicates([replace(a, views=()), replace(b, views=())], verify=verify) == {}
