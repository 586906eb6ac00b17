"""One image, one item: records that name the same source location.

A source can list one image twice: a COCO ``images[]`` entry reusing a ``file_name``, an
``.odgt`` ID on two lines, a dataset with a repeated path. Two records of one place would give
two samples of one picture with conflicting truths. The rule: of the records that share a
location, the first in a stable order (a digest of what the source said about each) is kept;
every other is dropped as ``duplicate_reference``, naming the kept one's entity and digest.
The order does not depend on the runner or the order of the source's lines.

>>> ranked = rank_references([second, first])                          # doctest: +SKIP
>>> [check_reference(pair).reason for pair in ranked]                   # doctest: +SKIP
[None, 'duplicate_reference']
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import ImageRecord

DUPLICATE_REFERENCE = "duplicate_reference"


def reference_digest(record: ImageRecord) -> str:
    """A stable digest of what the source said about a record: bytes, entity and annotations."""
    said = repr(
        (record.image_id, record.entity, record.boxes, record.instances, record.source)
    ).encode()
    return hashlib.sha256(said).hexdigest()[:16]


def rank_references(
    records: Iterable[ImageRecord],
) -> list[tuple[ImageRecord, ImageRecord | None]]:
    """The records of one location, each beside the kept one (None for the kept one itself)."""
    ordered = sorted(records, key=reference_digest)
    return [(r, None if i == 0 else ordered[0]) for i, r in enumerate(ordered)]


def check_reference(pair: tuple[ImageRecord, ImageRecord | None]) -> Verdict:
    """Keep the first record of a location; drop a later one as ``duplicate_reference``."""
    record, kept = pair
    if kept is None:
        return Verdict.ok(record)
    return Verdict.drop(
        DUPLICATE_REFERENCE,
        location=record.location,
        kept_entity=kept.entity,
        kept_digest=reference_digest(kept),
        digest=reference_digest(record),
    )
