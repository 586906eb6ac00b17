"""Run files through Beam's ``FileSystems``, so the same code reads and writes a local folder or
a bucket (``gs://``, ``s3://``), on the driver and on every worker.

Writes are all-or-nothing: a reader sees the whole file or none of it. On a local disk the bytes
go to a temporary file in the same folder, renamed into place (atomic on POSIX). On an object
store an object only becomes visible when its upload is closed, so the final name is written in
one create/close; the bytes are made in memory first, because closing the stream after a failed
write would publish what was written so far.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

TableFormat = Literal["arrow", "parquet"]
EXTENSIONS: dict[str, str] = {"arrow": "arrow", "parquet": "parquet"}
_RAW = CompressionTypes.UNCOMPRESSED
# Rows per record batch (Arrow) or row group (Parquet): what a writer holds at once.
BATCH_ROWS = 64


def is_local(path: str) -> bool:
    """True for a path of the local filesystem (one without a URI scheme)."""
    return FileSystems.get_scheme(path) is None


@contextlib.contextmanager
def atomic_create(path: str, mime_type: str = "application/octet-stream") -> Iterator[IO[bytes]]:
    """A binary stream whose content appears at ``path`` only if the block ends without error.

    On a local disk the temporary file is ``<path>.<random hex>.tmp``, removed on failure (a
    killed process may leave one behind, never a partial ``path``).
    """
    if is_local(path):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with FileSystems.create(tmp, mime_type=mime_type, compression_type=_RAW) as fh:
                yield fh
            FileSystems.rename([tmp], [path])
        except BaseException:
            with contextlib.suppress(Exception):
                FileSystems.delete([tmp])
            raise
        return
    buffer = io.BytesIO()
    yield buffer
    with FileSystems.create(path, mime_type=mime_type, compression_type=_RAW) as fh:
        fh.write(buffer.getbuffer())


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Write ``data`` to ``path``, atomically."""
    with atomic_create(path, mime_type) as fh:
        fh.write(data)


def read_bytes(path: str) -> bytes:
    """The bytes of the file at ``path``, exactly as stored (a ``.gz`` name is not unpacked)."""
    with FileSystems.open(path, compression_type=_RAW) as fh:
        return fh.read()


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
    written = 0
    with atomic_create(path) as raw:
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
    return written


def read_table(path: str, fmt: TableFormat) -> pa.Table:
    data = read_bytes(path)
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
    if is_local(path):
        # A local folder is one path (removed as a tree); a trailing "/" would list its files.
        if FileSystems.exists(path):
            FileSystems.delete([path])
        return
    try:
        FileSystems.delete([path.rstrip("/") + "/"])
    except BeamIOError:
        if has_files(path):
            raise


def has_files(folder: str) -> bool:
    """True when at least one file lies anywhere under ``folder`` (an object store has no empty
    folders, so this is what "the folder exists" means on every filesystem)."""
    return bool(FileSystems.match([FileSystems.join(folder, "**")], limits=[1])[0].metadata_list)


def relative_to(path: str, folder: str) -> str:
    """``path`` as a path inside ``folder`` (``a/b.txt``), the same on every filesystem."""
    root = folder.rstrip("/") + "/"
    if not path.startswith(root):
        raise ValueError(f"{path} is not inside {folder}")
    return path[len(root) :]


def move_files(sources: list[str], destinations: list[str]) -> None:
    """Rename files (on an object store: copy, then delete), creating local folders as needed."""
    if not sources:
        return
    if is_local(destinations[0]):
        for dst in destinations:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    FileSystems.rename(sources, destinations)


def write_text(path: str, text: str, mime_type: str = "text/plain") -> None:
    """Write ``text`` as UTF-8, atomically: a reader never sees a half-written file."""
    write_bytes(path, text.encode("utf-8"), mime_type)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def count_rows(path: str, fmt: TableFormat) -> int:
    """Rows in a table file, read batch by batch (images are never all in memory)."""
    with FileSystems.open(path, compression_type=_RAW) as raw:
        source = pa.PythonFile(raw, mode="r")
        if fmt == "parquet":
            return pq.ParquetFile(source).metadata.num_rows
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
