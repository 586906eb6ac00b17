"""Run-wide duplicates: exact copies, perceptual near-copies, embedding near-copies."""

from __future__ import annotations

import io
import math
import random

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundforge.filters.dedup import (
    DedupSettings,
    Duplicate,
    Signature,
    colour_thumbnail,
    cosine_pairs,
    dedup_verdict,
    find_duplicates,
    hamming_pairs,
    ivf_nlist,
    multihash_parameters,
    perceptual_hash,
    signature_of,
)
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


def record(key: str, data: bytes, embedding=None) -> ImageRecord:
    width, height = Image.open(io.BytesIO(data)).size
    return ImageRecord(
        sha256_hex(data), data, width, height, "test", location=key, embedding=embedding
    )


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

    dups = find_duplicates(sigs)

    assert set(dups) == set(copies)
    for key, (original, data) in copies.items():
        dup = dups[key]
        assert (dup.kept_key, dup.kept_id) == (original, sha256_hex(originals[original]))
        if key.endswith("/exact.png"):
            assert (dup.kind, dup.distance) == ("exact", 0.0)
        else:
            assert dup.kind == "perceptual"
            # The reported distance is the true one between the pair's hashes.
            true = bin(perceptual_hash(data) ^ perceptual_hash(originals[original])).count("1")
            assert dup.distance == true <= 4


def test_distinct_images_are_all_kept():
    images = distinct_images()
    assert len(images) == 21
    sigs = [signature_of(record(f"{name}.png", encode(im))) for name, im in images.items()]
    assert find_duplicates(sigs) == {}


def test_phash_is_colour_blind_and_the_thumbnail_check_tells_flags_apart():
    france = signature_of(record("france.png", encode(tricolour(VERTICAL["france"]))))
    ireland = signature_of(record("ireland.png", encode(tricolour(VERTICAL["ireland"]))))
    assert france.phash == ireland.phash

    assert find_duplicates([france, ireland]) == {}
    phash_only = find_duplicates([france, ireland], DedupSettings(max_colour_difference=None))
    assert phash_only == {"ireland.png": Duplicate("perceptual", france.item_id, "france.png", 0.0)}


def test_chad_and_romania_differ_by_one_shade_of_blue_and_are_both_kept():
    chad = signature_of(record("chad.png", encode(tricolour(VERTICAL["chad"]))))
    romania = signature_of(record("romania.png", encode(tricolour(VERTICAL["romania"]))))
    assert bin(chad.phash ^ romania.phash).count("1") <= 4
    assert find_duplicates([chad, romania]) == {}
    loose = find_duplicates([chad, romania], DedupSettings(max_colour_difference=40))
    assert loose["romania.png"].kept_key == "chad.png"


# -- the rule ----------------------------------------------------------------------------------


def test_the_first_in_key_order_is_kept_whatever_the_input_order():
    data = {name: encode(image) for name, image in stable_images().items()}
    sigs = [signature_of(record(f"z/{name}.png", d)) for name, d in data.items()]
    sigs += [
        signature_of(record(f"m/{name}.jpg", encode(Image.open(io.BytesIO(d)), "JPEG", 70)))
        for name, d in data.items()
    ]
    expected = find_duplicates(sigs)
    # "m/" sorts before "z/": the JPEG copies are kept and the PNG originals dropped.
    assert set(expected) == {f"z/{name}.png" for name in data}
    assert {d.kept_key for d in expected.values()} == {f"m/{name}.jpg" for name in data}
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(sigs)
        assert find_duplicates(sigs) == expected


def test_a_chain_keeps_both_ends():
    # B is 4 bits from A, C 4 bits from B and 8 from A.
    sigs = [sig("a", 0x0), sig("b", 0xF), sig("c", 0xFF)]
    assert find_duplicates(sigs) == {"b": Duplicate("perceptual", "id-a", "a", 4.0)}

    step = math.acos(0.98)
    sigs = [sig(k, FAR[i], unit(i * step)) for i, k in enumerate("abcd")]
    dups = find_duplicates(sigs)
    # C is too far from A and B was dropped, so C is kept, and D names C (not the dropped B).
    assert set(dups) == {"b", "d"}
    assert (dups["b"].kept_key, dups["d"].kept_key) == ("a", "c")
    assert dups["b"].distance == pytest.approx(0.02, abs=1e-12)


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
    # Exact copies are found across entities; near-copies only within one.
    assert find_duplicates(entity) == {
        "b": Duplicate("exact", chad.image_id, "a.png", 0.0),
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
    off = DedupSettings(exact=False, perceptual=False, embedding=False)
    assert find_duplicates(sigs, off) == {}
    assert find_duplicates([]) == {}


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="'a' appears twice"):
        find_duplicates([sig("a"), sig("a", 1)])
    with pytest.raises(ValueError, match="L2-normalised"):
        find_duplicates([sig("a", 0, (3.0, 4.0))])
    with pytest.raises(ValueError, match="differ in length"):
        find_duplicates([sig("a", 0, (1.0, 0.0)), sig("b", 1, (1.0, 0.0, 0.0))])
    with pytest.raises(ValueError, match="max_hamming"):
        DedupSettings(max_hamming=65)


# -- search ------------------------------------------------------------------------------------


def planted(n: int, dim: int, seed: int):
    """Random signatures, with 5% embedding near-copies (cosine about 0.99), 5% hash near-copies
    (1 to 4 bits) and 1% exact copies of earlier items."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim))
    codes = rng.integers(0, 1 << 63, n, dtype=np.uint64) * 2
    ids = [f"id{i}" for i in range(n)]
    perm = rng.permutation(n)
    k = n // 20
    near, copied, hashed, exact = perm[:k], perm[k : 2 * k], perm[2 * k : 3 * k], perm[-n // 100 :]
    noise = rng.standard_normal((k, dim)) * math.sqrt(1 / 0.99**2 - 1) / math.sqrt(dim)
    vectors[near] = vectors[copied] / np.linalg.norm(vectors[copied], axis=1)[:, None] + noise
    vectors /= np.linalg.norm(vectors, axis=1)[:, None]
    for item, source in zip(hashed, perm[3 * k : 4 * k], strict=True):
        flips = rng.choice(64, rng.integers(1, 5), replace=False)
        codes[item] = codes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    for item, source in zip(exact, perm[4 * k : 4 * k + len(exact)], strict=True):
        ids[item] = ids[source]
    sigs = [
        Signature(f"k{i:05d}", ids[i], int(codes[i]), tuple(vectors[i].tolist())) for i in range(n)
    ]
    pairs = {
        tuple(sorted((int(a), int(b))))
        for a, b in [
            *zip(near, copied, strict=True),
            *zip(hashed, perm[3 * k : 4 * k], strict=True),
        ]
    }
    return sigs, vectors, codes, pairs


def test_the_approximate_search_agrees_with_the_exact_one():
    sigs, vectors, codes, pairs = planted(3000, 48, seed=3)
    exact = find_duplicates(sigs)
    approximate = DedupSettings(exact_search_below=0)
    found = find_duplicates(sigs, approximate)

    # Every planted pair leaves one of its two items dropped.
    assert sum(f"k{a:05d}" in exact or f"k{b:05d}" in exact for a, b in pairs) == len(pairs)
    recalled = sum(f"k{a:05d}" in found or f"k{b:05d}" in found for a, b in pairs)
    assert recalled >= 0.95 * len(pairs)
    assert len(found) >= 0.95 * len(exact)
    by_key = {s.key: i for i, s in enumerate(sigs)}
    for key, dup in found.items():
        # Every drop names a kept item that really is its twin.
        assert dup.kept_key not in found
        i, j = by_key[key], by_key[dup.kept_key]
        assert sigs[j].item_id == dup.kept_id and j < i
        if dup.kind == "exact":
            assert sigs[i].item_id == sigs[j].item_id
        elif dup.kind == "perceptual":
            assert bin(int(codes[i]) ^ int(codes[j])).count("1") == dup.distance <= 4
        else:
            assert 1.0 - float(vectors[i] @ vectors[j]) == pytest.approx(dup.distance, abs=1e-12)
            assert dup.distance <= 1 - 0.97
    rng = random.Random(1)
    shuffled = list(sigs)
    rng.shuffle(shuffled)
    assert find_duplicates(shuffled, approximate) == found


@pytest.mark.parametrize("max_hamming", [0, 1, 4, 6, 9])
def test_multi_index_hashing_finds_exactly_the_brute_force_pairs(max_hamming):
    _, _, codes, _ = planted(4000, 4, seed=max_hamming)
    rng = np.random.default_rng(max_hamming)
    # Crowd one bucket: codes equal on their first 32 bits.
    codes[:300] = (codes[:300] & np.uint64(0xFFFFFFFF)) | np.uint64(0xABCD1234 << 32)
    for i in range(300, 600):
        flips = rng.choice(64, max_hamming + 1, replace=False)[: rng.integers(0, max_hamming + 2)]
        codes[i] = codes[i - 300] ^ np.uint64(sum(1 << int(b) for b in flips))
    brute = hamming_pairs(codes, DedupSettings(max_hamming=max_hamming))
    hashed = hamming_pairs(codes, DedupSettings(max_hamming=max_hamming, exact_search_below=0))
    assert len(brute[0]) >= 100
    for a, b in zip(brute, hashed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_search_parameters():
    assert multihash_parameters(1_000_000, 4) == (3, 21, 1)
    assert multihash_parameters(50_000, 4) == (5, 12, 0)
    assert multihash_parameters(10, 0) == (2, 32, 0)
    assert ivf_nlist(1_000_000, 8) == 2828
    assert ivf_nlist(100, 8) == 12  # at least 8 vectors per cell
    assert ivf_nlist(5, 8) == 1


def test_cosine_pairs_on_float32_rows():
    _, vectors, _, pairs = planted(2000, 32, seed=5)
    rows, cols, cosines = cosine_pairs(vectors.astype(np.float32))
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) >= {
        p for p in pairs if float(vectors[p[0]] @ vectors[p[1]]) >= 0.97 + 1e-6
    }
    assert np.all(rows < cols) and np.all(cosines >= 0.97)


# -- verdicts ----------------------------------------------------------------------------------


def test_dedup_verdict_reasons_and_metrics():
    data = encode(photo(1))
    original, copy = record("a.png", data), record("b.png", data)
    dups = find_duplicates([signature_of(copy), signature_of(original)])
    assert dedup_verdict(original, dups) == Verdict.ok()
    assert dedup_verdict(copy, dups) == Verdict.drop(
        "duplicate_exact", kept_id=sha256_hex(data), kept_key="a.png", distance=0.0
    )
    for kind in ("perceptual", "embedding"):
        verdict = dedup_verdict(copy, {"b.png": Duplicate(kind, "k", "a.png", 0.25)})
        assert (verdict.keep, verdict.reason) == (False, f"duplicate_{kind}")
        assert verdict.metrics == {"kept_id": "k", "kept_key": "a.png", "distance": 0.25}
    unkeyed = ImageRecord(sha256_hex(data), data, W, H, "test")
    keyed_by_id = {sha256_hex(data): Duplicate("exact", "k", "x", 0.0)}
    assert dedup_verdict(unkeyed, keyed_by_id).reason == "duplicate_exact"
