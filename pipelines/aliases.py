"""Entities that are one picture under two names: the run's alias table.

When dedup drops every image of an entity B as copies of another entity's images, B's pictures
are A's under another name ("Saint Pierre and Miquelon" and "France St Pierre And Miquelon"):
B is an *alias* of A, the entity whose image B's were most often copies of. :class:`TallyAliases`
finds them without gathering the run: images kept per entity and twin entities per entity are
combined per key, then joined per entity, and each alias is reported as a Beam counter.
:func:`read_aliases` turns the counters into ``{entity: [aliases]}`` for the manifest, the card
and the report.

>>> resolve_aliases({"B": "A", "C": "B"})
{'A': ['B', 'C']}
"""

from __future__ import annotations

import json
from collections import defaultdict

import apache_beam as beam
from apache_beam.metrics import Metrics

from groundforge.pipelines.metrics import counters
from groundforge.schemas.records import Rejection

ALIAS_NAMESPACE = "aliases:pairs"
_SEPARATOR = "\t"


def twin_entities(rejection: Rejection) -> list[tuple[str, str]]:
    """``[(entity, twin's entity)]`` of a duplicate whose twin shows another entity, else ``[]``."""
    if not rejection.reason.startswith("duplicate_") or not rejection.entity:
        return []
    twin = json.loads(rejection.detail or "{}").get("kept_entity", "")
    return [(rejection.entity, twin)] if twin and twin != rejection.entity else []


def alias_of(kept: int, twins: dict[str, int]) -> str | None:
    """The entity an entity with ``kept`` images left and ``twins`` (twin entity -> copies) is
    an alias of: the most frequent twin (then the first name) when none of its images is left."""
    if kept or not twins:
        return None
    return min(twins, key=lambda name: (-twins[name], name))


def _count_alias(element) -> None:
    entity, joined = element
    twins: dict[str, int] = defaultdict(int)
    for twin, copies in joined["twins"]:
        twins[twin] += copies
    canonical = alias_of(sum(joined["kept"]), twins)
    if canonical is not None:
        Metrics.counter(ALIAS_NAMESPACE, f"{entity}{_SEPARATOR}{canonical}").inc()


class TallyAliases(beam.PTransform):
    """kept records -> nothing; counts every alias pair, given the dedup stage's ``rejected``."""

    def __init__(self, rejected):
        super().__init__()
        self.rejected = rejected

    def expand(self, records):
        kept = (
            records
            | "entity of kept" >> beam.Map(lambda r: (r.entity, 1))
            | "kept per entity" >> beam.CombinePerKey(sum)
        )
        twins = (
            self.rejected
            | "twin entities" >> beam.FlatMap(twin_entities)
            | "copies per twin" >> beam.combiners.Count.PerElement()
            | "by entity" >> beam.Map(lambda pair: (pair[0][0], (pair[0][1], pair[1])))
        )
        return (
            {"kept": kept, "twins": twins}
            | "kept and twins" >> beam.CoGroupByKey()
            | "count aliases" >> beam.Map(_count_alias)
        )


def resolve_aliases(alias_to: dict[str, str]) -> dict[str, list[str]]:
    """``{entity: sorted aliases}`` from ``{alias: entity}``, following chains (B copies A's
    images and C copies B's) to the entity at their end."""
    table: dict[str, list[str]] = defaultdict(list)
    for alias in alias_to:
        seen, name = {alias}, alias_to[alias]
        while name in alias_to and name not in seen:
            seen.add(name)
            name = alias_to[name]
        table[name].append(alias)
    return {name: sorted(aliases) for name, aliases in sorted(table.items())}


def read_aliases(result) -> dict[str, list[str]]:
    """The alias table of a finished pipeline ``result`` (empty when no entity is an alias)."""
    pairs = counters(result, ALIAS_NAMESPACE).get("", {})
    alias_to = {}
    for name, count in pairs.items():
        if count:
            alias, canonical = name.split(_SEPARATOR, 1)
            alias_to[alias] = canonical
    return resolve_aliases(alias_to)
