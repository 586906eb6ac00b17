"""How does the embedding near-duplicate search scale, and what does it miss?

For each size ``n``: random unit vectors (float32, ``--dim``), of which ``--dup-rate * n`` are
replaced by perturbed copies of other vectors (cosine about 0.99). The script times
:func:`groundforge.filters.dedup.cosine_pairs` on its approximate path (k-means cells joined
cell by cell) and, up to ``--exact-up-to``, on its exact path (faiss ``IndexFlatIP`` range search
over all pairs), then reports the time per vector, the growth between sizes, and the recall of
the approximate pairs against the exact ones and of the planted pairs. Up to
``--end-to-end-up-to`` it also times :func:`find_duplicates` with only embeddings on (signatures
carry Python tuples, about 16 KiB each at 512-d, so that stops being practical near 1M).

Random vectors have no cluster structure, the hardest case for an inverted file. Run::

    python benchmarks/dedup_scaling.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from dataclasses import replace

import numpy as np

from groundforge.filters.dedup import (
    DedupSettings,
    Signature,
    cosine_pairs,
    find_duplicates,
    ivf_nlist,
)


def make_vectors(n: int, dim: int, dup_rate: float, seed: int):
    """Unit vectors with planted near-duplicates, and the planted pairs ``(i, j)``, ``i < j``."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    step = 1 << 16
    for lo in range(0, n, step):
        block = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
        x[lo : lo + step] = block / np.linalg.norm(block, axis=1, keepdims=True)
    planted = int(round(dup_rate * n))
    chosen = rng.choice(n, 2 * planted, replace=False)
    copies, sources = chosen[:planted], chosen[planted:]
    # Gaussian noise of norm s / sqrt(1 + s^2) away from the source gives cosine 1 / sqrt(1 + s^2).
    scale = math.sqrt(1 / 0.99**2 - 1) / math.sqrt(dim)
    noisy = x[sources] + scale * rng.standard_normal((planted, dim), dtype=np.float32)
    x[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    pairs = np.sort(np.stack([copies, sources], axis=1), axis=1)
    return x, pairs


def pair_set(rows: np.ndarray, cols: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dup-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cosine", type=float, default=DedupSettings.min_cosine)
    parser.add_argument("--probes", type=int, default=DedupSettings.probes)
    parser.add_argument("--exact-up-to", type=int, default=100_000)
    parser.add_argument("--end-to-end-up-to", type=int, default=10_000)
    args = parser.parse_args()

    import faiss

    sizes = [int(s) for s in args.sizes.split(",")]
    approx = DedupSettings(min_cosine=args.min_cosine, probes=args.probes, exact_search_below=0)
    print(
        f"dim {args.dim}, dup rate {args.dup_rate}, min cosine {args.min_cosine}, "
        f"probes {args.probes}, faiss {faiss.__version__} with {faiss.omp_get_max_threads()} "
        "threads"
    )
    header = (
        f"{'n':>9} {'nlist':>6} {'approx s':>9} {'us/item':>8} {'growth':>7} {'exact s':>8} "
        f"{'speedup':>7} {'recall':>7} {'planted':>8} {'pairs':>7} {'e2e s':>7} {'RSS GiB':>7}"
    )
    print(header)
    previous = None
    for n in sizes:
        x, planted = make_vectors(n, args.dim, args.dup_rate, args.seed)
        seconds, (rows, cols, _) = timed(cosine_pairs, x, approx)
        found = pair_set(rows, cols)
        planted_recall = len(found & pair_set(planted[:, 0], planted[:, 1])) / max(1, len(planted))
        growth = "" if previous is None else f"{(seconds / previous[1]) / (n / previous[0]):.2f}"
        exact_s = speedup = recall = ""
        if n <= args.exact_up_to:
            exact = DedupSettings(min_cosine=args.min_cosine, exact_search_below=n + 1)
            exact_seconds, (e_rows, e_cols, _) = timed(cosine_pairs, x, exact)
            truth = pair_set(e_rows, e_cols)
            exact_s, speedup = f"{exact_seconds:.2f}", f"{exact_seconds / seconds:.1f}x"
            recall = f"{len(found & truth) / max(1, len(truth)):.4f}"
            assert found <= truth, "the approximate search reported a pair the exact one did not"
        e2e = ""
        if n <= args.end_to_end_up_to:
            sigs = [Signature(f"{i:08d}", str(i), 0, tuple(v)) for i, v in enumerate(x.tolist())]
            embedding_only = replace(approx, exact=False, perceptual=False)
            e2e = f"{timed(find_duplicates, sigs, embedding_only)[0]:.2f}"
            del sigs
        print(
            f"{n:>9} {ivf_nlist(n, args.probes):>6} {seconds:>9.2f} {1e6 * seconds / n:>8.1f} "
            f"{growth:>7} {exact_s:>8} {speedup:>7} {recall:>7} {planted_recall:>8.4f} "
            f"{len(found):>7} {e2e:>7} {peak_rss_gib():>7.1f}",
            flush=True,
        )
        previous = (n, seconds)
        del x
    print(
        "growth: (time ratio) / (size ratio) against the previous size; 1.0 is linear, "
        "sqrt(size ratio) is n^1.5"
    )


if __name__ == "__main__":
    main()
