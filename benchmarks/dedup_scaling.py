"""How does run-wide dedup's banded search scale, and what does it miss?

For each size ``n``, two collections are searched the way ``pipelines/dedup.py`` searches them:
every item is filed under its band keys (:func:`phash_bands`, :func:`embedding_bands`), the
members of each band group are compared all-pairs, a group bigger than ``--chunk-size`` chunk
pair by chunk pair (:func:`split`, :func:`chunk_pairs`), and every comparison is the pipeline's
own verification (:func:`perceptual_pairs`, :func:`embedding_pairs`: a pair is compared only
in the first band it shares). Only the grouping differs: a numpy sort per band here, a
``GroupByKey`` in the pipeline.

- hashes: random 64-bit pHashes, ``--hash-dup-rate`` near-copies (1 to ``max_hamming`` bits
  flipped), and ``--crowd-rate`` items with one identical hash (blank images);
- embeddings: random unit vectors (``--dim``, float32), ``--dup-rate`` near-copies (cosine
  about 0.99), and ``--crowd-rate`` items with one identical vector.

Printed per size and kind: the search time, per item, and its ratio to the previous size (aim:
at most 12x per decade); the recall of the verified pairs against an exact all-pairs search
(faiss, up to ``--exact-up-to``) and of the planted pairs; the largest band group, and the
largest element a global step holds (the members of one chunk pair). Random vectors have no
cluster structure; real embeddings crowd together and share bands more often. Run::

    python benchmarks/dedup_scaling.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np

from groundforge.filters.dedup import (
    DedupSettings,
    chunk_pairs,
    embedding_bands,
    embedding_pairs,
    perceptual_pairs,
    phash_bands,
    simhash_parameters,
    split,
)


def make_vectors(n: int, dim: int, dup_rate: float, crowd_rate: float, seed: int):
    """Unit vectors with planted near-copies and a crowd of identical ones; the planted pairs."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    step = 1 << 16
    for lo in range(0, n, step):
        block = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
        x[lo : lo + step] = block / np.linalg.norm(block, axis=1, keepdims=True)
    planted, crowd = int(round(dup_rate * n)), int(round(crowd_rate * n))
    chosen = rng.choice(n, 2 * planted + crowd, replace=False)
    copies, sources = chosen[:planted], chosen[planted : 2 * planted]
    # Gaussian noise of norm s / sqrt(1 + s^2) away from the source gives cosine 1 / sqrt(1 + s^2).
    scale = math.sqrt(1 / 0.99**2 - 1) / math.sqrt(dim)
    noisy = x[sources] + scale * rng.standard_normal((planted, dim), dtype=np.float32)
    x[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    x[chosen[2 * planted :]] = x[chosen[-1]]
    return x, np.sort(np.stack([copies, sources], axis=1), axis=1)


def make_codes(n: int, max_hamming: int, dup_rate: float, crowd_rate: float, seed: int):
    """Random 64-bit codes with planted near-copies and a crowd of one code; the planted pairs."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    planted, crowd = int(round(dup_rate * n)), int(round(crowd_rate * n))
    chosen = rng.choice(n, 2 * planted + crowd, replace=False)
    copies, sources = chosen[:planted], chosen[planted : 2 * planted]
    for item, source in zip(copies, sources, strict=True):
        flips = rng.choice(64, int(rng.integers(1, max_hamming + 1)), replace=False)
        codes[item] = codes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    codes[chosen[2 * planted :]] = codes[chosen[-1]]
    return codes, np.sort(np.stack([copies, sources], axis=1), axis=1)


def banded_search(bands: np.ndarray, compare, chunk_size: int):
    """Verified pairs ``i * n + j`` (``i < j``) of a banded search, the largest band group and
    the largest element (members of one chunk pair)."""
    n = len(bands)
    found, largest_group, largest_element = [], 1, 1
    for band in range(bands.shape[1]):
        values = bands[:, band]
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], n]
        # A group of one compares nothing: in the pipeline it is one GroupByKey output, done.
        crowded = ends - starts > 1
        for start, end in zip(starts[crowded].tolist(), ends[crowded].tolist(), strict=True):
            members = order[start:end]
            largest_group = max(largest_group, len(members))
            chunks = [np.asarray(c) for c in split(members, chunk_size)]
            for i, j in chunk_pairs(len(chunks)):
                left, right = chunks[i], None if i == j else chunks[j]
                largest_element = max(largest_element, len(left) + (len(right) if j > i else 0))
                rows, cols, _ = compare(left, right, band)
                a, b = left[rows], (left if right is None else right)[cols]
                found.append(np.minimum(a, b) * n + np.maximum(a, b))
    pairs = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    return pairs, largest_group, largest_element


def exact_hash_pairs(codes: np.ndarray, max_hamming: int) -> np.ndarray:
    import faiss

    data = codes.astype(">u8").view(np.uint8).reshape(len(codes), 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(data)
    # Binary range search keeps distances strictly below the radius.
    lims, _, found = index.range_search(data, max_hamming + 1)
    return _as_pairs(np.diff(lims), found, len(codes))


def exact_cosine_pairs(x: np.ndarray, min_cosine: float) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, found = index.range_search(x, min_cosine - 1e-3)
    rows = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    cols = found.astype(np.int64)
    cosines = np.einsum("ij,ij->i", x[rows].astype(np.float64), x[cols].astype(np.float64))
    keep = cosines >= min_cosine
    rows, cols = rows[keep], cols[keep]
    return _as_pairs(None, cols, len(x), rows)


def _as_pairs(counts, cols, n, rows=None) -> np.ndarray:
    if rows is None:
        rows = np.repeat(np.arange(n), counts.astype(np.int64))
    cols = cols.astype(np.int64)
    keep = rows != cols
    lo, hi = np.minimum(rows, cols)[keep], np.maximum(rows, cols)[keep]
    return np.unique(lo * n + hi)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return len(np.intersect1d(found, truth, assume_unique=True)) / max(1, len(truth))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dup-rate", type=float, default=0.01)
    parser.add_argument("--hash-dup-rate", type=float, default=0.05)
    parser.add_argument("--crowd-rate", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cosine", type=float, default=DedupSettings.min_cosine)
    parser.add_argument("--max-hamming", type=int, default=DedupSettings.max_hamming)
    parser.add_argument("--chunk-size", type=int, default=DedupSettings.chunk_size)
    parser.add_argument("--exact-up-to", type=int, default=100_000)
    parser.add_argument("--kinds", default="perceptual,embedding")
    args = parser.parse_args()

    import faiss

    settings = DedupSettings(
        max_hamming=args.max_hamming,
        # Random codes have no thumbnails: the hash alone decides.
        max_colour_difference=None,
        min_cosine=args.min_cosine,
        chunk_size=args.chunk_size,
    )
    bits, bands = simhash_parameters(settings.min_cosine, settings.recall, settings.max_bands)
    print(
        f"perceptual: {settings.max_hamming + 1} bands, max hamming {settings.max_hamming}, "
        f"dup rate {args.hash_dup_rate}; embedding: dim {args.dim}, {bands} bands of {bits} "
        f"bits, min cosine {settings.min_cosine}, dup rate {args.dup_rate}; crowd rate "
        f"{args.crowd_rate}, chunk size {settings.chunk_size}; faiss {faiss.__version__} with "
        f"{faiss.omp_get_max_threads()} threads"
    )
    header = (
        f"{'kind':<10} {'n':>9} {'bands s':>8} {'total s':>8} {'us/item':>8} {'x prev':>7} "
        f"{'exact s':>8} {'recall':>7} {'planted':>8} {'pairs':>8} {'group':>6} {'element':>7} "
        f"{'RSS GiB':>7}"
    )
    print(header)
    previous: dict[str, tuple[int, float]] = {}
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            if kind == "perceptual":
                codes, planted = make_codes(
                    n, settings.max_hamming, args.hash_dup_rate, args.crowd_rate, args.seed
                )
                start = time.perf_counter()
                keys = phash_bands(codes, settings.max_hamming)

                def compare(left, right, band, codes=codes):
                    return perceptual_pairs(
                        codes[left], (), None if right is None else codes[right], (), band, settings
                    )

                def truth_of(codes=codes):
                    return exact_hash_pairs(codes, settings.max_hamming)
            else:
                x, planted = make_vectors(n, args.dim, args.dup_rate, args.crowd_rate, args.seed)
                start = time.perf_counter()
                keys = embedding_bands(x, settings)

                def compare(left, right, band, x=x, keys=keys):
                    return embedding_pairs(
                        x[left],
                        keys[left],
                        None if right is None else x[right],
                        None if right is None else keys[right],
                        band,
                        settings.min_cosine,
                    )

                def truth_of(x=x):
                    return exact_cosine_pairs(x, settings.min_cosine)

            banded = time.perf_counter() - start
            found, group, element = banded_search(keys, compare, settings.chunk_size)
            seconds = time.perf_counter() - start
            planted_pairs = np.unique(planted[:, 0] * n + planted[:, 1])
            ratio = ""
            if kind in previous:
                ratio = f"{seconds / previous[kind][1]:.1f}x"
            exact_s = vs_exact = ""
            if n <= args.exact_up_to:
                began = time.perf_counter()
                truth = truth_of()
                exact_s = f"{time.perf_counter() - began:.2f}"
                vs_exact = f"{recall(found, truth):.4f}"
                extra = np.setdiff1d(found, truth, assume_unique=True)
                assert not len(extra), "the banded search reported a pair the exact one did not"
            print(
                f"{kind:<10} {n:>9} {banded:>8.2f} {seconds:>8.2f} {1e6 * seconds / n:>8.1f} "
                f"{ratio:>7} {exact_s:>8} {vs_exact:>7} {recall(found, planted_pairs):>8.4f} "
                f"{len(found):>8} {group:>6} {element:>7} {peak_rss_gib():>7.1f}",
                flush=True,
            )
            previous[kind] = (n, seconds)
    print(
        "x prev: time over the previous size's time; group: members of the largest band group "
        "(streamed); element: members of the largest chunk pair (held)"
    )


if __name__ == "__main__":
    main()
