"""Turn a :class:`SourceItem` into an :class:`ImageRecord` holding the image's raw bytes.

Bytes come from ``item.data`` when the source already holds them, else from ``item.location``
through Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://`` ... whatever the runner has
registered). Nothing is decoded here: width and height stay 0 until
:mod:`groundforge.filters.image` decodes the image.

Drop reasons, each with ``location`` and (for read failures) ``error`` in the metrics:

- ``bad_annotation``: the source could not describe the item (``item.error``: a malformed
  annotation line, an annotation naming an image that is not listed); nothing is read.
- ``outside_source``: a symlink in an image folder that leads out of it (a source may set
  ``item.reason`` to name its own refusal); nothing is read.
- ``missing_image``: no bytes and nothing to read (no location, or the location is a dataset row,
  ``<dataset>#<split>/<index>``, whose image is empty).
- ``not_found``: nothing exists at the location.
- ``unreadable``: something is there but cannot be read as a file: a directory, a dangling
  symlink, permission denied, an unknown URL scheme, any other error of the filesystem.
"""

from __future__ import annotations

import os
import re

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import ImageRecord, SourceItem, sha256_hex

# How sources/hf_dataset.py names a dataset row; such a location has no file behind it.
_DATASET_ROW = re.compile(r"#[^#/]+/\d+$")


def is_dataset_row(location: str) -> bool:
    """True for a location naming a row of a dataset rather than a file.

    >>> is_dataset_row("/data/birds#train/12"), is_dataset_row("/data/birds/12.png")
    (True, False)
    """
    return bool(_DATASET_ROW.search(location))


def read_location(location: str) -> bytes:
    """The bytes at ``location`` exactly as stored; raises what the filesystem raises."""
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    # AUTO would gunzip a "*.gz" path; the record must hold the bytes as delivered.
    with FileSystems.open(location, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        return fh.read()


def _is_not_found(error: Exception) -> bool:
    # Remote filesystems raise their own types (GCS: google.api_core's NotFound).
    return isinstance(error, FileNotFoundError) or type(error).__name__ == "NotFound"


def _failure(location: str, error: Exception) -> Verdict:
    text = f"{type(error).__name__}: {error}"
    if _is_not_found(error):
        if "://" not in location and os.path.islink(location):
            target = os.readlink(location)
            return Verdict.drop(
                "unreadable", location=location, error=f"dangling symlink to {target}"
            )
        return Verdict.drop("not_found", location=location, error=text)
    return Verdict.drop("unreadable", location=location, error=text)


def read_item(item: SourceItem) -> Verdict:
    """Keep an :class:`ImageRecord` with the item's bytes, or drop with the reason it has none.

    Never raises: every failure is a drop (reasons in the module docstring).

    >>> v = read_item(SourceItem("a", "", "flag", data=b"\\x89PNG"))
    >>> v.keep, v.value.image_id[:8], v.value.width
    (True, '0f4636c7', 0)
    >>> read_item(SourceItem("b", "", "flag")).reason
    'missing_image'
    """
    if item.error:
        reason = item.reason or "bad_annotation"
        return Verdict.drop(reason, location=item.location, error=item.error)
    data = item.data
    if data is None:
        if not item.location or is_dataset_row(item.location):
            return Verdict.drop("missing_image", location=item.location)
        try:
            data = read_location(item.location)
        except Exception as e:  # a bad file must become a drop, whatever the filesystem raised
            return _failure(item.location, e)
    record = ImageRecord(
        image_id=sha256_hex(data),
        image=data,
        width=0,
        height=0,
        domain=item.domain,
        entity=item.entity,
        boxes=item.boxes,
        source=item.source,
        location=item.location,
        license=item.license,
        author=item.author,
        url=item.url,
        instances=item.instances,
        dropped_instances=item.dropped_instances,
        declared_size=item.declared_size,
    )
    return Verdict.ok(record)
