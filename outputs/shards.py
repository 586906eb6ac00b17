"""Deterministic sharded writing of samples, laid out so ``datasets`` opens the folder directly.

Layout (``arrow``, the default)::

    shards/dataset_dict.json            {"splits": [...]}
    shards/<split>/data-00000-of-00002.arrow
    shards/<split>/state.json           what datasets.load_from_disk reads
    shards/<split>/dataset_info.json    the features (``image`` decodes to PIL)

With ``parquet`` the same folders hold ``.parquet`` files for ``load_dataset("parquet", ...)``.

A sample's shard is a hash of its ``sample_id`` and rows are sorted by id inside a shard, so the
same samples give byte-identical shards whichever runner, worker count or order produced them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from groundforge.outputs.files import (
    EXTENSIONS,
    TableFormat,
    count_rows,
    file_sha256,
    has_files,
    list_files,
    read_table,
    write_table,
    write_text,
)
from groundforge.pixels import with_pixels
from groundforge.schemas.arrow import (
    hf_features_dict,
    row_to_sample,
    sample_schema,
    sample_to_row,
)

_NAME = re.compile(r"data-(\d{5})-of-(\d{5})\.(arrow|parquet)$")


@dataclass(frozen=True)
class ShardFile:
    split: str
    path: str
    rows: int
    bytes: int
    sha256: str


def shard_name(index: int, count: int, fmt: TableFormat) -> str:
    return f"data-{index:05d}-of-{count:05d}.{EXTENSIONS[fmt]}"


def shard_count(rows: int, rows_per_shard: int) -> int:
    return max(1, math.ceil(rows / rows_per_shard))


def shard_index(sample_id: str, count: int) -> int:
    """Stable shard of a sample: the same id always lands in the same shard of ``count``."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:15], 16) % count


def _assign(split_sample, counts, rows_per_shard):
    split, sample = split_sample
    count = shard_count(counts[split], rows_per_shard)
    return (split, shard_index(sample.sample_id, count), count), sample


def _write_shard(group, shards_dir: str, fmt: TableFormat) -> tuple[str, str, int]:
    (split, index, count), samples = group
    # Samples arrive with parked pixels; each row loads its image only as it is written.
    rows = (sample_to_row(with_pixels(s)) for s in sorted(samples, key=lambda s: s.sample_id))
    path = FileSystems.join(shards_dir, split, shard_name(index, count, fmt))
    return split, path, write_table(path, rows, sample_schema(), fmt)


class WriteShards(beam.PTransform):
    """Write a PCollection of :class:`KVGSample` into per-split shards of about
    ``rows_per_shard`` rows. Emits ``(split, path, rows)`` per file written."""

    def __init__(self, shards_dir: str, fmt: TableFormat = "arrow", rows_per_shard: int = 1000):
        super().__init__()
        self.shards_dir = shards_dir
        self.fmt = fmt
        self.rows_per_shard = rows_per_shard

    def expand(self, samples):
        keyed = samples | "key by split" >> beam.Map(lambda s: (s.split, s))
        counts = keyed | "count per split" >> beam.combiners.Count.PerKey()
        return (
            keyed
            | "assign shard"
            >> beam.Map(
                _assign, counts=beam.pvalue.AsDict(counts), rows_per_shard=self.rows_per_shard
            )
            | "group shard" >> beam.GroupByKey()
            | "write shard" >> beam.Map(_write_shard, self.shards_dir, self.fmt)
        )


def _fill_missing(split_dir: str, fmt: TableFormat) -> None:
    """Write 0-row shards for indices that received no sample, so names stay consistent."""
    found = [(_NAME.search(p), p) for p in list_files(FileSystems.join(split_dir, "data-*"))]
    found = [(m, p) for m, p in found if m]
    counts = {int(m.group(2)) for m, _ in found}
    if len(counts) > 1:
        raise RuntimeError(f"{split_dir} mixes shard counts {sorted(counts)}; clear it and rerun")
    count = counts.pop() if counts else 1
    present = {int(m.group(1)) for m, _ in found}
    for index in range(count):
        if index not in present:
            path = FileSystems.join(split_dir, shard_name(index, count, fmt))
            write_table(path, [], sample_schema(), fmt)


def _split_files(split_dir: str, fmt: TableFormat) -> list[str]:
    return list_files(FileSystems.join(split_dir, f"data-*.{EXTENSIONS[fmt]}"))


def finalize_shards(
    shards_dir: str, splits: list[str], fmt: TableFormat = "arrow"
) -> list[ShardFile]:
    """After the pipeline: complete every split folder and write the ``datasets`` metadata.

    ``splits`` are the splits the recipe can produce; each exists afterwards, with one 0-row
    shard when no sample reached it. Returns every shard with its rows and sha256.
    """
    names = sorted(set(splits) | splits_on_disk(shards_dir, fmt))
    shards: list[ShardFile] = []
    features = hf_features_dict(sample_schema())
    for split in names:
        split_dir = FileSystems.join(shards_dir, split)
        _fill_missing(split_dir, fmt)
        files = _split_files(split_dir, fmt)
        for path in files:
            sha, size = file_sha256(path)
            shards.append(ShardFile(split, path, count_rows(path, fmt), size, sha))
        if fmt == "arrow":
            fingerprint = hashlib.sha256(
                "".join(s.sha256 for s in shards if s.split == split).encode()
            ).hexdigest()[:16]
            state = {
                "_data_files": [{"filename": p.rsplit("/", 1)[-1]} for p in files],
                "_fingerprint": fingerprint,
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": split,
            }
            info = {
                "citation": "",
                "description": "",
                "features": features,
                "homepage": "",
                "license": "",
            }
            write_text(FileSystems.join(split_dir, "state.json"), json.dumps(state, indent=2))
            write_text(FileSystems.join(split_dir, "dataset_info.json"), json.dumps(info, indent=2))
    if fmt == "arrow":
        write_text(FileSystems.join(shards_dir, "dataset_dict.json"), json.dumps({"splits": names}))
    return shards


def splits_on_disk(shards_dir: str, fmt: TableFormat) -> set[str]:
    """The splits that have shards of format ``fmt`` under ``shards_dir``."""
    pattern = FileSystems.join(shards_dir, "*", f"data-*.{EXTENSIONS[fmt]}")
    return {p.rstrip("/").rsplit("/", 2)[-2] for p in list_files(pattern)}


def shards_folder(path: str | os.PathLike) -> str:
    """A run folder's ``shards/``, or ``path`` itself when it is a shards folder (any
    ``FileSystems`` path: local, ``gs://``, ``s3://``)."""
    root = os.fspath(path)
    inner = FileSystems.join(root, "shards")
    return inner if has_files(inner) else root


def detect_format(shards_dir: str | os.PathLike) -> TableFormat:
    """``arrow`` or ``parquet``: the format of the shards under ``shards_dir/<split>/``."""
    for fmt in ("arrow", "parquet"):
        if splits_on_disk(os.fspath(shards_dir), fmt):
            return fmt
    raise FileNotFoundError(
        f"{shards_dir}: no shards here (expected <split>/data-*.arrow or <split>/data-*.parquet);"
        " give a run folder or its shards/ folder"
    )


def read_samples(shards_dir: str, split: str | None = None, fmt: TableFormat = "arrow"):
    """Yield the :class:`KVGSample` rows of the shards (all splits, or one), in file order."""
    pattern = FileSystems.join(shards_dir, split or "*", f"data-*.{EXTENSIONS[fmt]}")
    for path in list_files(pattern):
        for row in read_table(path, fmt).to_pylist():
            yield row_to_sample(row)
