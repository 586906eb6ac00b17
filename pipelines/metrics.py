"""The stage funnel, read back from Beam's counters after a run."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from apache_beam.metrics.metric import MetricsFilter

from groundforge.annotators.teacher.handler import METRICS_PREFIX as CHAT_PREFIX
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


def _counters(result, prefix: str) -> dict[str, dict[str, int]]:
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
    values = _counters(result, NAMESPACE_PREFIX)
    funnel = []
    for stage in stages:
        v = values.get(stage, {})
        dropped = _with_prefix(v, "dropped_")
        funnel.append(StageCount(stage, v.get("total", 0), v.get("kept", 0), dropped))
    return funnel


def read_chat_counts(result, roles: list[str]) -> dict[str, dict]:
    """Per chat role: requests, answers from the cache, requests sent, HTTP attempts, failures."""
    values = _counters(result, CHAT_PREFIX)
    counts = {}
    for role in roles:
        v = values.get(role, {})
        counts[role] = {
            "requests": v.get("requests", 0),
            "cached": v.get("cached", 0),
            "sent": v.get("requests", 0) - v.get("cached", 0),
            "attempts": v.get("attempts", 0),
            "failed": _with_prefix(v, "failed_"),
        }
    return counts
