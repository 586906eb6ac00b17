"""The one generic stage wrapper: run a check, count, route drops to the rejections output.

Every stage of every graph goes through :class:`CheckStage`, so the funnel is counted the same way
everywhere: Beam counters ``total``, ``kept`` and ``dropped_<reason>`` in the namespace
``stage:<name>``. A check that raises becomes a drop with reason ``error`` and the exception text;
one bad item never fails a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from groundforge.filters.verdict import Verdict
from groundforge.schemas.records import ImageRecord, KVGSample, Rejection, SourceItem

REJECTED = "rejected"
NAMESPACE_PREFIX = "stage:"


def identify(item: Any) -> tuple[str, str]:
    """``(item_id, source_id)`` of any record that flows, for the rejections table."""
    item = getattr(item, "example", item)  # a RunInference PredictionResult
    item = getattr(item, "context", None) or item  # a chat job about a record
    if isinstance(item, tuple) and item:  # (record, answers) after a chat stage
        item = item[0]
    if isinstance(item, SourceItem):
        return item.item_id, item.location
    if isinstance(item, ImageRecord):
        return item.image_id, item.location
    if isinstance(item, KVGSample):
        locations = item.provenance.locations
        return item.sample_id, locations[0] if locations else ""
    return str(item)[:200], ""


def _json_safe(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, sort_keys=True, default=str)


def rejection(stage: str, item: Any, reason: str, detail: dict[str, Any]) -> Rejection:
    item_id, source_id = identify(item)
    return Rejection(item_id, stage, reason, _json_safe(detail), source_id)


class CheckStage(beam.DoFn):
    """Apply ``check(item) -> Verdict``; emit kept items (or ``verdict.value``) on the main output
    and a :class:`Rejection` per drop on the ``rejected`` output."""

    def __init__(self, stage: str, check: Callable[[Any], Verdict]):
        self.stage = stage
        self.check = check

    def setup(self) -> None:
        ns = NAMESPACE_PREFIX + self.stage
        self._total = Metrics.counter(ns, "total")
        self._kept = Metrics.counter(ns, "kept")

    def process(self, item, **side_inputs):  # no hints: Beam would type-check them
        self._total.inc()
        try:
            verdict = self.check(item, **side_inputs)
        except Exception as err:  # a bad item must not end the run
            verdict = Verdict.drop("error", error=f"{type(err).__name__}: {err}")
        if verdict.keep:
            self._kept.inc()
            yield item if verdict.value is None else verdict.value
            return
        Metrics.counter(NAMESPACE_PREFIX + self.stage, f"dropped_{verdict.reason}").inc()
        yield beam.pvalue.TaggedOutput(
            REJECTED, rejection(self.stage, item, verdict.reason, verdict.metrics)
        )


def apply_check(
    pcoll: beam.PCollection, stage: str, check: Callable[..., Verdict], **side_inputs: Any
) -> tuple[beam.PCollection, beam.PCollection]:
    """Run one stage; returns ``(kept, rejected)``.

    ``side_inputs`` (Beam side inputs, e.g. ``beam.pvalue.AsSingleton(...)``) reach ``check`` as
    keyword arguments: how a per-item decision uses an answer computed over the whole run.
    """
    out = pcoll | f"stage:{stage}" >> beam.ParDo(
        CheckStage(stage, check), **side_inputs
    ).with_outputs(REJECTED, main="kept")
    return out.kept, out[REJECTED]
