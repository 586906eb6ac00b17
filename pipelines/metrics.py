"""The stage funnel, read back from Beam's counters after a run."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from apache_beam.metrics.metric import MetricsFilter

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


def read_funnel(result, stages: list[str]) -> list[StageCount]:
    """Counts of every stage in ``stages`` order (a stage that saw nothing reports zeros).

    Portable runners report only committed values, the DirectRunner both; committed wins.
    """
    values: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        ns = counter.key.metric.namespace
        if not ns.startswith(NAMESPACE_PREFIX):
            continue
        value = counter.committed if counter.committed is not None else counter.attempted
        values[ns[len(NAMESPACE_PREFIX) :]][counter.key.metric.name] += int(value or 0)
    funnel = []
    for stage in stages:
        v = values.get(stage, {})
        dropped = {
            name[len("dropped_") :]: n for name, n in v.items() if name.startswith("dropped_") and n
        }
        funnel.append(StageCount(stage, v.get("total", 0), v.get("kept", 0), dropped))
    return funnel
