"""Which images go into which scene: planned per target image, before any pixel moves.

Every image of a (domain, split) pool is the target of ``scenes_per_image`` scenes. A scene draws
``k`` from the mix (capped by the number of entities in the pool), takes ``k - 1`` other entities
as distractors (the target's nearest look-alikes with probability ``hard_fraction``, else random
ones), one image of each, a layout, and an order on the canvas. Pools never mix splits, so a
held-out entity never appears in a training scene, not even as a distractor.

Planning never holds a pool's images in one place, so it scales to a single-domain corpus whose
one pool holds every image. It needs three small things, each built by its own step:

- the pool's :class:`EntityTable` (entity names, image counts, look-alike vectors): bounded by
  the number of entities, built from per-entity :class:`EntityStats` that add up in any order;
- for each entity, its images ranked by record key (:func:`rank_entity`): bounded by one
  entity's images; it numbers the images, so a plan names a member as (entity, index);
- per target image, the table of its pool (:func:`plan_target`).

A plan's members are then resolved from (entity, index) to record keys (:func:`slot_refs`,
:func:`with_members`). Plans are a pure function of the items and the seed: the same items plan
the same scenes on any runner and in any order. :func:`plan_scenes` runs the same steps in memory.
"""

from __future__ import annotations

import operator
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from groundforge.scenes.distractors import DistractorIndex
from groundforge.scenes.focus import Focus
from groundforge.scenes.sampling import SceneMix
from groundforge.schemas.records import Compact, stable_id

# Vector sums are kept in fixed point (Python ints): integer addition is exact, so an entity's
# mean vector is the same whatever order a runner adds its images in. 2**-40 is far below the
# precision of a float32 embedding; embeddings are unit vectors, so no component overflows.
FIXED_POINT = 2.0**40

# (domain, split, entity, index within the entity's images in key order): one image of a pool.
MemberRef = tuple[str, str, str, int]


@dataclass(frozen=True)
class PoolItem(Compact):
    """What planning needs of one image: no pixels."""

    key: str
    image_id: str
    domain: str
    split: str
    entity: str
    embedding: tuple[float, ...] | None = None

    @property
    def pool(self) -> tuple[str, str]:
        return self.domain, self.split

    @property
    def entity_key(self) -> tuple[str, str, str]:
        return self.domain, self.split, self.entity


@dataclass(frozen=True)
class ScenePlan(Compact):
    """One scene to compose: its members in canvas order, and its queries.

    Member ``i`` is image ``indices[i]`` of entity ``entities[i]`` (images of an entity are
    numbered in record key order); ``members`` holds their record keys once resolved
    (:func:`with_members`), an empty key for one that could not be. ``queries`` are member
    indices that become samples, the scene's target first; ``similarities`` holds, per query,
    the mean similarity of the other members' entities to the query's entity (None without
    entity vectors).
    """

    scene_id: str
    domain: str
    split: str
    layout: str
    entities: tuple[str, ...]
    indices: tuple[int, ...]
    queries: tuple[int, ...]
    distractors: str
    similarities: tuple[float | None, ...]
    seed: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanSettings:
    mix: SceneMix = SceneMix()
    scenes_per_image: int = 1
    queries_per_scene: int = 1
    hard_fraction: float = 1.0
    hard_pool: int | None = None
    seed: str = "groundforge"
    focus: Focus | None = None


@dataclass(frozen=True)
class EntityStats:
    """What the entity table needs of one entity's images: how many there are, and the exact
    fixed-point sum of their vectors (None when not summed, or when one image has none)."""

    count: int
    total: tuple[int, ...] | None


def item_stats(item: PoolItem, vectors: bool = True) -> EntityStats:
    """The stats of one image; ``vectors=False`` counts it only (text similarity)."""
    if not vectors or item.embedding is None:
        return EntityStats(1, None)
    fixed = np.rint(np.asarray(item.embedding, dtype=np.float64) * FIXED_POINT)
    return EntityStats(1, tuple(fixed.astype(np.int64).tolist()))


def add_stats(a: EntityStats, b: EntityStats) -> EntityStats:
    """The stats of two disjoint sets of one entity's images (exact, in any order)."""
    if a.total is None or b.total is None:
        return EntityStats(a.count + b.count, None)
    return EntityStats(a.count + b.count, tuple(map(operator.add, a.total, b.total)))


class EntityTable:
    """One pool's entities: names (sorted), image counts and, when every image has a vector (or
    the names were embedded), a :class:`DistractorIndex` of their unit mean vectors.

    Its size is bounded by the number of entities, never by the number of images.
    """

    def __init__(
        self,
        names: Sequence[str],
        counts: Sequence[int],
        vectors: np.ndarray | None = None,
    ):
        self.names = tuple(names)
        self.counts = tuple(int(c) for c in counts)
        if list(self.names) != sorted(set(self.names)):
            raise ValueError("entity names must be unique and sorted")
        if len(self.counts) != len(self.names) or min(self.counts, default=1) < 1:
            raise ValueError("expected one count of at least 1 per entity")
        self._row = {name: i for i, name in enumerate(self.names)}
        self.index = DistractorIndex(self.names, vectors) if vectors is not None else None

    def __len__(self) -> int:
        return len(self.names)

    def with_vectors(self, vectors: np.ndarray) -> EntityTable:
        """The same entities with other vectors (one row per name, e.g. text embeddings)."""
        return EntityTable(self.names, self.counts, vectors)

    def __contains__(self, name: object) -> bool:
        return name in self._row

    def count(self, name: str) -> int:
        return self.counts[self._row[name]]

    def random_others(self, name: str, count: int, rng: random.Random) -> list[str]:
        """``count`` entities other than ``name``, drawn uniformly, in draw order."""
        row = self._row[name]
        # Positions among the others, skipping the target's row: no list of every other entity.
        drawn = rng.sample(range(len(self) - 1), count)
        return [self.names[r + (r >= row)] for r in drawn]

    def mean_similarity(self, query: int, names: Sequence[str]) -> float | None:
        """How alike the other members are to the query's entity (a difficulty signal)."""
        if self.index is None:
            return None
        sims = [self.index.similarity(names[query], n) for i, n in enumerate(names) if i != query]
        return float(np.mean(sims))


def entity_table(
    entries: Iterable[tuple[str, EntityStats]],
    text_vectors: Mapping[str, np.ndarray] | None = None,
) -> EntityTable:
    """A pool's table from its entities' stats: text vectors when given, else the mean of image
    vectors when every image has one, else no vectors (random distractors only)."""
    entries = sorted(entries, key=lambda entry: entry[0])
    names = [name for name, _ in entries]
    counts = [stats.count for _, stats in entries]
    if text_vectors is not None:
        vectors = np.stack([np.asarray(text_vectors[n], dtype=np.float32) for n in names])
    elif entries and all(stats.total is not None for _, stats in entries):
        vectors = np.array(
            [
                np.array(stats.total, dtype=np.float64) / (FIXED_POINT * stats.count)
                for _, stats in entries
            ]
        )
    else:
        vectors = None
    return EntityTable(names, counts, vectors)


@dataclass(frozen=True)
class RankedItem:
    """An image with its place among its entity's images of one pool (record key order), and
    how many earlier images of that entity have the same content (identical files kept twice)."""

    key: str
    image_id: str
    domain: str
    split: str
    entity: str
    index: int
    occurrence: int

    @property
    def ref(self) -> MemberRef:
        return self.domain, self.split, self.entity, self.index


def rank_entity(
    entity_key: tuple[str, str, str], images: Iterable[tuple[str, str]]
) -> list[RankedItem]:
    """Number the ``(record key, image id)`` pairs of one (domain, split, entity) in key order.

    >>> [(r.key, r.index, r.occurrence) for r in rank_entity(("d", "s", "e"),
    ...     [("b", "x"), ("a", "x"), ("c", "y")])]
    [('a', 0, 0), ('b', 1, 1), ('c', 2, 0)]
    """
    domain, split, entity = entity_key
    seen: dict[str, int] = defaultdict(int)
    ranked = []
    for index, (key, image_id) in enumerate(sorted(images)):
        ranked.append(RankedItem(key, image_id, domain, split, entity, index, seen[image_id]))
        seen[image_id] += 1
    return ranked


def _rng_seed(*parts: object) -> int:
    return int(stable_id(*parts)[:16], 16)


def plan_target(target: RankedItem, table: EntityTable, settings: PlanSettings) -> list[ScenePlan]:
    """The ``scenes_per_image`` scenes of one target image, from its pool's entity table, then
    the extra scenes its entity gets from ``settings.focus`` (:mod:`groundforge.scenes.focus`).

    A pool with fewer than two entities makes no scene. Members other than the target are
    named by (entity, index); :func:`with_members` gives them their record keys.
    """
    if len(table) < 2:
        return []
    plans = []
    for n in range(settings.scenes_per_image):
        # Seeds come from image content, not paths, so a recipe plans the same scenes wherever
        # its data lives; the occurrence count tells apart identical images kept twice.
        identity = (settings.seed, target.image_id, target.entity, target.occurrence, n)
        rng = random.Random(_rng_seed(*identity))
        k = min(settings.mix.draw_k(rng), len(table))
        hard = table.index is not None and rng.random() < settings.hard_fraction
        if hard:
            picks = table.index.choose(target.entity, k - 1, "hard", rng, pool=settings.hard_pool)
            chosen = [name for name, _ in picks]
        else:
            chosen = table.random_others(target.entity, k - 1, rng)
        plans.append(
            _placed(
                target, table, identity, rng, chosen, hard, settings.queries_per_scene, settings.mix
            )
        )
    focus = settings.focus
    extra = (
        0
        if focus is None
        else focus.scenes_for(target.entity, target.index, table.count(target.entity))
    )
    for n in range(extra):
        # Their own identities: focus scenes never replace the pool's usual ones.
        identity = (focus.seed, "focus", target.image_id, target.entity, target.occurrence, n)
        rng = random.Random(_rng_seed(*identity))
        mix = focus.mix or settings.mix
        k = min(mix.draw_k(rng), len(table))
        if rng.random() < focus.hard_fraction:
            chosen, hard = focus.look_alikes(target.entity, k - 1, table, rng)
        else:
            chosen, hard = table.random_others(target.entity, k - 1, rng), False
        # One query, the focused entity: the other members are there to be mistaken for it.
        plans.append(_placed(target, table, identity, rng, chosen, hard, 1, mix))
    return plans


def _placed(
    target: RankedItem,
    table: EntityTable,
    identity: tuple,
    rng: random.Random,
    chosen: Sequence[str],
    hard: bool,
    queries_per_scene: int,
    mix: SceneMix,
) -> ScenePlan:
    """The scene of ``target`` and ``chosen``: one image of each, their canvas order, the
    queries (the target first) and the layout, drawn from ``rng`` in that order."""
    slots = [(target.entity, target.index)]
    slots += [(name, rng.randrange(table.count(name))) for name in chosen]
    order = list(range(len(slots)))
    rng.shuffle(order)
    placed = [slots[i] for i in order]
    target_slot = order.index(0)
    rest = [i for i in range(len(placed)) if i != target_slot]
    rng.shuffle(rest)
    queries = (target_slot, *rest[: queries_per_scene - 1])
    names = tuple(name for name, _ in placed)
    return ScenePlan(
        scene_id=stable_id("scene", *identity),
        domain=target.domain,
        split=target.split,
        layout=mix.draw_layout(rng),
        entities=names,
        indices=tuple(index for _, index in placed),
        queries=queries,
        distractors="hard" if hard else "easy",
        similarities=tuple(table.mean_similarity(q, names) for q in queries),
        seed=_rng_seed(*identity),
    )


def slot_refs(plan: ScenePlan) -> list[MemberRef]:
    """The image each member slot of ``plan`` asks for, in canvas order."""
    return [
        (plan.domain, plan.split, entity, index)
        for entity, index in zip(plan.entities, plan.indices, strict=True)
    ]


def with_members(plan: ScenePlan, keys: Mapping[int, str]) -> ScenePlan:
    """``plan`` with the record key of each slot (``keys[slot]``; empty when missing)."""
    return replace(plan, members=tuple(keys.get(slot, "") for slot in range(len(plan.entities))))


def plan_scenes(
    items: Sequence[PoolItem],
    settings: PlanSettings,
    text_vectors: Mapping[str, np.ndarray] | None = None,
) -> list[ScenePlan]:
    """Plans for every (domain, split) pool, sorted by scene id: the pipeline's steps, in memory.

    ``text_vectors`` (entity name -> vector) replaces the mean image vectors when given.
    """
    stats: dict[tuple[str, str, str], EntityStats] = {}
    images: dict[tuple[str, str, str], list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        one = item_stats(item, vectors=text_vectors is None)
        key = item.entity_key
        stats[key] = add_stats(stats[key], one) if key in stats else one
        images[key].append((item.key, item.image_id))
    entries: dict[tuple[str, str], list[tuple[str, EntityStats]]] = defaultdict(list)
    for (domain, split, entity), entity_stats in stats.items():
        entries[(domain, split)].append((entity, entity_stats))
    tables = {pool: entity_table(e, text_vectors) for pool, e in entries.items()}
    keys: dict[MemberRef, str] = {}
    drafts: list[ScenePlan] = []
    for entity_key, pairs in images.items():
        for target in rank_entity(entity_key, pairs):
            keys[target.ref] = target.key
            drafts.extend(plan_target(target, tables[entity_key[:2]], settings))
    plans = [
        with_members(plan, {slot: keys[ref] for slot, ref in enumerate(slot_refs(plan))})
        for plan in drafts
    ]
    return sorted(plans, key=lambda p: p.scene_id)
