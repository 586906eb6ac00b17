"""The rejections table: every dropped item, its stage, reason code and detail."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from groundforge.outputs.files import read_table, write_table
from groundforge.schemas.arrow import REJECTION_SCHEMA, rejection_to_row, row_to_rejection
from groundforge.schemas.records import Rejection

REJECTIONS_FILE = "rejections.parquet"


def _sort_key(r: Rejection) -> tuple[str, str, str, str]:
    return (r.stage, r.reason, r.item_id, r.source_id)


def _write(group, path: str) -> int:
    _, rejections = group
    rows = [rejection_to_row(r) for r in sorted(rejections, key=_sort_key)]
    return write_table(path, rows, REJECTION_SCHEMA, "parquet")


class WriteRejections(beam.PTransform):
    """Write every :class:`Rejection` into one sorted Parquet file (deterministic bytes)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, rejections):
        return (
            rejections
            | "one group" >> beam.Map(lambda r: (0, r))
            | "gather" >> beam.GroupByKey()
            | "write rejections" >> beam.Map(_write, self.path)
        )


def ensure_rejections(path: str) -> None:
    """A run with nothing rejected still has a (0-row) rejections table."""
    if not FileSystems.exists(path):
        write_table(path, [], REJECTION_SCHEMA, "parquet")


def read_rejections(path: str) -> list[Rejection]:
    return [row_to_rejection(row) for row in read_table(path, "parquet").to_pylist()]
