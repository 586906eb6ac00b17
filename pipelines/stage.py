"""The one generic stage wrapper: run a check, count, route drops to the rejections output.

Every stage of every graph goes through :class:`CheckStage`, so the funnel is counted the same way
everywhere: Beam counters ``total``, ``kept``, ``dropped_<reason>`` and ``busy_us`` (time spent in
the check) in the namespace ``stage:<name>``. A check that raises becomes a drop with reason
``error`` and the exception text; one bad item never fails a run. Each drop also goes, with the
item, to the ``preview`` output, from which the run keeps a few examples per reason for the
report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import (
    ImageRecord,
    KVGSample,
    Rejection,
    SourceItem,
    item_id_of,
    sha256_hex,
)

REJECTED = "rejected"
PREVIEW = "preview"
NAMESPACE_PREFIX = "stage:"


def unwrap(item: Any) -> Any:
    """The record inside what flows into a stage (a model's result, a chat job, a reply pair)."""
    item = getattr(item, "example", item)  # a RunInference PredictionResult
    item = getattr(item, "context", None) or item  # a chat job about a record
    if isinstance(item, tuple) and item:  # (record, answers) after a chat stage
        item = item[0]
    return item


class Identity(NamedTuple):
    """What the rejections table says of a dropped item (fields of :class:`Rejection`)."""

    item_id: str
    source_id: str
    sha256: str = ""
    entity: str = ""


def identify(item: Any) -> Identity:
    """The identity of any record that flows, for the rejections table.

    An image's ``image_id`` is the sha256 of its bytes, shared by every copy of one picture, so
    a source item or image is identified by :func:`item_id_of` (its location and its sha256).
    """
    item = unwrap(item)
    if isinstance(item, SourceItem):
        place = item.location or item.item_id
        digest = sha256_hex(item.data) if item.data is not None else ""
        return Identity(item_id_of(place, digest), place, digest, item.entity)
    if isinstance(item, ImageRecord):
        place = item.location or item.image_id
        return Identity(item_id_of(place, item.image_id), place, item.image_id, item.entity)
    if isinstance(item, KVGSample):
        locations = item.provenance.locations
        return Identity(item.sample_id, locations[0] if locations else "", "", item.target)
    return Identity(str(item)[:200], "")


def _json_safe(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, sort_keys=True, default=str)


def rejection(stage: str, item: Any, reason: str, detail: dict[str, Any]) -> Rejection:
    who = identify(item)
    return Rejection(
        who.item_id, stage, reason, _json_safe(detail), who.source_id, who.sha256, who.entity
    )


def preview_rank(item_id: str) -> str:
    """The order in which drops are picked as examples: stable, and unrelated to the input
    order."""
    return hashlib.sha256(item_id.encode()).hexdigest()


class CheckStage(beam.DoFn):
    """Apply ``check(item) -> Verdict``; emit kept items (or ``verdict.value``) on the main output,
    a :class:`Rejection` per drop on the ``rejected`` output and ``((stage, reason), (rank,
    rejection, record))`` on the ``preview`` output.

    With ``progress_dir`` the stage also writes its live counts there
    (:mod:`groundforge.pipelines.progress`).
    """

    def __init__(
        self, stage: str, check: Callable[[Any], Verdict], progress_dir: str | None = None
    ):
        self.stage = stage
        self.check = check
        self.progress_dir = progress_dir

    def setup(self) -> None:
        ns = NAMESPACE_PREFIX + self.stage
        self._total = Metrics.counter(ns, "total")
        self._kept = Metrics.counter(ns, "kept")
        self._busy = Metrics.counter(ns, "busy_us")
        self._progress = None
        if self.progress_dir:
            from groundforge.pipelines.progress import StageProgress

            self._progress = StageProgress(self.progress_dir, self.stage)

    def process(self, item, **side_inputs):  # no hints: Beam would type-check them
        self._total.inc()
        started = time.perf_counter()
        try:
            verdict = self.check(item, **side_inputs)
        except Exception as err:  # a bad item must not end the run
            verdict = Verdict.drop("error", error=f"{type(err).__name__}: {err}")
        self._busy.inc(int((time.perf_counter() - started) * 1e6))
        if self._progress is not None:
            self._progress.count(None if verdict.keep else verdict.reason)
        if verdict.keep:
            self._kept.inc()
            yield item if verdict.value is None else verdict.value
            return
        Metrics.counter(NAMESPACE_PREFIX + self.stage, f"dropped_{verdict.reason}").inc()
        dropped = rejection(self.stage, item, verdict.reason, verdict.metrics)
        yield beam.pvalue.TaggedOutput(REJECTED, dropped)
        yield beam.pvalue.TaggedOutput(
            PREVIEW,
            ((self.stage, verdict.reason), (preview_rank(dropped.item_id), dropped, unwrap(item))),
        )

    def finish_bundle(self) -> None:
        if self._progress is not None:
            self._progress.flush()


class StageOutputs(NamedTuple):
    kept: beam.PCollection
    rejected: beam.PCollection
    previews: beam.PCollection


def apply_check(
    pcoll: beam.PCollection,
    stage: str,
    check: Callable[..., Verdict],
    progress_dir: str | None = None,
    **side_inputs: Any,
) -> StageOutputs:
    """Run one stage; returns its kept items, rejections and drop examples.

    ``side_inputs`` (Beam side inputs, e.g. ``beam.pvalue.AsSingleton(...)``) reach ``check`` as
    keyword arguments: how a per-item decision uses an answer computed over the whole run.
    """
    out = pcoll | f"stage:{stage}" >> beam.ParDo(
        CheckStage(stage, check, progress_dir), **side_inputs
    ).with_outputs(REJECTED, PREVIEW, main="kept")
    return StageOutputs(out.kept, out[REJECTED], out[PREVIEW])
