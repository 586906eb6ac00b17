"""Duplicates across a whole run: exact copies, perceptual near-copies, embedding near-copies.

Everything here is pure: no Beam. Each record gives one small :class:`Signature`;
:func:`band_entries` files it under a few *band keys*; only signatures that share a band key are
compared (:func:`compare_chunks`), and each comparison yields findings for single records that
:func:`best_duplicate` combines, one key at a time. :func:`dedup_verdict` turns a record's
combined finding into its verdict. ``pipelines/dedup.py`` runs these steps as Beam transforms
(one ``GroupByKey`` per band key, a combiner per record key); :func:`find_duplicates` runs the
very same steps in memory, for tests and small collections.

**Rule.** Signature keys (a record's location, else its image id) are unique in a run and are
ordered as strings. An item is a *duplicate* when it has a verified match with an *earlier* key.
So the first item in key order is always kept, and no two kept items match each other. The
duplicate names as its twin its first earlier candidate that ``verify`` confirms, in the order
kind (exact > perceptual > layout > embedding), distance (nearest), key (earliest); each kind
keeps its own ``candidates`` best per key. Every signature is filed under each of its views (the
image without its frame, and whole when a frame was trimmed). The twin may itself be a
duplicate: in a chain A~B~C where A and C do not match, B names A and C names B, and only A is
kept. The answer depends only on the set of signatures: not on their order, on how the work is
split, or on which runner does it. Near-copies are only matched within one ``scope``
(``signature_of(record, scope="entity")``: among images of one entity); exact copies are matched
across the whole run.

Verification (what a match is):

- ``exact``: the same ``item_id`` (the sha256 of the source bytes).
- ``perceptual``: 64-bit pHash within ``max_hamming`` bits (and, with ``max_colour_difference``
  set, 4x4 mean-colour thumbnails within it on every channel value: a screen for runs without a
  pixel check). pHash sees luminance only: the flags of France and Ireland hash identically, and
  93 pairs of the 314 distinct bundled flags are within 4 bits; pHash is also unstable on flat
  artwork (JPEG noise flips near-zero DCT coefficients against the median). So in a run it only
  proposes: ``verify`` (the pixel check, :func:`pixel_check`) decides.
- ``layout``: the 4x4 thumbnails' centred colour vectors at cosine ``layout_cosine`` or more.
- ``embedding``: cosine >= ``min_cosine`` between L2-normalised embeddings, decided in float64 on
  the vectors given (a float32 product with a margin only screens candidates). A zero vector (an
  image the embedder could not describe) matches nothing; vectors of different lengths are never
  compared.

Candidates (band keys; a pair sharing several bands is compared only in the first it shares):

- ``exact``: one key, the ``item_id``, run-wide. All members of such a group match each other at
  distance 0, so every member but the earliest names the earliest: one pass, no pairs.
- ``perceptual``: the 64 bits cut into ``max_hamming + 1`` contiguous bands (12 or 13 bits at the
  default 4), keyed with the scope. Two hashes within ``max_hamming`` bits differ in at most
  ``max_hamming`` bands, so by pigeonhole they agree on at least one: the candidates hold every
  pair an all-pairs search would find.
- ``embedding``: SimHash. ``bits * bands`` seeded random hyperplanes; a vector's band value is
  the signs of its projections on ``bits`` of them, keyed with the scope and the vector length. A
  pair at cosine ``c`` agrees on one sign with probability ``p = 1 - acos(c) / pi``, so it shares
  a band with probability ``1 - (1 - p**bits)**bands``. :func:`simhash_parameters` takes the
  most selective ``bits`` whose ``bands`` (at most ``max_bands``) reach ``recall`` at
  ``min_cosine``: 29 bits and 47 bands at 0.97 for recall 0.99; pairs above the threshold are
  found more often still.

**Bounds.** In the pipeline a band group is streamed, never held: an exact group in two passes;
others of up to ``chunk_size`` members are compared all-pairs in one step; a bigger group is cut
into chunks of ``chunk_size`` (:func:`split`) and every chunk pair (:func:`chunk_pairs`) is
compared as its own element. No element ever holds more than ``2 * chunk_size`` signatures,
and each record key receives at most one finding per compared chunk pair, combined as they
arrive. The *work* in a group of ``k`` stays ``k * k / 2`` comparisons: a scope of ``n``
random pHashes costs about ``(max_hamming + 1) * n**2 / 2**(w + 1)`` comparisons for ``w``-bit
bands (3e8 cheap XORs at one million images in one scope), and embeddings that crowd together
(one domain of look-alike photos) share bands more often than random vectors do. Keys must be
unique (:func:`find_duplicates` refuses repeats; in the pipeline, records that share a key would
share one finding).

>>> sigs = [Signature("a.png", "id1", 0), Signature("b.png", "id1", 0)]
>>> find_duplicates(sigs)["b.png"].kind
'exact'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import islice

import numpy as np

from groundforge.filters.image import open_rgb
from groundforge.filters.sameimage import (
    DEFAULT_SAME,
    Look,
    SameSettings,
    content_of,
    look_of,
    same_picture,
)
from groundforge.filters.verdict import Verdict
from groundforge.pixels import image_bytes
from groundforge.schemas.records import ImageRecord, record_key

SCOPES = ("all", "entity")
KINDS = ("exact", "perceptual", "layout", "embedding")

THUMBNAIL_SIDE = 4
THUMBNAIL_BYTES = THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3

# float32 inner products of unit vectors are off by far less than this; candidates within it of
# the threshold are decided again in float64.
_FLOAT32_MARGIN = 1e-3
_BLANK_NORM = 1e-6
_NORM_TOLERANCE = 1e-3
_PROJECT_ROWS = 1 << 14  # rows projected onto the hyperplanes per BLAS call


@dataclass(frozen=True)
class Signature:
    """What dedup needs to know about one record.

    ``key`` orders the run and must be unique in it (the record's location); ``item_id`` is
    the record's image_id; ``phash`` the 64-bit perceptual hash; ``embedding`` the record's
    L2-normalised vector (a zero vector counts as none), or None; ``thumbnail`` the 48-byte RGB
    4x4 thumbnail of the image without its frame (empty: no layout candidates and no colour
    check). Near-copies are only matched within one ``scope``; exact copies everywhere. ``ref``
    is where the image's pixels can be loaded for verification. ``views`` holds the
    ``(phash, thumbnail)`` of the whole image when a frame was trimmed: whether a frame is
    found can flip between a picture and its copy (a crop cuts into a border, a white field
    reads as padding), so candidates are searched under both. ``entity`` names what the image
    shows, for the alias table.
    """

    key: str
    item_id: str
    phash: int
    embedding: tuple[float, ...] | None = None
    thumbnail: bytes = b""
    scope: str = ""
    ref: str = ""
    views: tuple[tuple[int, bytes], ...] = ()
    entity: str = ""


@dataclass(frozen=True)
class DedupSettings:
    """Which duplicate kinds to look for, their thresholds, and how to split the search.

    ``max_colour_difference`` is the largest difference of any thumbnail channel value for a
    perceptual match (None: pHash alone decides). ``recall`` is the least probability that a pair
    at ``min_cosine`` shares an embedding band, with at most ``max_bands`` bands per record;
    ``seed`` draws the hyperplanes. ``chunk_size`` is the most members a band group is compared
    in at once (an element holds at most twice as many).
    """

    exact: bool = True
    perceptual: bool = True
    max_hamming: int = 4
    max_colour_difference: int | None = None
    layout: bool = True
    layout_cosine: float = 0.9
    layout_bands: int = 16
    embedding: bool = True
    min_cosine: float = 0.97
    recall: float = 0.99
    max_bands: int = 48
    chunk_size: int = 256
    candidates: int = 16
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 64:
            raise ValueError(f"max_hamming must be in 0..64, got {self.max_hamming}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in -1..1, got {self.min_cosine}")
        if not 0.0 < self.recall < 1.0:
            raise ValueError(f"recall must be between 0 and 1 (exclusive), got {self.recall}")
        if self.max_bands < 1:
            raise ValueError(f"max_bands must be at least 1, got {self.max_bands}")
        if not -1.0 <= self.layout_cosine <= 1.0:
            raise ValueError(f"layout_cosine must be in -1..1, got {self.layout_cosine}")
        if self.candidates < 1 or self.layout_bands < 1:
            raise ValueError("candidates and layout_bands must be at least 1")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")


DEFAULT_SETTINGS = DedupSettings()


@dataclass(frozen=True)
class Duplicate:
    """Why an item was dropped: the ``kind`` of match and the earlier item it matched (its twin).

    ``distance`` is 0 for ``exact``, the Hamming distance in bits for ``perceptual`` and
    ``1 - cosine`` for ``embedding``. ``kept_entity`` is the twin's entity.
    """

    kind: str
    kept_id: str
    kept_key: str
    distance: float
    kept_ref: str = ""
    kept_entity: str = ""


@dataclass(frozen=True)
class BandEntry:
    """A signature filed under one band of one kind.

    ``sketch`` holds an embedding's value in every band, so that a pair is compared only in the
    first band it shares (a perceptual entry recomputes them from its hash). Entries carry only
    what their kind compares: no embedding on a hash entry, no thumbnail on an embedding entry.
    """

    kind: str
    band: int
    signature: Signature
    sketch: tuple[int, ...] = ()


def perceptual_hash(image: bytes) -> int:
    """The 64-bit pHash of an image's decoded RGB pixels, as an int.

    >>> perceptual_hash(png) == perceptual_hash(png)                    # doctest: +SKIP
    True
    """
    return fingerprint(image)[0]


def colour_thumbnail(image: bytes) -> bytes:
    """The image's 4x4 mean colours, 48 bytes of RGB in row-major order."""
    return fingerprint(image)[1]


def fingerprint(image: bytes) -> tuple[int, bytes]:
    """``(perceptual_hash, colour_thumbnail)`` of image bytes, decoded once, both taken without
    the image's uniform frame (so a padded copy hashes like its original)."""
    return fingerprints(image)[0]


def fingerprints(image: bytes) -> tuple[tuple[int, bytes], ...]:
    """The :func:`fingerprint` of image bytes, then, when a frame was trimmed, that of the whole
    image (decoded once)."""
    whole = open_rgb(image)
    content = content_of(whole)
    views = (content,) if content.size == whole.size else (content, whole)
    return tuple(_fingerprint_of(rgb) for rgb in views)


def _fingerprint_of(rgb) -> tuple[int, bytes]:
    import imagehash
    from PIL import Image

    side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    thumbnail = rgb.resize(side, Image.Resampling.BOX).tobytes()
    return int(str(imagehash.phash(rgb)), 16), thumbnail


def signature_of(record: ImageRecord, scope: str = "all") -> Signature:
    """The signature of a record whose image is decodable (decoded once).

    ``scope="entity"`` matches near-copies only among images of the record's entity: look-alike
    entities (Chad and Romania) are what KVG is about. ``"all"`` matches them across the run.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    (phash, thumbnail), *views = fingerprints(image_bytes(record))
    within = record.entity if scope == "entity" else ""
    return Signature(
        record_key(record),
        record.image_id,
        phash,
        record.embedding,
        thumbnail,
        within,
        record.image_ref,
        tuple(views),
        record.entity,
    )


# -- bands ---------------------------------------------------------------------------------------


def phash_band_layout(max_hamming: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of each of the ``max_hamming + 1`` contiguous bands of a 64-bit hash,
    from the top bit down; widths differ by at most one bit."""
    count = max_hamming + 1
    layout, top = [], 64
    for band in range(count):
        width = 64 // count + (band < 64 % count)
        top -= width
        layout.append((top, width))
    return layout


def phash_bands(codes: np.ndarray, max_hamming: int) -> np.ndarray:
    """Each uint64 code's value in every band, ``(n, max_hamming + 1)`` uint64.

    Two codes within ``max_hamming`` bits agree in at least one column.
    """
    codes = np.asarray(codes, dtype=np.uint64)
    out = np.empty((len(codes), max_hamming + 1), dtype=np.uint64)
    for band, (shift, width) in enumerate(phash_band_layout(max_hamming)):
        out[:, band] = (codes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    return out


def simhash_parameters(
    min_cosine: float, recall: float = 0.99, max_bands: int = 48
) -> tuple[int, int]:
    """``(bits per band, bands)``: the most bits (at most 64) for which at most ``max_bands``
    bands give a pair at ``min_cosine`` at least ``recall`` odds of sharing a band.

    More bits per band means fewer chance collisions; zero bits (one band holding a whole
    scope) is what is left when ``min_cosine`` is too low for any band to be selective.

    >>> simhash_parameters(0.97)
    (29, 47)
    """
    agree = 1.0 - math.acos(min(1.0, max(-1.0, min_cosine))) / math.pi
    best = (0, 1)
    for bits in range(1, 65):
        hit = agree**bits
        if hit <= 0.0:
            break
        bands = 1 if hit >= 1.0 else math.ceil(math.log1p(-recall) / math.log1p(-hit))
        if bands > max_bands:
            break
        best = (bits, bands)
    return best


def simhash_recall(cosine: float, bits: int, bands: int) -> float:
    """The probability that a pair at ``cosine`` shares at least one of ``bands`` bands."""
    agree = 1.0 - math.acos(min(1.0, max(-1.0, cosine))) / math.pi
    return 1.0 - (1.0 - agree**bits) ** bands


@lru_cache(maxsize=8)
def hyperplanes(dim: int, bits: int, bands: int, seed: int) -> np.ndarray:
    """The ``(dim, bits * bands)`` float32 normals of the SimHash hyperplanes, the same on every
    worker for the same arguments."""
    rng = np.random.default_rng([seed, dim, bits, bands])
    planes = rng.standard_normal((dim, bits * bands), dtype=np.float32)
    planes.setflags(write=False)
    return planes


def embedding_bands(vectors: np.ndarray, settings: DedupSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Each row's SimHash value in every band, ``(n, bands)`` uint64 (projected in float32)."""
    return simhash_bands(
        vectors, settings.min_cosine, settings.recall, settings.max_bands, settings.seed
    )


def layout_bands(vectors: np.ndarray, settings: DedupSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Each layout vector's SimHash value in every layout band, ``(n, bands)`` uint64."""
    return simhash_bands(
        vectors, settings.layout_cosine, settings.recall, settings.layout_bands, settings.seed
    )


def layout_vector(thumbnail: bytes) -> np.ndarray:
    """A thumbnail's 48 colour values, centred and L2-normalised (zeros for a flat image).

    Centring and scaling make it blind to brightness and contrast shifts, so re-encoded,
    resized and brightened copies point the same way (cosine 0.975 or more for 99.5% of the
    planted copies of the bundled flags).
    """
    values = np.frombuffer(thumbnail, dtype=np.uint8).astype(np.float64)
    values -= values.mean()
    norm = np.sqrt(values @ values)
    return values / norm if norm > 1e-9 else np.zeros_like(values)


def simhash_bands(
    vectors: np.ndarray, min_cosine: float, recall: float, max_bands: int, seed: int
) -> np.ndarray:
    """Each row's SimHash value in every band for pairs at ``min_cosine``, ``(n, bands)``."""
    vectors = np.asarray(vectors)
    bits, bands = simhash_parameters(min_cosine, recall, max_bands)
    out = np.zeros((len(vectors), bands), dtype=np.uint64)
    if bits == 0 or not len(vectors):
        return out
    planes = hyperplanes(vectors.shape[1], bits, bands, seed)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    for lo in range(0, len(vectors), _PROJECT_ROWS):
        block = np.asarray(vectors[lo : lo + _PROJECT_ROWS], dtype=np.float32)
        signs = (block @ planes > 0).reshape(len(block), bands, bits)
        out[lo : lo + len(block)] = (signs * weights).sum(axis=2, dtype=np.uint64)
    return out


def check_signature(sig: Signature) -> None:
    """Raise ValueError, naming the key, when a signature cannot be compared."""
    for phash, thumbnail in ((sig.phash, sig.thumbnail), *sig.views):
        if not 0 <= phash < 1 << 64:
            raise ValueError(f"phash of {sig.key!r} is not a 64-bit unsigned int")
        if thumbnail and len(thumbnail) != THUMBNAIL_BYTES:
            raise ValueError(f"thumbnail of {sig.key!r} is not {THUMBNAIL_BYTES} bytes")
    if sig.embedding is not None:
        norm = math.sqrt(math.fsum(float(v) * float(v) for v in sig.embedding))
        if norm >= _BLANK_NORM and abs(norm - 1.0) > _NORM_TOLERANCE:
            raise ValueError(
                f"embedding of {sig.key!r} has norm {norm:.4f}; embeddings must be L2-normalised"
            )


def band_entries(
    sig: Signature, settings: DedupSettings = DEFAULT_SETTINGS
) -> list[tuple[str, BandEntry]]:
    """``(band key, entry)`` for every band the signature is filed under.

    Keys: ``exact:<item_id>``; ``perceptual:<band>:<value>:<scope>``;
    ``layout:<band>:<value>:<scope>``; ``embedding:<band>:<length>:<value>:<scope>`` (values in
    hex). Raises ValueError for a
    signature :func:`check_signature` refuses.

    >>> [k for k, _ in band_entries(Signature("a", "id", 0), DedupSettings(max_hamming=1))]
    ['exact:id', 'perceptual:0:0:', 'perceptual:1:0:']
    """
    check_signature(sig)
    out: list[tuple[str, BandEntry]] = []
    if settings.exact:
        bare = replace(sig, embedding=None, thumbnail=b"", views=())
        out.append((f"exact:{sig.item_id}", BandEntry("exact", 0, bare)))
    # Each view is filed on its own; a band key both views share is filed once.
    filed: set[str] = set()
    for phash, thumbnail in ((sig.phash, sig.thumbnail), *sig.views):
        bare = replace(sig, phash=phash, thumbnail=thumbnail, embedding=None, views=())
        if settings.perceptual:
            values = phash_bands(np.array([phash], dtype=np.uint64), settings.max_hamming)[0]
            for band, value in enumerate(values.tolist()):
                key = f"perceptual:{band}:{value:x}:{sig.scope}"
                if key not in filed:
                    filed.add(key)
                    out.append((key, BandEntry("perceptual", band, bare)))
        if settings.layout and len(thumbnail) == THUMBNAIL_BYTES:
            vector = layout_vector(thumbnail)
            if vector.any():
                sketch = tuple(layout_bands(vector[None], settings)[0].tolist())
                for band, value in enumerate(sketch):
                    key = f"layout:{band}:{value:x}:{sig.scope}"
                    if key not in filed:
                        filed.add(key)
                        out.append((key, BandEntry("layout", band, bare, sketch)))
    if settings.embedding and sig.embedding is not None:
        vector = np.asarray(sig.embedding, dtype=np.float64)
        if np.sqrt(vector @ vector) >= _BLANK_NORM:
            sketch = tuple(embedding_bands(vector[None], settings)[0].tolist())
            bare = replace(sig, thumbnail=b"", views=())
            for band, value in enumerate(sketch):
                key = f"embedding:{band}:{len(vector)}:{value:x}:{sig.scope}"
                out.append((key, BandEntry("embedding", band, bare, sketch)))
    return out


# -- comparing within a band group ---------------------------------------------------------------


def split(entries: Iterable[BandEntry], size: int) -> Iterator[list[BandEntry]]:
    """Consecutive chunks of at most ``size`` entries, read lazily from ``entries``."""
    it = iter(entries)
    while chunk := list(islice(it, size)):
        yield chunk


def chunk_pairs(count: int) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i <= j``, of ``count`` chunks: each pair of members of a group
    meets in exactly one of them (``i == j``: within one chunk)."""
    return [(i, j) for i in range(count) for j in range(i, count)]


def perceptual_pairs(
    codes_a: np.ndarray,
    thumbnails_a: Sequence[bytes],
    codes_b: np.ndarray | None,
    thumbnails_b: Sequence[bytes] | None,
    band: int,
    settings: DedupSettings = DEFAULT_SETTINGS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of ``a`` x ``b`` that match perceptually and agree on no band
    before ``band``, and their Hamming distances. With ``b`` None: pairs ``i < j`` within ``a``.
    """
    within = codes_b is None
    codes_a = np.asarray(codes_a, dtype=np.uint64)
    codes_b = codes_a if within else np.asarray(codes_b, dtype=np.uint64)
    thumbnails_b = thumbnails_a if within else thumbnails_b
    xor = codes_a[:, None] ^ codes_b[None, :]
    bits = np.bitwise_count(xor)
    rows, cols = np.nonzero(bits <= settings.max_hamming)
    if within:
        rows, cols = rows[rows < cols], cols[rows < cols]
    differ = xor[rows, cols]
    keep = np.ones(len(rows), dtype=bool)
    for shift, width in phash_band_layout(settings.max_hamming)[:band]:
        keep &= ((differ >> np.uint64(shift)) & np.uint64((1 << width) - 1)) != 0
    rows, cols = rows[keep], cols[keep]
    if settings.max_colour_difference is not None and len(rows):
        table_a, has_a = _thumbnail_table(thumbnails_a)
        table_b, has_b = (table_a, has_a) if within else _thumbnail_table(thumbnails_b)
        diff = np.abs(table_a[rows] - table_b[cols]).max(axis=1)
        keep = (diff <= settings.max_colour_difference) | ~has_a[rows] | ~has_b[cols]
        rows, cols = rows[keep], cols[keep]
    return rows, cols, bits[rows, cols].astype(np.float64)


def embedding_pairs(
    vectors_a: np.ndarray,
    sketch_a: np.ndarray,
    vectors_b: np.ndarray | None,
    sketch_b: np.ndarray | None,
    band: int,
    min_cosine: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of ``a`` x ``b`` with cosine >= ``min_cosine`` that agree on no band
    before ``band``, and their cosines in float64. With ``b`` None: pairs ``i < j`` within ``a``.

    The cosine of a pair is the same bits whichever side each vector is on and whatever else is
    in the chunk: one float64 dot product per pair, over the pair's own two rows.
    """
    within = vectors_b is None
    a = np.asarray(vectors_a)
    b = a if within else np.asarray(vectors_b)
    sketch_b = sketch_a if within else sketch_b
    a32 = a.astype(np.float32, copy=False)
    b32 = a32 if within else b.astype(np.float32, copy=False)
    rows, cols = np.nonzero(a32 @ b32.T > min_cosine - _FLOAT32_MARGIN)
    if within:
        rows, cols = rows[rows < cols], cols[rows < cols]
    if band:
        earlier = np.asarray(sketch_a)[rows, :band] == np.asarray(sketch_b)[cols, :band]
        keep = ~earlier.any(axis=1)
        rows, cols = rows[keep], cols[keep]
    cosines = np.einsum(
        "ij,ij->i", a[rows].astype(np.float64, copy=False), b[cols].astype(np.float64, copy=False)
    )
    hit = cosines >= min_cosine
    return rows[hit], cols[hit], cosines[hit]


def compare_chunks(
    left: Sequence[BandEntry],
    right: Sequence[BandEntry] | None,
    settings: DedupSettings = DEFAULT_SETTINGS,
) -> dict[str, tuple[Duplicate, ...]]:
    """The candidate matches within ``left`` (``right`` None) or between ``left`` and ``right``,
    entries of one near-copy band group: for every later key of a matching pair, its best
    ``settings.candidates`` earlier matches here, best first."""
    if not left or (right is None and len(left) < 2) or (right is not None and not right):
        return {}
    kind, band = left[0].kind, left[0].band
    if kind == "perceptual":
        rows, cols, distance = perceptual_pairs(
            np.array([e.signature.phash for e in left], dtype=np.uint64),
            [e.signature.thumbnail for e in left],
            None if right is None else np.array([e.signature.phash for e in right], np.uint64),
            None if right is None else [e.signature.thumbnail for e in right],
            band,
            settings,
        )
    elif kind == "layout":
        rows, cols, cosines = embedding_pairs(
            _layouts(left),
            np.array([e.sketch for e in left], dtype=np.uint64),
            _layouts(right),
            None if right is None else np.array([e.sketch for e in right], dtype=np.uint64),
            band,
            settings.layout_cosine,
        )
        distance = 1.0 - cosines
    elif kind == "embedding":
        rows, cols, cosines = embedding_pairs(
            np.array([e.signature.embedding for e in left], dtype=np.float64),
            np.array([e.sketch for e in left], dtype=np.uint64),
            None if right is None else np.array([e.signature.embedding for e in right], float),
            None if right is None else np.array([e.sketch for e in right], dtype=np.uint64),
            band,
            settings.min_cosine,
        )
        distance = 1.0 - cosines
    else:
        raise ValueError(f"compare_chunks compares near-copies, not {kind!r} entries")
    if not len(rows):
        return {}
    # Rank the keys once, then keep each later key's best earlier matches with array operations:
    # a crowded chunk pair has up to chunk_size**2 matches but at most 2 * chunk_size later keys.
    # Both views of a record share its rank, and meet nowhere but in a group they both joined.
    members = [e.signature for e in left] + ([] if right is None else [e.signature for e in right])
    keys, rank = np.unique(np.array([m.key for m in members], dtype=object), return_inverse=True)
    holder = np.empty(len(keys), dtype=np.int64)
    holder[rank] = np.arange(len(members))
    a, b = rank[rows], rank[cols + (0 if right is None else len(left))]
    other = a != b
    a, b, distance = a[other], b[other], distance[other]
    earlier, later = np.minimum(a, b), np.maximum(a, b)
    # One row per (later, earlier) pair, the nearest of the views that met; then each later
    # key's rows nearest first.
    pair = np.lexsort((distance, earlier, later))
    fresh = np.r_[True, (np.diff(later[pair]) != 0) | (np.diff(earlier[pair]) != 0)]
    earlier, later, distance = earlier[pair[fresh]], later[pair[fresh]], distance[pair[fresh]]
    best = np.lexsort((earlier, distance, later))
    starts = np.r_[True, later[best][1:] != later[best][:-1]]
    place = np.arange(len(best)) - np.maximum.accumulate(np.where(starts, np.arange(len(best)), 0))
    first = best[place < settings.candidates]
    found: dict[str, tuple[Duplicate, ...]] = {}
    picked = zip(
        earlier[first].tolist(), later[first].tolist(), distance[first].tolist(), strict=True
    )
    for e, l_, d in picked:
        twin = members[holder[e]]
        found[keys[l_]] = (
            *found.get(keys[l_], ()),
            Duplicate(kind, twin.item_id, twin.key, d, twin.ref, twin.entity),
        )
    return found


def _layouts(entries: Sequence[BandEntry] | None) -> np.ndarray | None:
    if entries is None:
        return None
    return np.array([layout_vector(e.signature.thumbnail) for e in entries])


def exact_findings(entries: Iterable[BandEntry]) -> Iterator[tuple[str, tuple[Duplicate]]]:
    """An exact band group (one ``item_id``): every member but the earliest names the earliest.
    ``entries`` is read twice and never held."""
    first = min((e.signature for e in entries), key=lambda s: s.key)
    twin = Duplicate("exact", first.item_id, first.key, 0.0, first.ref, first.entity)
    for entry in entries:
        if entry.signature.key != first.key:
            yield entry.signature.key, (twin,)


def group_findings(
    entries: Sequence[BandEntry], settings: DedupSettings = DEFAULT_SETTINGS
) -> Iterator[tuple[str, tuple[Duplicate, ...]]]:
    """Every candidate list of one band group, chunk pair by chunk pair (what the pipeline
    spreads over elements); a key may appear once per chunk pair."""
    if len(entries) < 2:
        return
    if entries[0].kind == "exact":
        yield from exact_findings(entries)
        return
    chunks = list(split(entries, settings.chunk_size))
    for i, j in chunk_pairs(len(chunks)):
        yield from compare_chunks(chunks[i], None if i == j else chunks[j], settings).items()


# -- resolution ------------------------------------------------------------------------------------


def _rank(dup: Duplicate) -> tuple[int, float, str]:
    return KINDS.index(dup.kind), dup.distance, dup.kept_key


def best_candidates(
    lists: Iterable[tuple[Duplicate, ...]], limit: int = DEFAULT_SETTINGS.candidates
) -> tuple[Duplicate, ...]:
    """The best ``limit`` candidates of each kind of a record among several lists, best first
    (exact > perceptual > layout > embedding, then the nearest, then the earliest twin), one
    per twin and kind. Each kind keeps its own ``limit``: pHash is blind to colour, so a crowd
    of same-luminance tricolours must not push out the twin the colour layout found.
    Associative and commutative, so lists can be combined in any grouping and order."""
    best: dict[tuple[str, str], Duplicate] = {}
    for dups in lists:
        for dup in dups:
            held = best.get((dup.kind, dup.kept_key))
            if held is None or _rank(dup) < _rank(held):
                best[(dup.kind, dup.kept_key)] = dup
    taken: dict[str, int] = {}
    out = []
    for dup in sorted(best.values(), key=_rank):
        taken[dup.kind] = taken.get(dup.kind, 0) + 1
        if taken[dup.kind] <= limit:
            out.append(dup)
    return tuple(out)


def first_verified(
    candidates: Sequence[Duplicate], verify: Callable[[Duplicate], bool] | None
) -> Duplicate | None:
    """The first candidate that ``verify`` confirms (exact copies need no check; a twin already
    refused under another kind is not compared again); with ``verify`` None, the first."""
    refused: set[str] = set()
    for dup in candidates:
        if verify is None or dup.kind == "exact":
            return dup
        if dup.kept_key in refused:
            continue
        if verify(dup):
            return dup
        refused.add(dup.kept_key)
    return None


def find_duplicates(
    signatures: Sequence[Signature],
    settings: DedupSettings = DEFAULT_SETTINGS,
    verify: Callable[[str, Duplicate], bool] | None = None,
) -> dict[str, Duplicate]:
    """The duplicates among ``signatures``, keyed by their ``key``; every other item is kept.

    The pipeline's steps, in memory: band entries, band groups, chunk-pair comparisons, the
    best candidates per key, and ``verify(key, candidate)`` (None: every candidate holds).
    Raises ValueError on repeated keys and on signatures :func:`check_signature` refuses.

    >>> dups = find_duplicates(signatures)                              # doctest: +SKIP
    >>> dups["web/copy.jpg"]                                             # doctest: +SKIP
    Duplicate(kind='perceptual', kept_id='9f86...', kept_key='web/orig.png', distance=2.0)
    """
    keys = sorted(s.key for s in signatures)
    for before, after in zip(keys, keys[1:], strict=False):
        if before == after:
            raise ValueError(f"signature keys must be unique; {after!r} appears twice")
    groups: dict[str, list[BandEntry]] = {}
    for sig in signatures:
        for key, entry in band_entries(sig, settings):
            groups.setdefault(key, []).append(entry)
    found: dict[str, tuple[Duplicate, ...]] = {}
    for entries in groups.values():
        for key, dups in group_findings(entries, settings):
            found[key] = best_candidates([found.get(key, ()), dups], settings.candidates)
    out = {}
    for key, dups in found.items():
        check = None if verify is None else (lambda dup, key=key: verify(key, dup))
        dup = first_verified(dups, check)
        if dup is not None:
            out[key] = dup
    return out


def dedup_verdict(record: ImageRecord, found: Duplicate | None, **metrics) -> Verdict:
    """Keep (no finding), or drop with ``duplicate_<kind>`` naming the twin and the distance
    (and ``metrics``, such as the pixel check's ``block_difference``).

    >>> dedup_verdict(copy, Duplicate("exact", "id1", "a.png", 0.0)).metrics  # doctest: +SKIP
    {'kept_id': 'id1', 'kept_key': 'a.png', 'distance': 0.0}
    """
    if found is None:
        return Verdict.ok()
    if found.kept_entity:
        metrics = {"kept_entity": found.kept_entity, **metrics}
    return Verdict.drop(
        f"duplicate_{found.kind}",
        kept_id=found.kept_id,
        kept_key=found.kept_key,
        distance=found.distance,
        **metrics,
    )


def pixel_check(
    look: Callable[[str], Look], settings: SameSettings = DEFAULT_SAME
) -> Callable[[str, Duplicate], bool]:
    """``verify`` for :func:`find_duplicates`: ``look(key)`` gives the look of a record by key,
    and a candidate holds when :func:`same_picture` says the two show one picture."""

    def verify(key: str, dup: Duplicate) -> bool:
        return same_picture(look(dup.kept_key), look(key), settings).same

    return verify


def confirm_duplicate(
    record: ImageRecord,
    candidates: Sequence[Duplicate],
    kept_look: Callable[[Duplicate], Look],
    settings: SameSettings = DEFAULT_SAME,
) -> Verdict:
    """Drop ``record`` as a duplicate of its first candidate whose pixels show the same picture
    (``kept_look`` loads the twin's look), with that comparison's ``block_difference``; keep it
    when none does. Exact copies need no comparison."""
    if not candidates:
        return Verdict.ok()
    own = look_of(image_bytes(record))
    differences: dict[str, float] = {}

    def verify(dup: Duplicate) -> bool:
        outcome = same_picture(kept_look(dup), own, settings)
        differences[dup.kept_key] = outcome.block_difference
        return outcome.same

    found = first_verified(candidates, verify)
    if found is not None and found.kept_key in differences:
        return dedup_verdict(record, found, block_difference=differences[found.kept_key])
    return dedup_verdict(record, found)


def _thumbnail_table(thumbnails: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails as an int16 ``(n, 48)`` table, and which rows have one."""
    present = np.array([len(t) == THUMBNAIL_BYTES for t in thumbnails], dtype=bool)
    table = np.zeros((len(thumbnails), THUMBNAIL_BYTES), dtype=np.int16)
    if present.any():
        packed = b"".join(t for t in thumbnails if len(t) == THUMBNAIL_BYTES)
        table[present] = np.frombuffer(packed, dtype=np.uint8).reshape(-1, THUMBNAIL_BYTES)
    return table, present
