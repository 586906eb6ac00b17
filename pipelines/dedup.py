"""Run-wide dedup as Beam transforms, with no step that sees the whole run.

:class:`FindDuplicates` turns records into ``(record_key, Duplicate)`` findings, one per
duplicate record, by the rule and the band keys of :mod:`groundforge.filters.dedup`:

1. each record's signature is filed under its band keys (a record whose signature cannot be
   made goes to the ``failed`` output with the error instead);
2. one ``GroupByKey`` per band key. A group is read as a stream: an exact group in two passes
   (its earliest key, then one finding per other member); a group of at most ``chunk_size``
   members is compared all-pairs at once; a bigger group is cut into chunks and each chunk pair
   is sent, keyed by ``(band key, i, j)``, to a second ``GroupByKey`` and compared there;
3. the candidates of a record key are combined (:func:`best_candidates`) as they arrive;
4. beside its record (:class:`JoinFindings`), the candidates are verified in order by comparing
   the two images themselves (:func:`dedup_check`, :mod:`groundforge.filters.sameimage`).

So no element holds more than ``2 * chunk_size`` signatures, one record, or one finding per
key, whatever the size of the run. :class:`JoinFindings` then puts each record beside its
finding (``CoGroupByKey`` on the record key) for the ``dedup`` stage's check,
:func:`dedup_check`.
"""

from __future__ import annotations

import functools
import math
from itertools import islice

import apache_beam as beam

from groundforge.filters.dedup import (
    DEFAULT_SETTINGS,
    DedupSettings,
    band_entries,
    best_candidates,
    compare_chunks,
    confirm_duplicate,
    exact_findings,
    signature_of,
    split,
)
from groundforge.filters.sameimage import DEFAULT_SAME, SameSettings, look_of
from groundforge.filters.verdict import Verdict
from groundforge.pixels import load_pixels
from groundforge.schemas.records import ImageRecord, record_key

FAILED = "failed"
CHUNK_PAIRS = "chunk_pairs"


class _BandEntries(beam.DoFn):
    """record -> ``(band key, entry)``; ``(record key, error)`` on ``failed``."""

    def __init__(self, settings: DedupSettings, scope: str):
        self.settings = settings
        self.scope = scope

    def process(self, record):
        try:
            entries = band_entries(signature_of(record, self.scope), self.settings)
        except Exception as err:  # one bad record must not end the run
            error = f"{type(err).__name__}: {err}"
            yield beam.pvalue.TaggedOutput(FAILED, (record_key(record), error))
            return
        yield from entries


class _CompareGroups(beam.DoFn):
    """``(band key, entries)`` -> findings, or chunk pairs of a group too big for one element."""

    def __init__(self, settings: DedupSettings):
        self.settings = settings

    def process(self, element):
        key, entries = element
        if key.startswith("exact:"):
            yield from exact_findings(entries)
            return
        size = self.settings.chunk_size
        head = list(islice(entries, size + 1))
        if len(head) <= size:
            yield from compare_chunks(head, None, self.settings).items()
            return
        del head
        # Beam's grouped values can be read again: count them, then stream them chunk by chunk.
        count = math.ceil(sum(1 for _ in entries) / size)
        for i, chunk in enumerate(split(entries, size)):
            for j in range(count):
                pair = (key, min(i, j), max(i, j))
                yield beam.pvalue.TaggedOutput(CHUNK_PAIRS, (pair, (i > j, chunk)))


def _compare_chunk_pair(element, settings: DedupSettings):
    _, sides = element
    left = right = None
    for is_right, chunk in sides:
        if is_right:
            right = chunk
        else:
            left = chunk
    yield from compare_chunks(left, right, settings).items()


class FindDuplicates(beam.PTransform):
    """records -> ``{"duplicate": (record_key, Duplicate), "failed": (record_key, error)}``.

    ``duplicate`` holds the best candidates of every record with any, best first; ``failed``
    the records whose signature could not be made (they are compared with nothing).
    """

    def __init__(self, settings: DedupSettings = DEFAULT_SETTINGS, scope: str = "all"):
        super().__init__()
        self.settings = settings
        self.scope = scope

    def expand(self, records):
        entries = records | "band entries" >> beam.ParDo(
            _BandEntries(self.settings, self.scope)
        ).with_outputs(FAILED, main="entries")
        compared = (
            entries.entries
            | "band groups" >> beam.GroupByKey()
            | "compare groups"
            >> beam.ParDo(_CompareGroups(self.settings)).with_outputs(CHUNK_PAIRS, main="found")
        )
        chunked = (
            compared[CHUNK_PAIRS]
            | "chunk pair groups" >> beam.GroupByKey()
            | "compare chunk pairs" >> beam.FlatMap(_compare_chunk_pair, settings=self.settings)
        )
        findings = (
            (compared.found, chunked)
            | "all findings" >> beam.Flatten()
            | "best candidates per record"
            >> beam.CombinePerKey(best_candidates, limit=self.settings.candidates)
        )
        return {"duplicate": findings, FAILED: entries[FAILED]}


class JoinFindings(beam.PTransform):
    """records -> ``(record, Duplicate | None, error | None)``, each record beside its finding.

    Joined by ``record_key`` with ``CoGroupByKey``: an element holds one key's record, its one
    combined finding and its signature error, if any.
    """

    def __init__(self, settings: DedupSettings = DEFAULT_SETTINGS, scope: str = "all"):
        super().__init__()
        self.settings = settings
        self.scope = scope

    def expand(self, records):
        found = records | "find duplicates" >> FindDuplicates(self.settings, self.scope)
        keyed = records | "key records" >> beam.WithKeys(record_key)
        return (
            {"record": keyed, **found}
            | "records and findings" >> beam.CoGroupByKey()
            | "pair records" >> beam.FlatMap(_pair)
        )


def _pair(element):
    _, joined = element
    found = next(iter(joined["duplicate"]), None)
    error = next(iter(joined["failed"]), None)
    for record in joined["record"]:
        yield record, found, error


def dedup_check(
    item: tuple[ImageRecord, object, str | None], settings: SameSettings = DEFAULT_SAME
) -> Verdict:
    """The ``dedup`` stage's check on a joined ``(record, candidates, error)``:
    :func:`confirm_duplicate`, the kept twins' pixels loaded from their ``kept_ref``. A record
    whose signature failed raises, so the stage drops it as ``error``."""
    record, candidates, error = item
    if error is not None:
        raise ValueError(f"no dedup signature: {error}")
    verdict = confirm_duplicate(record, candidates or (), _kept_look, settings)
    return Verdict.ok(record) if verdict.keep else verdict


def _kept_look(dup):
    return _look_at(dup.kept_ref)


@functools.lru_cache(maxsize=1024)
def _look_at(ref: str):
    # A kept image is the twin of many near-copies in a crowded band: decode it once.
    return look_of(load_pixels(ref))
