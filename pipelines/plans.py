"""Planning compositions (scenes, crowds) and joining the plans with their member records.

No step holds a whole pool: scene planning gathers per pool only a table of its entities, and
per entity only its record keys; crowd planning gathers per pool only its size, and per crowd
only its ``count[1]`` best candidates. A plan names its members by record key; the graph routes
every record to the plan slots that ask for it, then gathers each plan with its members in slot
order.
"""

from __future__ import annotations

import apache_beam as beam

from groundforge.filters.verdict import Verdict
from groundforge.scenes.crowd import CrowdSpec, crowd_offers, crowd_plan
from groundforge.scenes.plan import (
    EntityStats,
    PlanSettings,
    add_stats,
    entity_table,
    item_stats,
    plan_target,
    rank_entity,
    slot_refs,
    with_members,
)


class EntityStatsFn(beam.CombineFn):
    """Per-entity :class:`EntityStats` (image count, exact vector sum): an entity's images never
    meet in one element."""

    def __init__(self, vectors: bool):
        self.vectors = vectors

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, item):
        one = item_stats(item, self.vectors)
        return one if accumulator is None else add_stats(accumulator, one)

    def merge_accumulators(self, accumulators):
        merged = None
        for stats in accumulators:
            if stats is not None:
                merged = stats if merged is None else add_stats(merged, stats)
        return merged

    def extract_output(self, accumulator) -> EntityStats:
        return accumulator


class NameVectors(beam.DoFn):
    """Put text vectors of its entity names on each pool's table (``similarity: text``): one
    pool's names at a time, the model loaded once per worker."""

    def __init__(self, model: str | None):
        self.model = model

    def setup(self):
        from groundforge.annotators.embed import TextEmbedder

        self._embedder = TextEmbedder(self.model)

    def process(self, keyed):
        pool, table = keyed
        yield pool, table.with_vectors(self._embedder.embed_texts(list(table.names)))


def _plan_with_table(target, settings: PlanSettings, tables):
    # A multimap side input is fetched per key: a worker reads only the pools it plans.
    (table,) = tables[(target.domain, target.split)]
    return plan_target(target, table, settings)


def _slot_requests(plan):
    for slot, ref in enumerate(slot_refs(plan)):
        yield ref, (plan.scene_id, slot)


def _resolve_slots(keyed):
    _, grouped = keyed
    for key in grouped["key"]:
        for scene_id, slot in grouped["want"]:
            yield scene_id, (slot, key)


def _resolved_plan(keyed):
    _, grouped = keyed
    (plan,) = grouped["plan"]
    return with_members(plan, dict(grouped["slots"]))


class PlanScenes(beam.PTransform):
    """``PoolItem`` -> resolved :class:`~groundforge.scenes.plan.ScenePlan` (the same plans as
    :func:`~groundforge.scenes.plan.plan_scenes`). ``text_model`` (a name or None for the
    default) embeds entity names instead of averaging image vectors."""

    def __init__(self, settings: PlanSettings, text: bool = False, text_model: str | None = None):
        super().__init__()
        self.settings = settings
        self.text = text
        self.text_model = text_model

    def expand(self, items):
        by_entity = items | "by entity" >> beam.Map(lambda item: (item.entity_key, item))
        tables = (
            by_entity
            | "entity stats" >> beam.CombinePerKey(EntityStatsFn(vectors=not self.text))
            | "by pool" >> beam.MapTuple(lambda key, stats: (key[:2], (key[2], stats)))
            | "pool entities" >> beam.GroupByKey()
            | "entity tables" >> beam.MapTuple(lambda pool, entries: (pool, entity_table(entries)))
        )
        if self.text:
            tables = tables | "name vectors" >> beam.ParDo(NameVectors(self.text_model))
        ranked = (
            by_entity
            | "image ids" >> beam.MapTuple(lambda key, item: (key, (item.key, item.image_id)))
            | "entity images" >> beam.GroupByKey()
            | "rank images" >> beam.FlatMapTuple(rank_entity)
        )
        drafts = ranked | "plan targets" >> beam.FlatMap(
            _plan_with_table, self.settings, tables=beam.pvalue.AsMultiMap(tables)
        )
        refs = ranked | "image refs" >> beam.Map(lambda target: (target.ref, target.key))
        requests = drafts | "slot requests" >> beam.FlatMap(_slot_requests)
        resolved = (
            {"key": refs, "want": requests}
            | "find slot images" >> beam.CoGroupByKey()
            | "slot keys" >> beam.FlatMap(_resolve_slots)
        )
        keyed = drafts | "key drafts" >> beam.Map(lambda plan: (plan.scene_id, plan))
        return (
            {"plan": keyed, "slots": resolved}
            | "gather slots" >> beam.CoGroupByKey()
            | "resolved plans" >> beam.Map(_resolved_plan)
        )


def _offers(item, spec: CrowdSpec, per_image: float, seed: str, sizes):
    for n, rank in crowd_offers(item, sizes[item.pool], spec, per_image, seed):
        yield (*item.pool, n), (rank, item.key)


class PlanCrowds(beam.PTransform):
    """``PoolItem`` -> :class:`~groundforge.scenes.crowd.CrowdPlan` (the same plans as
    :func:`~groundforge.scenes.crowd.plan_crowds`)."""

    def __init__(self, spec: CrowdSpec, per_image: float, seed: str):
        super().__init__()
        self.spec = spec
        self.per_image = per_image
        self.seed = seed

    def expand(self, items):
        sizes = (
            items
            | "pools" >> beam.Map(lambda item: item.pool)
            | "pool sizes" >> beam.combiners.Count.PerElement()
        )
        offers = items | "offers" >> beam.FlatMap(
            _offers, self.spec, self.per_image, self.seed, sizes=beam.pvalue.AsDict(sizes)
        )
        return (
            offers
            | "fill crowds" >> beam.combiners.Top.SmallestPerKey(self.spec.count[1])
            | "crowd plans" >> beam.Map(lambda kept, seed: crowd_plan(*kept, seed), self.seed)
        )


def wanted_members(plan):
    """``(record key, (plan id, slot))`` for each member slot of ``plan``."""
    for slot, key in enumerate(plan.members):
        yield key, (plan.scene_id, slot)


def claimed_records(keyed):
    """``(record, whether some plan wants it)`` for each record of a joined key."""
    _, grouped = keyed
    wanted = next(iter(grouped["want"]), None) is not None
    for record in grouped["record"]:
        yield record, wanted


def route_members(keyed):
    """Send a record to every plan slot that asked for it."""
    _, grouped = keyed
    for record in grouped["record"]:
        for plan_id, slot in grouped["want"]:
            yield plan_id, (slot, record)


def gather_members(keyed, missing_reason: str) -> Verdict:
    """``(plan, members in slot order)``, or a drop when a member never arrived."""
    _, grouped = keyed
    (plan,) = grouped["plan"]
    members = tuple(record for _, record in sorted(grouped["members"], key=lambda m: m[0]))
    if len(members) != len(plan.members):
        return Verdict.drop(missing_reason, expected=len(plan.members), found=len(members))
    return Verdict.ok((plan, members))
