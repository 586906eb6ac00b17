"""Run a recipe on a few of its source items: ``--limit N`` or ``--sample FRACTION``.

An item is chosen by a stable hash of its id (a folder's relative path, a dataset's id column
or row, an annotation entry), so the same items are chosen on every run and every runner, however
the source is partitioned. ``--sample F`` keeps the items whose hash falls below ``F``;
``--limit N`` keeps the ``N`` items with the smallest hashes: only their keys are gathered
(``Top.Smallest``), never the items, so memory grows with ``N``, not with the corpus. Items that
are not chosen are not read: they are no rejections.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import apache_beam as beam

from groundforge.schemas.records import SourceItem

# Hashes are compared as integers below this bound.
_SPAN = 1 << 64


@dataclass(frozen=True)
class Selection:
    """At most ``limit`` items, or about ``sample`` of them (a fraction in (0, 1])."""

    limit: int | None = None
    sample: float | None = None

    def __post_init__(self) -> None:
        if (self.limit is None) == (self.sample is None):
            raise ValueError("give either --limit or --sample, not both")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.sample is not None and not 0 < self.sample <= 1:
            raise ValueError(f"--sample must be a fraction in (0, 1], got {self.sample}")

    def to_dict(self) -> dict:
        """What the manifest records: ``{"limit": N}`` or ``{"sample": F}``."""
        return {"limit": self.limit} if self.limit is not None else {"sample": self.sample}

    def describe(self) -> str:
        if self.limit is not None:
            return f"--limit {self.limit}: the {self.limit} source items with the smallest hashes"
        return f"--sample {self.sample}: the source items whose hash falls below {self.sample}"


def rank(item: SourceItem) -> tuple[int, str]:
    """The order items are chosen in: the hash of the item's id, then its location (which only
    separates items that share an id)."""
    key = item.item_id or item.location
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big"), item.location


def _below(item: SourceItem, fraction: float) -> bool:
    return rank(item)[0] < fraction * _SPAN


def count_selected(items: Iterable[SourceItem], selection: Selection) -> int:
    """How many of ``items`` ``selection`` keeps (a streaming count, for a dry run)."""
    if selection.sample is not None:
        return sum(1 for item in items if _below(item, selection.sample))
    return len(heapq.nsmallest(selection.limit, (rank(item) for item in items)))


def _sampled(part, source, fraction: float) -> Iterator[SourceItem]:
    return (item for item in source.items(part) if _below(item, fraction))


def _ranks(part, source) -> Iterator[tuple[int, str]]:
    return (rank(item) for item in source.items(part))


def _up_to(part, source, cutoff) -> Iterator[SourceItem]:
    if cutoff is None:  # the source listed nothing
        return iter(())
    cutoff = tuple(cutoff)  # a side input may come back as a list
    return (item for item in source.items(part) if rank(item) <= cutoff)


def _last(smallest: list) -> tuple[int, str] | None:
    return max(map(tuple, smallest)) if smallest else None


class SelectItems(beam.PTransform):
    """Source partitions -> the selected items of ``source`` (``partitions()``/``items()``)."""

    def __init__(self, source, selection: Selection):
        super().__init__()
        self.source = source
        self.selection = selection

    def expand(self, partitions):
        if self.selection.sample is not None:
            return partitions | "list sampled items" >> beam.FlatMap(
                _sampled, self.source, self.selection.sample
            )
        cutoff = (
            partitions
            | "list item keys" >> beam.FlatMap(_ranks, self.source)
            | "smallest keys" >> beam.combiners.Top.Smallest(self.selection.limit)
            | "largest kept key" >> beam.Map(_last)
        )
        return partitions | "list limited items" >> beam.FlatMap(
            _up_to, self.source, beam.pvalue.AsSingleton(cutoff)
        )
