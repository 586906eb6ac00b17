"""The rejections table: every dropped item, its stage, reason code and detail.

A run may drop millions of items, so no step gathers them all: the pipeline writes sorted parts,
one per (stage, reason, bucket) of at most about ``rows_per_part`` rows, and
:func:`merge_rejections` streams the parts, in (stage, reason, bucket) order, into the one
``rejections.parquet`` a person opens. The same drops give the same bytes on any runner.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from urllib.parse import quote, unquote

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from groundforge.outputs.files import atomic_create, list_files, remove_folder, write_table
from groundforge.schemas.arrow import REJECTION_SCHEMA, rejection_to_row, row_to_rejection
from groundforge.schemas.records import Rejection

REJECTIONS_FILE = "rejections.parquet"
ROWS_PER_PART = 50_000
_RAW = CompressionTypes.UNCOMPRESSED


def _sort_key(r: Rejection) -> tuple[str, str, str, str]:
    return (r.stage, r.reason, r.item_id, r.source_id)


def part_name(stage: str, reason: str, bucket: int) -> str:
    """A part's file name; it sorts, and parses back, as (stage, reason, bucket).

    >>> part_name("image", "not_an_image", 3)
    'image~not_an_image~00003.parquet'
    """
    return f"{quote(stage, safe='')}~{quote(reason, safe='')}~{bucket:05d}.parquet"


def _parse_part(path: str) -> tuple[str, str, int]:
    stage, reason, bucket = path.rsplit("/", 1)[-1].removesuffix(".parquet").split("~")
    return unquote(stage), unquote(reason), int(bucket)


def _bucket(rejection: Rejection, counts, rows_per_part: int):
    key = (rejection.stage, rejection.reason)
    buckets = max(1, math.ceil(counts[key] / rows_per_part))
    digest = hashlib.sha256(f"{rejection.item_id}\0{rejection.source_id}".encode()).hexdigest()
    return (*key, int(digest[:15], 16) % buckets), rejection


def _write_part(group, parts_dir: str) -> int:
    (stage, reason, bucket), rejections = group
    rows = (rejection_to_row(r) for r in sorted(rejections, key=_sort_key))
    path = FileSystems.join(parts_dir, part_name(stage, reason, bucket))
    return write_table(path, rows, REJECTION_SCHEMA, "parquet")


class WriteRejections(beam.PTransform):
    """Write every :class:`Rejection` into sorted parts under ``parts_dir`` (no element holds
    more than one part's rows); :func:`merge_rejections` makes the table of them."""

    def __init__(self, parts_dir: str, rows_per_part: int = ROWS_PER_PART):
        super().__init__()
        self.parts_dir = parts_dir
        self.rows_per_part = rows_per_part

    def expand(self, rejections):
        counts = (
            rejections
            | "key by reason" >> beam.Map(lambda r: ((r.stage, r.reason), None))
            | "count per reason" >> beam.combiners.Count.PerKey()
        )
        return (
            rejections
            | "assign part"
            >> beam.Map(
                _bucket, counts=beam.pvalue.AsDict(counts), rows_per_part=self.rows_per_part
            )
            | "group part" >> beam.GroupByKey()
            | "write part" >> beam.Map(_write_part, self.parts_dir)
        )


def merge_rejections(parts_dir: str, path: str) -> None:
    """Stream the parts into the table at ``path`` (0 rows when there are none), then remove
    the parts."""
    parts = sorted(list_files(FileSystems.join(parts_dir, "*.parquet")), key=_parse_part)
    with atomic_create(path) as raw:
        sink = pa.PythonFile(raw, mode="w")
        with pq.ParquetWriter(sink, REJECTION_SCHEMA, compression="zstd") as out:
            for part in parts:
                with FileSystems.open(part, compression_type=_RAW) as fh:
                    source = pq.ParquetFile(pa.PythonFile(fh, mode="r"))
                    for batch in source.iter_batches():
                        out.write_batch(batch)
    remove_folder(parts_dir)


def iter_rejections(path: str) -> Iterator[Rejection]:
    """The table's rows, read batch by batch."""
    with FileSystems.open(path, compression_type=_RAW) as fh:
        source = pq.ParquetFile(pa.PythonFile(fh, mode="r"))
        for batch in source.iter_batches():
            for row in batch.to_pylist():
                yield row_to_rejection(row)


def read_rejections(path: str) -> list[Rejection]:
    return list(iter_rejections(path))
