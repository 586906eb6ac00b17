"""Where a run's pixels wait between stages, so records carry a reference instead of bytes.

A run's records and samples flow through Beam's shuffles and side inputs, which every runner may
hold in memory or write to its shuffle store. Image bytes there would make a run's memory grow
with its size. So once an image is checked (and once a scene is composed) its bytes are *parked*:
written once, content-addressed, under the run's work folder through Beam's ``FileSystems``
(local, ``gs://``, ``s3://`` alike), and the record keeps only ``image_ref``, the file's URI.
A stage that needs pixels calls :func:`image_bytes`, which loads them back.

Parking is idempotent: the name is the sha256 of the bytes, so a retried bundle writes the same
file again (or finds it there) and two records with the same pixels share one file.

>>> store = PixelStore("/tmp/run/_work/pixels")                       # doctest: +SKIP
>>> ref = store.park(png_bytes)                                       # doctest: +SKIP
>>> load_pixels(ref) == png_bytes                                     # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any


def load_pixels(ref: str) -> bytes:
    """The bytes parked at ``ref``."""
    # Beam is imported where pixels move, so pure modules that read records stay light.
    from groundforge.outputs.files import read_bytes

    return read_bytes(ref)


def image_bytes(item: Any) -> bytes:
    """The image bytes of a record or sample: held (``image``) or parked (``image_ref``).

    >>> from groundforge.schemas.records import ImageRecord
    >>> image_bytes(ImageRecord("id", b"PNG...", 1, 1, "flag"))
    b'PNG...'
    """
    if item.image:
        return item.image
    ref = getattr(item, "image_ref", "")
    return load_pixels(ref) if ref else b""


def with_pixels(item: Any) -> Any:
    """``item`` holding its bytes (for a stage that reads them many times, or a writer)."""
    if item.image or not getattr(item, "image_ref", ""):
        return item
    return replace(item, image=load_pixels(item.image_ref))


@dataclass(frozen=True)
class PixelStore:
    """A folder (any ``FileSystems`` URI) of content-addressed image files."""

    root: str

    def ref_for(self, data: bytes) -> str:
        from apache_beam.io.filesystems import FileSystems

        digest = hashlib.sha256(data).hexdigest()
        return FileSystems.join(self.root, digest[:2], digest)

    def park(self, data: bytes) -> str:
        """Write ``data`` (once) and return its URI. The write is atomic: a reader never sees
        a half-written file."""
        from apache_beam.io.filesystems import FileSystems

        from groundforge.outputs.files import write_bytes

        ref = self.ref_for(data)
        if not FileSystems.exists(ref):
            write_bytes(ref, data)
        return ref

    def parked(self, item: Any) -> Any:
        """``item`` with its bytes parked: ``image`` emptied, ``image_ref`` set."""
        if not item.image:
            return item
        return replace(item, image=b"", image_ref=self.park(item.image))
