"""Table files through Beam's ``FileSystems``, so the same code writes to a local folder or to a
bucket (gs://, s3://) when a pipeline runs on a cloud runner."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

TableFormat = Literal["arrow", "parquet"]
EXTENSIONS: dict[str, str] = {"arrow": "arrow", "parquet": "parquet"}
_RAW = CompressionTypes.UNCOMPRESSED
# Rows per record batch (Arrow) or row group (Parquet): what a writer holds at once.
BATCH_ROWS = 64


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_table(
    path: str,
    rows: Iterable[dict[str, Any]],
    schema: pa.Schema,
    fmt: TableFormat,
    batch_rows: int = BATCH_ROWS,
) -> int:
    """Write rows to one file, atomically: a reader never sees a half-written file.

    ``arrow`` is the Arrow IPC stream format that ``datasets`` memory-maps; ``parquet`` is for
    ``load_dataset("parquet", ...)`` and other tools. 0 rows give a valid empty file. Rows are
    consumed ``batch_rows`` at a time (one record batch or row group each), so a generator of
    rows holding images never has more than one batch in memory. Returns the rows written.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    written = 0
    with FileSystems.create(tmp, compression_type=_RAW) as raw:
        sink = pa.PythonFile(raw, mode="w")
        writer = (
            pa.ipc.new_stream(sink, schema)
            if fmt == "arrow"
            else pq.ParquetWriter(sink, schema, compression="zstd")
        )
        with writer:
            for chunk in _chunks(rows, batch_rows):
                writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
                written += len(chunk)
    FileSystems.rename([tmp], [path])
    return written


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


def remove_folder(path: str) -> None:
    """Delete a folder and everything under it (on object stores: every object under the
    prefix); nothing to do when it does not exist."""
    if FileSystems.get_scheme(path) in (None, "file"):
        # A local folder is one path (removed as a tree); a trailing "/" would list its files.
        if FileSystems.exists(path):
            FileSystems.delete([path])
        return
    try:
        FileSystems.delete([path.rstrip("/") + "/"])
    except BeamIOError:
        if list_files(FileSystems.join(path, "**")):
            raise


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
