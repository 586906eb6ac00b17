"""Keep benchmark images out of training data.

A :class:`BenchmarkIndex` holds, for every distinct benchmark image, its 64-bit pHash and 4x4
colour thumbnail (taken without the image's frame, and of the whole image too when a frame was
trimmed: :func:`~groundforge.filters.dedup.fingerprints`), its look for pixel comparison
(:mod:`groundforge.filters.sameimage`) and, when built with an ``embed`` callable, its
L2-normalised embedding. :func:`check_contamination` is the filter: hashes, colour layouts and
embeddings propose benchmark images a record may copy, and a record is dropped as
``contaminated`` when the pixels confirm one.

Benchmark images are normalised exactly like training images (:func:`check_image`: EXIF
rotation, transparency on white, RGB) before they are hashed or embedded, so both sides are
compared on the same pixels. An image shared by several benchmark rows (KVG-Bench asks several
questions about one image) is indexed once, under the id of its first row.

In a pipeline, build the index in a DoFn's ``setup`` from the benchmark's path (531 photos of
1024x768 hash in about 5 s on one core, plus the embedder's time), or build it once on the
driver and ship it: it pickles as plain arrays (the faiss index is rebuilt on first use).

>>> index = BenchmarkIndex.from_parquet("kvg-bench/test.parquet")      # doctest: +SKIP
>>> check_contamination(record, index).reason                           # doctest: +SKIP
'contaminated'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from groundforge.filters.dedup import THUMBNAIL_BYTES, fingerprints, layout_vector
from groundforge.filters.image import ImageLimits, check_image
from groundforge.filters.sameimage import DEFAULT_SAME, Look, SameSettings, look_of, same_picture
from groundforge.filters.verdict import Verdict
from groundforge.outputs.files import has_files, is_local, list_files, read_bytes, relative_to
from groundforge.pixels import image_bytes
from groundforge.schemas.records import ImageRecord, sha256_hex
from groundforge.sources.image_folder import IMAGE_EXTENSIONS

Embed = Callable[[list[bytes]], np.ndarray]

# Benchmark images are taken as they are: no size limits beyond PIL's own bomb guard.
_BENCHMARK_LIMITS = ImageLimits(min_side=1, max_pixels=1 << 40)


class BenchmarkIndex:
    """Perceptual hashes, colour thumbnails and optional embeddings of benchmark images.

    ``ids[i]`` names image ``i``; ``embeddings`` is float32 ``(n, d)`` or None. ``phashes``
    (uint64) and ``thumbnails`` (uint8, 48 per row) hold one row per view, ``owners`` the image
    of each row (default: one row per image).

    >>> index = BenchmarkIndex.from_images(["q1"], [png_bytes])          # doctest: +SKIP
    >>> len(index), index.ids                                            # doctest: +SKIP
    (1, ('q1',))
    """

    def __init__(
        self,
        ids: Sequence[str],
        phashes: np.ndarray,
        thumbnails: np.ndarray,
        embeddings: np.ndarray | None = None,
        looks: Sequence[Look] | None = None,
        owners: Sequence[int] | None = None,
    ) -> None:
        self.ids = tuple(ids)
        self.phashes = np.asarray(phashes, dtype=np.uint64)
        self.thumbnails = np.asarray(thumbnails, dtype=np.uint8).reshape(-1, THUMBNAIL_BYTES)
        self.owners = np.arange(len(self.ids)) if owners is None else np.asarray(owners, np.int64)
        self.embeddings = None if embeddings is None else _unit_rows(embeddings, "benchmark")
        self.looks = None if looks is None else tuple(looks)
        self.layouts = np.array([layout_vector(bytes(t)) for t in self.thumbnails]).reshape(
            len(self.thumbnails), THUMBNAIL_BYTES
        )
        if not len(self.phashes) == len(self.thumbnails) == len(self.owners):
            raise ValueError("hashes, thumbnails and owners differ in length")
        if len(self.owners) and not 0 <= self.owners.min() <= self.owners.max() < len(self.ids):
            raise ValueError("owners must index ids")
        sizes = {len(self.ids), len(np.unique(self.owners))}
        if self.embeddings is not None:
            sizes.add(len(self.embeddings))
        if self.looks is not None:
            sizes.add(len(self.looks))
        if len(sizes) != 1:
            raise ValueError(f"ids, hashes, looks and embeddings differ in length: {sizes}")
        self._faiss = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_faiss": None}

    @classmethod
    def from_images(
        cls, ids: Sequence[str], images: Sequence[bytes], embed: Embed | None = None
    ) -> BenchmarkIndex:
        """Index ``images`` (encoded bytes) under ``ids``; identical bytes are indexed once.

        Raises ValueError naming the first image that cannot be decoded.
        """
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        seen: set[str] = set()
        kept_ids, normalised = [], []
        for item_id, data in zip(ids, images, strict=True):
            digest = sha256_hex(data)
            if digest in seen:
                continue
            seen.add(digest)
            kept_ids.append(str(item_id))
            normalised.append(_normalise(str(item_id), data))
        if not normalised:
            raise ValueError("no benchmark images to index")
        prints = [(i, view) for i, d in enumerate(normalised) for view in fingerprints(d)]
        phashes = np.array([phash for _, (phash, _) in prints], dtype=np.uint64)
        thumbs = np.frombuffer(b"".join(thumb for _, (_, thumb) in prints), dtype=np.uint8)
        owners = [i for i, _ in prints]
        embeddings = None if embed is None else np.asarray(embed(normalised))
        if embeddings is not None and embeddings.shape[0] != len(normalised):
            raise ValueError(f"embed returned {embeddings.shape[0]} rows for {len(normalised)}")
        looks = [look_of(d) for d in normalised]
        return cls(kept_ids, phashes, thumbs, embeddings, looks, owners)

    @classmethod
    def from_parquet(
        cls,
        path: str | os.PathLike,
        image_column: str = "image",
        id_column: str | None = "question_id",
        embed: Embed | None = None,
    ) -> BenchmarkIndex:
        """Index a KVG-Bench-format parquet file (or a folder of them, in name order).

        ``image_column`` holds a struct with ``bytes`` (the Hugging Face Image encoding; a row
        without bytes is read from its ``path``, relative to the parquet file) or plain binary.
        Ids come from ``id_column`` when the file has it, else from the row number.
        """
        import pyarrow.parquet as pq

        root = str(path)
        files = [root] if _is_file(root) else list_files(FileSystems.join(root, "*.parquet"))
        if not files:
            raise ValueError(f"no .parquet files in {root}")
        ids: list[str] = []
        images: list[bytes] = []
        for file in files:
            with FileSystems.open(file, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
                parquet = pq.ParquetFile(fh)
                names = parquet.schema_arrow.names
                if image_column not in names:
                    raise ValueError(f"{file} has no column {image_column!r} (columns: {names})")
                has_ids = id_column is not None and id_column in names
                columns = [image_column, id_column] if has_ids else [image_column]
                table = parquet.read(columns=columns)
            row_ids = table.column(id_column).to_pylist() if has_ids else [None] * len(table)
            folder = FileSystems.split(file)[0]
            for cell, row_id in zip(table.column(image_column).to_pylist(), row_ids, strict=True):
                label = str(len(ids)) if row_id is None else str(row_id)
                ids.append(label)
                images.append(_cell_bytes(cell, folder, label))
        return cls.from_images(ids, images, embed)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, embed: Embed | None = None) -> BenchmarkIndex:
        """Index every image file under ``path`` (hidden names skipped); ids are relative paths."""
        root = str(path).rstrip("/")
        files = [
            rel
            for rel in (relative_to(p, root) for p in list_files(FileSystems.join(root, "**")))
            if PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in PurePosixPath(rel).parts)
        ]
        if not files:
            raise ValueError(f"no image files under {root}")
        images = [read_bytes(FileSystems.join(root, f)) for f in files]
        return cls.from_images(files, images, embed)

    def candidates(
        self,
        phash: int,
        thumbnail: bytes,
        embedding: Sequence[float] | None,
        settings: CandidateSettings,
        views: Sequence[tuple[int, bytes]] = (),
    ) -> list[tuple[int, str, float]]:
        """``(index, kind, distance)`` of every benchmark image the record may copy, best first:
        pHash within ``max_hamming`` bits, colour layout at ``layout_cosine`` or more (either
        against any view of a benchmark image, the record's own ``views`` beside ``phash`` and
        ``thumbnail``), and embedding at ``min_cosine`` or more (when both sides have one); one
        row per image, its best kind (perceptual > layout > embedding), then the nearest, then
        the lowest index."""
        best: dict[tuple[str, int], float] = {}

        def offer(rows, kind, distances):
            for i, d in zip(self.owners[rows].tolist(), distances.tolist(), strict=True):
                best[(kind, i)] = min(float(d), best.get((kind, i), float("inf")))

        for own_hash, own_thumbnail in ((phash, thumbnail), *views):
            bits = np.bitwise_count(self.phashes ^ np.uint64(own_hash)).astype(np.int64)
            near = np.flatnonzero(bits <= settings.max_hamming)
            offer(near, "perceptual", bits[near])
            layout = layout_vector(own_thumbnail)
            if layout.any():
                cosines = self.layouts @ layout
                rows = np.flatnonzero(cosines >= settings.layout_cosine)
                offer(rows, "layout", 1.0 - cosines[rows])
        if embedding is not None and self.embeddings is not None:
            vectors = self.embeddings.astype(np.float64)
            cosines = vectors @ _query(embedding, self.embeddings)
            # A zero row (an image the embedder could not describe) matches nothing.
            described = np.linalg.norm(vectors, axis=1) > 1e-6
            rows = np.flatnonzero(described & (cosines >= settings.min_cosine))
            for i in rows.tolist():
                best[("embedding", i)] = 1.0 - float(cosines[i])
        order = {"perceptual": 0, "layout": 1, "embedding": 2}
        found: dict[int, tuple[int, str, float]] = {}
        for (kind, i), d in sorted(best.items(), key=lambda c: (order[c[0][0]], c[1], c[0][1])):
            found.setdefault(i, (i, kind, d))
        return list(found.values())

    def nearest_embedding(self, embedding: Sequence[float]) -> tuple[int, float]:
        """(index, cosine) of the most similar benchmark embedding, the cosine in float64."""
        if self.embeddings is None:
            raise ValueError("this benchmark index was built without embeddings")
        query = _query(embedding, self.embeddings)
        if self._faiss is None:
            import faiss

            index = faiss.IndexFlatIP(self.embeddings.shape[1])
            index.add(self.embeddings)
            self._faiss = index
        _, found = self._faiss.search(query[None].astype(np.float32), 1)
        best = int(found[0, 0])
        return best, float(self.embeddings[best].astype(np.float64) @ query)


@dataclass(frozen=True)
class CandidateSettings:
    """Which benchmark images a record is compared with (:meth:`BenchmarkIndex.candidates`).

    Looser than dedup's: here a false candidate costs one comparison of pixels, a missed one
    leaks the benchmark.
    """

    max_hamming: int = 6
    layout_cosine: float = 0.9
    min_cosine: float = 0.95


def check_contamination(
    record: ImageRecord,
    index: BenchmarkIndex,
    candidates: CandidateSettings = CandidateSettings(),
    same: SameSettings = DEFAULT_SAME,
) -> Verdict:
    """Drop ``contaminated`` when the record's image shows a benchmark image.

    Candidates come from hashes, colour layouts and embeddings (:class:`CandidateSettings`);
    each is verified, best first, by comparing the two images (:func:`same_picture`) when the
    index holds their looks (built from images, it does). Drop metrics: ``benchmark_id``,
    ``kind``, ``distance`` and ``block_difference``; keep metrics: how many ``candidates`` were
    compared and the smallest ``block_difference`` among them.

    >>> v = check_contamination(record, index)                           # doctest: +SKIP
    >>> v.reason, v.metrics["benchmark_id"], v.metrics["kind"]           # doctest: +SKIP
    ('contaminated', '1042', 'perceptual')
    """
    data = image_bytes(record)
    (phash, thumbnail), *views = fingerprints(data)
    found = index.candidates(phash, thumbnail, record.embedding, candidates, views)
    own = look_of(data) if found and index.looks is not None else None
    nearest = None
    for i, kind, distance in found:
        difference = None
        if own is not None:
            outcome = same_picture(index.looks[i], own, same)
            difference = outcome.block_difference
            nearest = difference if nearest is None else min(nearest, difference)
            if not outcome.same:
                continue
        return Verdict.drop(
            "contaminated",
            benchmark_id=index.ids[i],
            kind=kind,
            distance=distance,
            block_difference=difference,
        )
    return Verdict.ok(candidates=len(found), block_difference=nearest)


def _query(embedding: Sequence[float], embeddings: np.ndarray) -> np.ndarray:
    query = np.asarray(embedding, dtype=np.float64)
    if query.shape != (embeddings.shape[1],):
        raise ValueError(
            f"embedding has {query.size} values, the benchmark index "
            f"{embeddings.shape[1]}: were both made by one embedder?"
        )
    return query


def _normalise(item_id: str, data: bytes) -> bytes:
    """The bytes a training record would carry after the image check."""
    verdict = check_image(ImageRecord(item_id, data, 0, 0, ""), _BENCHMARK_LIMITS)
    if not verdict.keep:
        raise ValueError(f"benchmark image {item_id!r} is unusable: {verdict.reason}")
    return verdict.value.image


def _cell_bytes(cell, folder: str, label: str) -> bytes:
    if isinstance(cell, bytes):
        return cell
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            file = FileSystems.join(folder, cell["path"])
            if _is_file(file):
                return read_bytes(file)
            raise ValueError(f"benchmark row {label}: image file {file} not found")
    raise ValueError(f"benchmark row {label} has no image bytes")


def _name(path: str) -> str:
    """A benchmark's name in ids: the last part of its path."""
    return FileSystems.split(str(path).rstrip("/"))[1]


def _is_file(path: str) -> bool:
    """Whether ``path`` names one file (on an object store: one object), not a folder."""
    if is_local(path):
        return os.path.isfile(path)
    return FileSystems.exists(path)


def _unit_rows(embeddings: np.ndarray, what: str) -> np.ndarray:
    rows = np.ascontiguousarray(embeddings, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"{what} embeddings must be a 2-d array, got shape {rows.shape}")
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    # A zero row (an image the embedder cannot describe) is allowed: it matches nothing.
    if np.any((norms > 1e-6) & (np.abs(norms - 1.0) > 1e-3)):
        raise ValueError(f"{what} embeddings must be L2-normalised")
    return rows


def load_benchmark(path: str | os.PathLike, embed: Embed | None = None) -> BenchmarkIndex:
    """A benchmark given by path: a parquet file or a folder of parquet files (KVG-Bench format),
    or a folder of images."""
    root = str(path)
    if _is_file(root) or list_files(FileSystems.join(root, "*.parquet")):
        return BenchmarkIndex.from_parquet(root, embed=embed)
    if not has_files(root):
        raise ValueError(f"benchmark {root} does not exist; give a parquet file or a folder")
    return BenchmarkIndex.from_folder(root, embed)


def merge_indexes(named: Sequence[tuple[str, BenchmarkIndex]]) -> BenchmarkIndex:
    """One index over several benchmarks; ids become ``<benchmark name>:<id>``."""
    with_embeddings = [index.embeddings is not None for _, index in named]
    if any(with_embeddings) and not all(with_embeddings):
        raise ValueError("either every benchmark index has embeddings or none has")
    starts = np.cumsum([0] + [len(index) for _, index in named])[:-1]
    owners = [index.owners + start for (_, index), start in zip(named, starts, strict=True)]
    return BenchmarkIndex(
        [f"{name}:{item}" for name, index in named for item in index.ids],
        np.concatenate([index.phashes for _, index in named]),
        np.concatenate([index.thumbnails for _, index in named]),
        np.concatenate([index.embeddings for _, index in named]) if all(with_embeddings) else None,
        [look for _, index in named for look in index.looks]
        if all(index.looks is not None for _, index in named)
        else None,
        np.concatenate(owners),
    )


_LOADED: dict[tuple, BenchmarkIndex] = {}


@dataclass(frozen=True)
class ContaminationCheck:
    """The decontamination filter of a run, as one picklable callable.

    The benchmark index is built on first use in each worker process (and kept for the
    process), not shipped with the pipeline: benchmark images never travel through the graph.
    ``embedder`` is an image-embedder spec (``annotators/embed.py``) for embedding matches; it
    must be the run's own embedder, so both sides are comparable.
    """

    benchmarks: tuple[str, ...]
    candidates: CandidateSettings = CandidateSettings()
    same: SameSettings = DEFAULT_SAME
    embedder: str | None = None

    def index(self) -> BenchmarkIndex:
        key = (self.benchmarks, self.embedder)
        if key not in _LOADED:
            embed = None
            if self.embedder is not None:
                from groundforge.annotators.embed import make_image_embedder

                embed = make_image_embedder(self.embedder).embed_images
            named = [(_name(p), load_benchmark(p, embed)) for p in self.benchmarks]
            _LOADED[key] = merge_indexes(named)
        return _LOADED[key]

    def __call__(self, record: ImageRecord) -> Verdict:
        return check_contamination(record, self.index(), self.candidates, self.same)
