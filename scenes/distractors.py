"""Confusable-distractor choice within one domain: which entities share a scene with a target.

A scene asks for one entity among look-alikes. :class:`DistractorIndex` holds one unit vector per
entity of a domain (usually the mean image embedding of its images, :func:`entity_vectors`) and
picks the others for a target: ``"hard"`` takes the most similar entities (Chad next to Romania),
``"easy"`` takes random ones. Every pick comes with its cosine similarity to the target, so a
recipe can record how confusable each scene is.

The index is an exact faiss ``IndexFlatIP`` (inner product on unit vectors = cosine): one query
over 10k entities of 512 dims takes well under a millisecond, and it stays practical up to a few
hundred thousand entities. Beyond that, swap in an approximate index (``IndexHNSWFlat`` with
``METRIC_INNER_PRODUCT``, or ``IndexIVFFlat`` trained on the vectors); :meth:`neighbours` is the
only place that searches.

>>> import random
>>> index = DistractorIndex(["a", "b", "c"], np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))
>>> index.choose("a", 1, "hard", random.Random(0))
[('b', 0.800000011920929)]
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Mode = Literal["hard", "easy"]
MODES = ("hard", "easy")


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def entity_vectors(
    names_per_item: Sequence[str], item_vectors: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """One vector per entity: the L2-normalised mean of its items' vectors.

    ``names_per_item[i]`` is the entity of row ``i`` of ``item_vectors``. Entities come back
    sorted by name (the same entities always give the same rows), with float32 rows; an entity
    whose items cancel out gets a zero row.

    >>> names, vecs = entity_vectors(["b", "a", "b"], np.array([[1.0, 0], [0, 1.0], [0, 1.0]]))
    >>> names, [[round(float(x), 4) for x in row] for row in vecs]
    (['a', 'b'], [[0.0, 1.0], [0.7071, 0.7071]])
    """
    item_vectors = np.asarray(item_vectors, dtype=np.float64)
    if item_vectors.ndim != 2 or item_vectors.shape[0] != len(names_per_item):
        raise ValueError(
            f"expected one row per item: {len(names_per_item)} names, "
            f"vectors of shape {item_vectors.shape}"
        )
    names = sorted(set(names_per_item))
    row = {name: i for i, name in enumerate(names)}
    sums = np.zeros((len(names), item_vectors.shape[1]))
    np.add.at(sums, [row[name] for name in names_per_item], item_vectors)
    counts = np.bincount([row[name] for name in names_per_item], minlength=len(names))
    means = sums / np.maximum(counts, 1)[:, None]
    return names, _unit_rows(means)


class DistractorIndex:
    """Nearest entities of one domain by cosine similarity (see the module docstring).

    ``names`` must be unique; ``vectors`` holds one row per name and is L2-normalised here (a
    zero row stays zero and is similar to nothing). Pickles as names and unit vectors, which
    load back bit for bit (normalising them again could move their last bits); the faiss index
    is rebuilt on load.
    """

    def __init__(self, names: Sequence[str], vectors: np.ndarray):
        names = list(names)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise ValueError(
                f"expected one row per name: {len(names)} names, vectors of shape {vectors.shape}"
            )
        if vectors.shape[1] == 0:
            raise ValueError("vectors must have at least one dimension")
        self._row = {name: i for i, name in enumerate(names)}
        if len(self._row) != len(names):
            repeated = sorted(n for n, k in Counter(names).items() if k > 1)
            raise ValueError(f"entity names must be unique; repeated: {repeated[:10]}")
        self.names = names
        self.vectors = _unit_rows(vectors)
        self._index = self._build()

    def _build(self) -> Any:
        import faiss

        index = faiss.IndexFlatIP(self.vectors.shape[1])
        index.add(self.vectors)
        return index

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._row

    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "vectors": self.vectors}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.names = state["names"]
        self._row = {name: i for i, name in enumerate(self.names)}
        self.vectors = state["vectors"]
        self._index = self._build()

    def _index_of(self, name: str) -> int:
        try:
            return self._row[name]
        except KeyError:
            raise KeyError(f"unknown entity {name!r}; the index holds {len(self)}") from None

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two entities."""
        return float(self.vectors[self._index_of(a)] @ self.vectors[self._index_of(b)])

    def _with_similarity(self, target: int, rows: Sequence[int]) -> list[tuple[str, float]]:
        # Computed here rather than taken from faiss, so hard and easy picks of the same pair
        # report the same number.
        sims = self.vectors[list(rows)] @ self.vectors[target] if rows else []
        return [(self.names[r], float(s)) for r, s in zip(rows, sims, strict=True)]

    def _nearest_rows(self, target: int, count: int) -> list[int]:
        count = min(count, len(self) - 1)
        if count <= 0:
            return []
        # One extra result, since the target usually finds itself first.
        _, found = self._index.search(self.vectors[target : target + 1], count + 1)
        rows = [int(r) for r in found[0] if r >= 0 and r != target][:count]
        sims = self.vectors[rows] @ self.vectors[target]
        # Ties in index order, so equal inputs give equal picks.
        return [r for _, r in sorted(zip(-sims, rows, strict=True))]

    def neighbours(self, name: str, count: int) -> list[tuple[str, float]]:
        """The ``count`` entities most similar to ``name`` (never itself), most similar first.

        Fewer when the index holds fewer others.
        """
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        target = self._index_of(name)
        return self._with_similarity(target, self._nearest_rows(target, count))

    def choose(
        self,
        target: str,
        count: int,
        mode: Mode,
        rng: random.Random,
        pool: int | None = None,
    ) -> list[tuple[str, float]]:
        """``count`` distractors for ``target``, each with its cosine similarity to it.

        ``"hard"``: the ``count`` nearest neighbours; with ``pool``, a random ``count`` among
        the ``pool`` nearest (variety across scenes of one target, still confusable). The
        default (``None``) takes exactly the nearest and leaves ``rng`` untouched; a ``pool``
        smaller than ``count`` acts as ``count``. Hard picks come most similar first.
        ``"easy"``: ``count`` others drawn uniformly at random, in draw order.

        Never the target, never a name twice; all others when fewer than ``count`` exist.
        The same ``rng`` state gives the same picks.

        >>> index = DistractorIndex(["a", "b", "c"], np.eye(3))
        >>> sorted(name for name, _ in index.choose("a", 5, "easy", random.Random(1)))
        ['b', 'c']
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        if pool is not None and pool < 1:
            raise ValueError(f"pool must be at least 1 or None, got {pool}")
        row = self._index_of(target)
        others = len(self) - 1
        count = min(count, others)
        if mode == "hard":
            nearest = self._nearest_rows(row, count if pool is None else max(pool, count))
            if len(nearest) > count:
                picked = set(rng.sample(nearest, count))
                nearest = [r for r in nearest if r in picked]
            return self._with_similarity(row, nearest)
        # Draw among the others' positions 0..others-1 and skip over the target's row:
        # uniform, and O(count) instead of a list of every other entity.
        drawn = rng.sample(range(others), count)
        return self._with_similarity(row, [r + (r >= row) for r in drawn])
