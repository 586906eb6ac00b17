"""Duplicates across a whole run: exact copies, perceptual near-copies, embedding near-copies.

The pipeline gathers one small :class:`Signature` per record in a global step, calls
:func:`find_duplicates` once, broadcasts the answer, and :func:`dedup_verdict` turns it into each
record's verdict. Everything here is pure: no Beam, and faiss is imported only where it is used.

**Rule.** Signatures are walked in order of ``key``. An item is a duplicate when it matches an
*earlier item that was itself kept*; the first kind that matches, in the order exact > perceptual
> embedding, wins, and the duplicate names the nearest such kept item (ties: the earliest). A
dropped item is never "kept", so a chain A~B~C with A!~C keeps A and C. The same set of
signatures gives the same answer whatever order it comes in. Near-copies are only matched
within one ``scope`` (with ``signature_of(record, scope="entity")``, among images of one
entity); exact copies are matched across the whole run.

- ``exact``: the same ``item_id`` (the sha256 of the source bytes).
- ``perceptual``: 64-bit pHash within ``max_hamming`` bits *and* 4x4 mean-colour thumbnails
  within ``max_colour_difference`` on every channel value. pHash sees luminance only: the flags
  of France and Ireland hash identically, and 93 pairs of the 314 distinct bundled flags are
  within 4 bits (pHash alone drops 42 of them; with the thumbnail check, only the 5 true
  copies). Re-encodes and 0.9x resizes move a thumbnail by 10 levels or less in 99% of cases.
  pHash is unstable on flat artwork: most of its 64 DCT coefficients are then near zero and
  JPEG noise flips them against the median (horizontal tricolours move by up to 27 bits), so
  about 5% of re-encoded bundled flags are missed here; the embedding kind is the net for those.
- ``embedding``: cosine >= ``min_cosine`` between the records' L2-normalised embeddings,
  decided in float64 on the vectors given (the search itself runs in float32 with a margin).

**Search.** Below ``exact_search_below`` distinct values, every pair is compared: faiss
``IndexBinaryFlat`` range search for hashes, ``IndexFlatIP`` range search for vectors. Above it:

- hashes: multi-index hashing (faiss ``IndexBinaryMultiHash``). The 64 bits are split into
  ``m`` substrings and buckets within ``max_hamming // m`` flips of each substring are probed;
  by the pigeonhole principle every pair within ``max_hamming`` shares a probed bucket, so this
  finds exactly what the brute-force search finds, in about linear time.
- vectors: an inverted file joined cell by cell. Spherical k-means (faiss, on a sample of
  ``32 * nlist`` vectors, ``nlist = sqrt(probes * n)``) partitions the vectors; each vector is
  compared, by one BLAS product per cell, with the members of its ``probes`` nearest cells. A
  pair is found when either vector's probed cells hold the other, so near-duplicates straddling a
  cell boundary are still found: all planted pairs at cosine 0.99 among random 512-d vectors
  were found at 10k, 100k and 1M (``benchmarks/dedup_scaling.py``; 1M takes about a minute on
  2 cores). Cost grows as ``n ** 1.5``: both the distances to the cells and the cell sizes grow as
  ``sqrt(n)``. faiss's own IVF range search finds the same pairs 5x slower at 1M: it scans lists
  query by query and is bound by memory traffic, where one BLAS product per cell is not.

faiss and BLAS use all the threads OpenMP gives them; workers that share cores should lower
``faiss.omp_set_num_threads`` (and ``OMP_NUM_THREADS``) before calling.

>>> sigs = [Signature("a.png", "id1", 0), Signature("b.png", "id1", 0)]
>>> find_duplicates(sigs)["b.png"].kind
'exact'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from groundforge.filters.image import open_rgb
from groundforge.filters.verdict import Verdict
from groundforge.pixels import image_bytes
from groundforge.schemas.records import ImageRecord, record_key

SCOPES = ("all", "entity")

THUMBNAIL_SIDE = 4
THUMBNAIL_BYTES = THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3

# float32 inner products of unit vectors are off by far less than this; candidates within it of
# the threshold are decided again in float64.
_FLOAT32_MARGIN = 1e-3
_TRAIN_PER_LIST = 32
_MIN_PER_LIST = 8
_KMEANS_ITERATIONS = 10
_SEED = 1234
_BLOCK = 1 << 24  # similarity entries computed per BLAS call (64 MiB of float32)


@dataclass(frozen=True)
class Signature:
    """What dedup needs to know about one record.

    ``key`` orders the walk and must be unique in a run (the record's location); ``item_id`` is
    the record's image_id; ``phash`` the 64-bit perceptual hash; ``embedding`` the record's
    L2-normalised vector (a zero vector counts as none), or None; ``thumbnail`` the 48-byte RGB
    4x4 thumbnail, or empty to skip the colour check. Near-copies (perceptual, embedding) are
    only matched within one ``scope``; exact copies are matched everywhere.
    """

    key: str
    item_id: str
    phash: int
    embedding: tuple[float, ...] | None = None
    thumbnail: bytes = b""
    scope: str = ""


@dataclass(frozen=True)
class DedupSettings:
    """Which duplicate kinds to look for, their thresholds, and how to search.

    ``max_colour_difference`` is the largest difference of any thumbnail channel value for a
    perceptual match (None: pHash alone decides). ``probes`` is how many nearest k-means cells
    each vector is compared with in the approximate search. Collections with fewer distinct
    hashes (or vectors) than ``exact_search_below`` are compared all against all.
    """

    exact: bool = True
    perceptual: bool = True
    max_hamming: int = 4
    max_colour_difference: int | None = 16
    embedding: bool = True
    min_cosine: float = 0.97
    probes: int = 8
    exact_search_below: int = 50_000

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 64:
            raise ValueError(f"max_hamming must be in 0..64, got {self.max_hamming}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in -1..1, got {self.min_cosine}")
        if self.probes < 1:
            raise ValueError(f"probes must be at least 1, got {self.probes}")


DEFAULT_SETTINGS = DedupSettings()


@dataclass(frozen=True)
class Duplicate:
    """Why an item was dropped: the ``kind`` of match and the kept item it matched.

    ``distance`` is 0 for ``exact``, the Hamming distance in bits for ``perceptual`` and
    ``1 - cosine`` for ``embedding``.
    """

    kind: str
    kept_id: str
    kept_key: str
    distance: float


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
    """``(perceptual_hash, colour_thumbnail)`` of image bytes, decoded once."""
    import imagehash
    from PIL import Image

    rgb = open_rgb(image)
    side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    thumbnail = rgb.resize(side, Image.Resampling.BOX).tobytes()
    return int(str(imagehash.phash(rgb)), 16), thumbnail


def signature_of(record: ImageRecord, scope: str = "all") -> Signature:
    """The signature of a record whose ``image`` is decodable (decoded once).

    ``scope="entity"`` matches near-copies only among images of the record's entity: look-alike
    entities (Chad and Romania) are what KVG is about. ``"all"`` matches them across the run.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    phash, thumbnail = fingerprint(image_bytes(record))
    within = record.entity if scope == "entity" else ""
    return Signature(
        record_key(record), record.image_id, phash, record.embedding, thumbnail, within
    )


def find_duplicates(
    signatures: Sequence[Signature], settings: DedupSettings = DEFAULT_SETTINGS
) -> dict[str, Duplicate]:
    """The dropped items, keyed by their signature's ``key``; every other item is kept.

    Raises ValueError on repeated keys, on embeddings of different lengths, and on embeddings
    that are not L2-normalised.

    >>> dups = find_duplicates(signatures)                              # doctest: +SKIP
    >>> dups["web/copy.jpg"]                                             # doctest: +SKIP
    Duplicate(kind='perceptual', kept_id='9f86...', kept_key='web/orig.png', distance=2.0)
    """
    sigs = sorted(signatures, key=lambda s: s.key)
    for before, after in zip(sigs, sigs[1:], strict=False):
        if before.key == after.key:
            raise ValueError(f"signature keys must be unique; {after.key!r} appears twice")
    kinds = []
    if settings.exact:
        kinds.append(_exact_kind(sigs))
    if settings.perceptual:
        kinds.append(_perceptual_kind(sigs, settings))
    if settings.embedding:
        kinds.append(_embedding_kind(sigs, settings))
    return {
        sigs[item].key: Duplicate(kind, sigs[kept].item_id, sigs[kept].key, distance)
        for item, (kind, kept, distance) in _walk(len(sigs), kinds).items()
    }


def dedup_verdict(record: ImageRecord, duplicates: Mapping[str, Duplicate]) -> Verdict:
    """Keep, or drop with ``duplicate_<kind>`` naming the kept twin and the distance.

    >>> dedup_verdict(copy, {"b.png": Duplicate("exact", "id1", "a.png", 0.0)}).metrics
    ... # doctest: +SKIP
    {'kept_id': 'id1', 'kept_key': 'a.png', 'distance': 0.0}
    """
    found = duplicates.get(record_key(record))
    if found is None:
        return Verdict.ok()
    return Verdict.drop(
        f"duplicate_{found.kind}",
        kept_id=found.kept_id,
        kept_key=found.kept_key,
        distance=found.distance,
    )


def hamming_pairs(
    codes: np.ndarray, settings: DedupSettings = DEFAULT_SETTINGS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` of 64-bit codes within ``settings.max_hamming`` bits, and the bits.

    ``codes`` is a uint64 array. Exact below ``exact_search_below`` codes (brute force) and above
    it (multi-index hashing with pigeonhole parameters); only the speed differs.
    """
    import faiss

    n = len(codes)
    if n < 2:
        return _no_pairs()
    data = np.ascontiguousarray(codes, dtype=np.uint64).astype(">u8").view(np.uint8)
    data = data.reshape(n, 8)
    if n < settings.exact_search_below:
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash, bits, flips = multihash_parameters(n, settings.max_hamming)
        index = faiss.IndexBinaryMultiHash(64, nhash, bits)
        index.nflip = flips
    index.add(data)
    # Binary range search keeps distances strictly below the radius.
    lims, dist, found = index.range_search(data, settings.max_hamming + 1)
    rows = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    return _ordered(rows, found.astype(np.int64), dist.astype(np.float64))


def multihash_parameters(n: int, max_hamming: int) -> tuple[int, int, int]:
    """``(substrings, bits each, flips)`` for multi-index hashing of ``n`` 64-bit codes.

    Every split is exact for ``max_hamming`` (flips = ``max_hamming // substrings``); the one
    chosen minimises the buckets probed plus the codes expected in them.
    """
    best = None
    for nhash in range(2, max(2, min(max_hamming + 1, 32)) + 1):
        bits = 64 // nhash
        flips = max_hamming // nhash
        probed = nhash * sum(math.comb(bits, k) for k in range(flips + 1))
        cost = probed * (1 + n / 2.0**bits)
        if best is None or cost < best[0]:
            best = (cost, nhash, bits, flips)
    return best[1:]


def cosine_pairs(
    vectors: np.ndarray, settings: DedupSettings = DEFAULT_SETTINGS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` of L2-normalised rows with cosine >= ``settings.min_cosine``.

    The cosines are computed in float64 from ``vectors`` as given. Below
    ``exact_search_below`` rows every pair is compared; above it, the cell join described in the
    module docstring (deterministic for a given array).
    """
    n = len(vectors)
    if n < 2:
        return _no_pairs()
    x32 = np.ascontiguousarray(vectors, dtype=np.float32)
    radius = settings.min_cosine - _FLOAT32_MARGIN
    if n < settings.exact_search_below:
        rows, cols = _flat_candidates(x32, radius)
    else:
        rows, cols, _ = _ordered(*_ivf_candidates(x32, radius, settings.probes), None)
    cosines = _cosines(vectors, rows, cols)
    hit = cosines >= settings.min_cosine
    return rows[hit], cols[hit], cosines[hit]


def ivf_nlist(n: int, probes: int) -> int:
    """The number of k-means cells for ``n`` vectors: ``sqrt(probes * n)``, at least 8 per cell.

    Each vector's work is one row of distances to the cells plus ``probes`` cells of about
    ``n / nlist`` members; ``sqrt(probes * n)`` balances the two.
    """
    return max(1, min(round(math.sqrt(probes * n)), n // _MIN_PER_LIST))


@dataclass(frozen=True)
class _Kind:
    """One match kind over distinct values: ``values[item]`` (or -1) and a symmetric neighbour
    list per value (CSR: ``start``, ``neighbour``, ``distance``), the value itself excluded."""

    name: str
    values: np.ndarray
    start: np.ndarray
    neighbour: np.ndarray
    distance: np.ndarray


def _walk(n: int, kinds: list[_Kind]) -> dict[int, tuple[str, int, float]]:
    """The greedy walk over items ``0..n-1`` (already in key order): item -> (kind, kept, dist).

    Once a value has a kept item, every later item with that value matches it at distance 0, so
    a value has at most one kept item: ``owner[value]``. Items whose values are unique and have
    no neighbours are kept without a look.
    """
    crowded = np.zeros(n, dtype=bool)
    owners = []
    for kind in kinds:
        has = kind.values >= 0
        count = np.bincount(kind.values[has], minlength=len(kind.start) - 1)
        busy = (count > 1) | (np.diff(kind.start) > 0)
        crowded[has] |= busy[kind.values[has]]
        owners.append(np.full(len(kind.start) - 1, -1, dtype=np.int64))
    dropped: dict[int, tuple[str, int, float]] = {}
    for item in np.flatnonzero(crowded).tolist():
        match = None
        for kind, owner in zip(kinds, owners, strict=True):
            value = kind.values[item]
            if value >= 0:
                match = _nearest_kept(kind, owner, value)
                if match is not None:
                    dropped[item] = (kind.name, match[1], match[0])
                    break
        if match is None:
            for kind, owner in zip(kinds, owners, strict=True):
                value = kind.values[item]
                if value >= 0:
                    owner[value] = item
    return dropped


def _nearest_kept(kind: _Kind, owner: np.ndarray, value: int) -> tuple[float, int] | None:
    """(distance, kept item) of the nearest kept item matching ``value``; ties: earliest item."""
    best = (0.0, int(owner[value])) if owner[value] >= 0 else None
    lo, hi = kind.start[value], kind.start[value + 1]
    if hi > lo:
        kept = owner[kind.neighbour[lo:hi]]
        hit = kept >= 0
        if hit.any():
            kept, dist = kept[hit], kind.distance[lo:hi][hit]
            first = np.lexsort((kept, dist))[0]
            candidate = (float(dist[first]), int(kept[first]))
            best = candidate if best is None else min(best, candidate)
    return best


def _exact_kind(sigs: list[Signature]) -> _Kind:
    values, distinct = _distinct([s.item_id for s in sigs])
    return _kind("exact", values, len(distinct), *_no_pairs())


def _perceptual_kind(sigs: list[Signature], settings: DedupSettings) -> _Kind:
    for s in sigs:
        if not 0 <= s.phash < 1 << 64:
            raise ValueError(f"phash of {s.key!r} is not a 64-bit unsigned int")
        if s.thumbnail and len(s.thumbnail) != THUMBNAIL_BYTES:
            raise ValueError(f"thumbnail of {s.key!r} is not {THUMBNAIL_BYTES} bytes")
    values, distinct = _distinct([(s.scope, s.phash, s.thumbnail) for s in sigs])
    codes = np.array([phash for _, phash, _ in distinct], dtype=np.uint64)
    rows, cols, bits = hamming_pairs(codes, settings)
    keep = _same_scope([scope for scope, _, _ in distinct], rows, cols)
    tolerance = settings.max_colour_difference
    if tolerance is not None:
        keep &= _colours_close([thumb for _, _, thumb in distinct], rows, cols, tolerance)
    return _kind("perceptual", values, len(distinct), rows[keep], cols[keep], bits[keep])


def _embedding_kind(sigs: list[Signature], settings: DedupSettings) -> _Kind:
    values, distinct = _distinct(
        [None if s.embedding is None else (s.scope, s.embedding) for s in sigs], skip_none=True
    )
    if not distinct:
        return _kind("embedding", values, 0, *_no_pairs())
    if len({len(e) for _, e in distinct}) > 1:
        raise ValueError("embeddings differ in length; were they made by one embedder?")
    vectors = np.array([e for _, e in distinct], dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    # Embedders give a zero row for an image they cannot describe: it matches nothing.
    blank = norms < 1e-6
    bad = np.flatnonzero(~blank & (np.abs(norms - 1.0) > 1e-3))
    if len(bad):
        item = int(np.flatnonzero(values == bad[0])[0])
        raise ValueError(
            f"embedding of {sigs[item].key!r} has norm {norms[bad[0]]:.4f}; "
            "embeddings must be L2-normalised"
        )
    has = values >= 0
    values[np.flatnonzero(has)[blank[values[has]]]] = -1
    rows, cols, cosines = cosine_pairs(vectors, settings)
    keep = _same_scope([scope for scope, _ in distinct], rows, cols) & ~blank[rows] & ~blank[cols]
    return _kind("embedding", values, len(distinct), rows[keep], cols[keep], 1.0 - cosines[keep])


def _same_scope(scopes: list[str], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    ids, _ = _distinct(scopes)
    return ids[rows] == ids[cols]


def _distinct(items: list, skip_none: bool = False) -> tuple[np.ndarray, list]:
    """Each item's index among the distinct items (first-seen order), and the distinct items."""
    index: dict = {}
    values = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        if skip_none and item is None:
            values[i] = -1
        else:
            values[i] = index.setdefault(item, len(index))
    return values, list(index)


def _kind(name: str, values: np.ndarray, n_values: int, rows, cols, distance: np.ndarray) -> _Kind:
    source = np.concatenate([rows, cols])
    order = np.argsort(source, kind="stable")
    start = np.zeros(n_values + 1, dtype=np.int64)
    np.cumsum(np.bincount(source, minlength=n_values), out=start[1:])
    return _Kind(
        name,
        values,
        start,
        np.concatenate([cols, rows])[order],
        np.concatenate([distance, distance])[order],
    )


def _colours_close(thumbs: list[bytes], rows, cols, tolerance: int) -> np.ndarray:
    """For each pair, whether the thumbnails agree within ``tolerance`` (missing ones agree)."""
    present = np.array([len(t) == THUMBNAIL_BYTES for t in thumbs])
    table = np.zeros((len(thumbs), THUMBNAIL_BYTES), dtype=np.int16)
    if present.any():
        packed = b"".join(t for t in thumbs if len(t) == THUMBNAIL_BYTES)
        table[present] = np.frombuffer(packed, dtype=np.uint8).reshape(-1, THUMBNAIL_BYTES)
    close = np.empty(len(rows), dtype=bool)
    step = 1 << 16
    for lo in range(0, len(rows), step):
        r, c = rows[lo : lo + step], cols[lo : lo + step]
        diff = np.abs(table[r] - table[c]).max(axis=1)
        close[lo : lo + step] = (diff <= tolerance) | ~present[r] | ~present[c]
    return close


def _flat_candidates(x32: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(x32.shape[1])
    index.add(x32)
    # Inner-product range search keeps similarities strictly above the radius.
    lims, _, found = index.range_search(x32, radius)
    rows = np.repeat(np.arange(len(x32)), np.diff(lims).astype(np.int64))
    rows, cols, _ = _ordered(rows, found.astype(np.int64), None)
    return rows, cols


def _ivf_candidates(x32: np.ndarray, radius: float, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs above ``radius`` (float32) that share a probed cell; both orders, duplicates kept."""
    import faiss

    n, d = x32.shape
    nlist = ivf_nlist(n, probes)
    probes = min(probes, nlist)
    if nlist == 1:
        cells = np.zeros((n, 1), dtype=np.int64)
    else:
        rng = np.random.default_rng(_SEED)
        sample = np.sort(rng.choice(n, min(n, _TRAIN_PER_LIST * nlist), replace=False))
        kmeans = faiss.Kmeans(
            d,
            nlist,
            niter=_KMEANS_ITERATIONS,
            spherical=True,
            seed=_SEED,
            # An inverted file only needs a partition, not a converged clustering: a sample of
            # 32 per cell keeps training linear in n (faiss warns below 39 unless told).
            min_points_per_centroid=1,
            max_points_per_centroid=_TRAIN_PER_LIST,
        )
        kmeans.train(x32[sample])
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(kmeans.centroids)
        _, cells = quantizer.search(x32, probes)
    home = cells[:, 0]
    members_order = np.argsort(home, kind="stable")
    members_start = np.searchsorted(home[members_order], np.arange(nlist + 1))
    probed = cells.ravel()
    probe_order = np.argsort(probed, kind="stable")
    probe_start = np.searchsorted(probed[probe_order], np.arange(nlist + 1))
    probe_item = probe_order // cells.shape[1]
    rows, cols = [], []
    for cell in range(nlist):
        members = members_order[members_start[cell] : members_start[cell + 1]]
        queries = probe_item[probe_start[cell] : probe_start[cell + 1]]
        if len(members) and len(queries):
            found = _block_join(x32, queries, members, radius)
            rows.append(found[0])
            cols.append(found[1])
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def _block_join(x32: np.ndarray, queries, members, radius: float):
    """Pairs (query, member) with inner product above ``radius``, in bounded BLAS blocks."""
    rows, cols = [], []
    width = min(len(members), 1 << 13)
    height = max(1, _BLOCK // width)
    for m0 in range(0, len(members), width):
        block = members[m0 : m0 + width]
        right = x32[block].T
        for q0 in range(0, len(queries), height):
            left = queries[q0 : q0 + height]
            r, c = np.nonzero(x32[left] @ right > radius)
            rows.append(left[r])
            cols.append(block[c])
    return np.concatenate(rows), np.concatenate(cols)


def _cosines(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, _BLOCK // (8 * vectors.shape[1]))
    for lo in range(0, len(rows), step):
        a = vectors[rows[lo : lo + step]].astype(np.float64, copy=False)
        b = vectors[cols[lo : lo + step]].astype(np.float64, copy=False)
        out[lo : lo + step] = np.einsum("ij,ij->i", a, b)
    return out


def _ordered(rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None):
    """Pairs as ``i < j``, each once, sorted; self pairs removed."""
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    keep = lo != hi
    lo, hi = lo[keep], hi[keep]
    n = int(hi.max()) + 1 if len(hi) else 1
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], None if values is None else values[keep][first]


def _no_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
