"""The stage funnel and the time spent in each stage, read back from Beam's metrics after a run.

A stage's busy time is the time its check took (``busy_us``) plus, for a stage fed by a model,
the model's batch latencies (RunInference's ``inference_batch_latency_micro_secs`` in the
namespace :func:`model_namespace` gives it), summed over all workers: where the run's work went,
not wall-clock time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from groundforge.annotators.teacher.handler import METRICS_PREFIX as CHAT_PREFIX
from groundforge.filters.instances import check_instances
from groundforge.filters.verdict import Verdict
from groundforge.pipelines.stage import NAMESPACE_PREFIX


@dataclass
class StageCount:
    """In, kept and dropped-by-reason of one stage."""

    stage: str
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def balanced(self) -> bool:
        """The invariant of every stage: ``in == kept + dropped``."""
        return self.total == self.kept + self.dropped_total

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "in": self.total,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
        }


MODEL_PREFIX = "model:"
PROVENANCE_PREFIX = "provenance:"
LATENCY = "inference_batch_latency_micro_secs"


def model_namespace(stage: str) -> str:
    """The metrics namespace of the model that feeds ``stage``."""
    return MODEL_PREFIX + stage


def counters(result, prefix: str) -> dict[str, dict[str, int]]:
    """Counter values by namespace (prefix removed) and name.

    Portable runners report only committed values, the DirectRunner both; committed wins.
    """
    values: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        ns = counter.key.metric.namespace
        if not ns.startswith(prefix):
            continue
        value = counter.committed if counter.committed is not None else counter.attempted
        values[ns[len(prefix) :]][counter.key.metric.name] += int(value or 0)
    return values


def _with_prefix(values: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: n for k, n in sorted(values.items()) if k.startswith(prefix) and n}


def read_funnel(result, stages: list[str]) -> list[StageCount]:
    """Counts of every stage in ``stages`` order (a stage that saw nothing reports zeros)."""
    values = counters(result, NAMESPACE_PREFIX)
    funnel = []
    for stage in stages:
        v = values.get(stage, {})
        dropped = _with_prefix(v, "dropped_")
        funnel.append(StageCount(stage, v.get("total", 0), v.get("kept", 0), dropped))
    return funnel


def _rate(requests: int, seconds: float) -> float | None:
    return round(requests / seconds, 3) if seconds > 0 else None


def read_chat_counts(result, roles: list[str]) -> dict[str, dict]:
    """Per chat role: requests, answers from the cache, requests sent, refused by the budget,
    answered, HTTP attempts,
    failures, tokens of the requests sent, busy seconds of the batches that sent any, and
    requests sent per busy second."""
    values = counters(result, CHAT_PREFIX)
    counts = {}
    for role in roles:
        v = values.get(role, {})
        sent = v.get("requests", 0) - v.get("cached", 0) - v.get("refused", 0)
        seconds = round(v.get("busy_us", 0) / 1e6, 3)
        counts[role] = {
            "requests": v.get("requests", 0),
            "cached": v.get("cached", 0),
            "sent": sent,
            "refused": v.get("refused", 0),
            "answered": v.get("answered", 0),
            "attempts": v.get("attempts", 0),
            "failed": _with_prefix(v, "failed_"),
            "prompt_tokens": v.get("prompt_tokens", 0),
            "completion_tokens": v.get("completion_tokens", 0),
            "seconds": seconds,
            "requests_per_second": _rate(sent, seconds),
        }
    return counts


def _latency_us(result) -> dict[str, int]:
    """RunInference's batch latencies summed per model namespace (prefix removed)."""
    model_us: dict[str, int] = defaultdict(int)
    for dist in result.metrics().query(MetricsFilter())["distributions"]:
        ns, name = dist.key.metric.namespace, dist.key.metric.name
        if ns.startswith(MODEL_PREFIX) and name == LATENCY:
            value = dist.committed if dist.committed is not None else dist.attempted
            model_us[ns[len(MODEL_PREFIX) :]] += int(value.sum if value else 0)
    return model_us


def read_model_counts(result, stages: list[str]) -> dict[str, dict]:
    """Per image model stage (detector, embedder): the images it was given (one request each),
    the seconds of its batches, and images per second; no tokens, no cache."""
    values = counters(result, MODEL_PREFIX)
    model_us = _latency_us(result)
    counts = {}
    for stage in stages:
        n = values.get(stage, {}).get("num_inferences", 0)
        seconds = round(model_us.get(stage, 0) / 1e6, 3)
        counts[stage] = {
            "requests": n,
            "cached": 0,
            "sent": n,
            "answered": n,
            "attempts": n,
            "failed": {},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "seconds": seconds,
            "requests_per_second": _rate(n, seconds),
        }
    return counts


def read_stage_seconds(result, stages: list[str]) -> dict[str, float]:
    """Busy seconds of every stage in ``stages`` (see the module docstring)."""
    busy = counters(result, NAMESPACE_PREFIX)
    model_us = _latency_us(result)
    return {
        stage: round((busy.get(stage, {}).get("busy_us", 0) + model_us.get(stage, 0)) / 1e6, 3)
        for stage in stages
    }


class TallyProvenance(beam.DoFn):
    """Count the rows carrying each licence and each source (a row counts once per value), and
    the rows of each domain."""

    def process(self, sample):
        p = sample.provenance
        for kind, values in (("license", p.licenses), ("source", p.sources)):
            for value in sorted({v or "unknown" for v in values}):
                Metrics.counter(PROVENANCE_PREFIX + kind, value).inc()
        Metrics.counter(PROVENANCE_PREFIX + "domain", sample.domain or "unknown").inc()
        return []


def _count_entity(domain_target) -> None:
    Metrics.counter(PROVENANCE_PREFIX + "entity", domain_target[0] or "unknown").inc()


class TallyEntities(beam.PTransform):
    """Count the distinct target entities of each domain (``Distinct`` is a shuffle, so no
    worker holds the set of names)."""

    def expand(self, samples):
        return (
            samples
            | "domain and target"
            >> beam.FlatMap(lambda s: [(s.domain, s.target)] if s.target else [])
            | "distinct entities" >> beam.Distinct()
            | "count entities" >> beam.Map(_count_entity)
        )


_PLURALS = {"license": "licenses", "source": "sources", "domain": "domains", "entity": "entities"}


def read_provenance(result) -> dict[str, dict[str, int]]:
    """Rows per licence, source and domain, and distinct entities per domain, most common
    first."""
    values = counters(result, PROVENANCE_PREFIX)
    return {
        plural: dict(sorted(values.get(kind, {}).items(), key=lambda kv: (-kv[1], kv[0])))
        for kind, plural in _PLURALS.items()
    }


INSTANCES_NAMESPACE = "instances:"


def counted_instances(record) -> Verdict:
    """:func:`~groundforge.filters.instances.check_instances`, counting every annotation the
    image lost (by reason) and every declared size that is not the decoded one, kept or not."""
    verdict = check_instances(record)
    for reason, n in (verdict.metrics.get("dropped_instances") or {}).items():
        Metrics.counter(INSTANCES_NAMESPACE + "dropped", reason).inc(n)
    if verdict.metrics.get("size_mismatch"):
        Metrics.counter(INSTANCES_NAMESPACE + "images", "size_mismatch").inc()
    return verdict


def read_instances(result) -> dict[str, object]:
    """Annotations dropped by reason, and images whose declared size is not their own."""
    values = counters(result, INSTANCES_NAMESPACE)
    dropped = {k: n for k, n in sorted(values.get("dropped", {}).items()) if n}
    return {"dropped": dropped, "size_mismatch": values.get("images", {}).get("size_mismatch", 0)}
