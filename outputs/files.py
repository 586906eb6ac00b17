"""Table files through Beam's ``FileSystems``, so the same code writes to a local folder or to a
bucket (gs://, s3://) when a pipeline runs on a cloud runner."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

TableFormat = Literal["arrow", "parquet"]
EXTENSIONS: dict[str, str] = {"arrow": "arrow", "parquet": "parquet"}
_RAW = CompressionTypes.UNCOMPRESSED


def write_table(path: str, rows: Iterable[dict[str, Any]], schema: pa.Schema, fmt: TableFormat):
    """Write rows to one file, atomically: a reader never sees a half-written file.

    ``arrow`` is the Arrow IPC stream format that ``datasets`` memory-maps; ``parquet`` is for
    ``load_dataset("parquet", ...)`` and other tools. 0 rows give a valid empty file.
    """
    table = pa.Table.from_pylist(list(rows), schema=schema)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp, compression_type=_RAW) as raw:
        sink = pa.PythonFile(raw, mode="w")
        if fmt == "arrow":
            with pa.ipc.new_stream(sink, schema) as writer:
                writer.write_table(table, max_chunksize=256)
        else:
            pq.write_table(table, sink, compression="zstd")
    FileSystems.rename([tmp], [path])
    return table.num_rows


def read_table(path: str, fmt: TableFormat) -> pa.Table:
    with FileSystems.open(path, compression_type=_RAW) as raw:
        data = raw.read()
    if fmt == "arrow":
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    return pq.read_table(pa.BufferReader(data))


def file_sha256(path: str) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a file."""
    digest, size = hashlib.sha256(), 0
    with FileSystems.open(path, compression_type=_RAW) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def list_files(pattern: str) -> list[str]:
    """Paths matching a glob, sorted; [] when nothing matches."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def write_text(path: str, text: str, mime_type: str = "text/plain") -> None:
    """Write ``text`` as UTF-8, atomically: a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp, mime_type=mime_type, compression_type=_RAW) as f:
        f.write(text.encode("utf-8"))
    FileSystems.rename([tmp], [path])


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type=_RAW) as f:
        return f.read().decode("utf-8")


def count_rows(path: str, fmt: TableFormat) -> int:
    """Rows in a table file, read batch by batch (images are never all in memory)."""
    with FileSystems.open(path, compression_type=_RAW) as raw:
        source = pa.PythonFile(raw, mode="r")
        if fmt == "parquet":
            return pq.ParquetFile(source).metadata.num_rows
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
