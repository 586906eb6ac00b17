"""Which images go into which scene: the plan made once over the whole run, before any pixel moves.

Every image of a (domain, split) pool is the target of ``scenes_per_image`` scenes. A scene draws
``k`` from the mix (capped by the number of entities in the pool), takes ``k - 1`` other entities
as distractors (the target's nearest look-alikes with probability ``hard_fraction``, else random
ones), one image of each, a layout, and an order on the canvas. Pools never mix splits, so a
held-out entity never appears in a training scene, not even as a distractor. The plan is a pure
function of the items and the seed: the same run plans the same scenes on any runner.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from groundforge.scenes.distractors import DistractorIndex, entity_vectors
from groundforge.scenes.sampling import SceneMix
from groundforge.schemas.records import stable_id


@dataclass(frozen=True)
class PoolItem:
    """What planning needs of one image: no pixels, so the whole run's items fit in one worker."""

    key: str
    image_id: str
    domain: str
    split: str
    entity: str
    embedding: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ScenePlan:
    """One scene to compose: its members (pool item keys) in canvas order, and its queries.

    ``queries`` are member indices that become samples, the scene's target first;
    ``similarities`` holds, per query, the mean similarity of the other members' entities to the
    query's entity (None without entity vectors).
    """

    scene_id: str
    domain: str
    split: str
    layout: str
    members: tuple[str, ...]
    entities: tuple[str, ...]
    queries: tuple[int, ...]
    distractors: str
    similarities: tuple[float | None, ...]
    seed: int


@dataclass(frozen=True)
class PlanSettings:
    mix: SceneMix = SceneMix()
    scenes_per_image: int = 1
    queries_per_scene: int = 1
    hard_fraction: float = 1.0
    hard_pool: int | None = None
    seed: str = "groundforge"


def _rng_seed(*parts: object) -> int:
    return int(stable_id(*parts)[:16], 16)


def _pool_vectors(
    items: Sequence[PoolItem], text_vectors: Mapping[str, np.ndarray] | None
) -> tuple[list[str], np.ndarray] | None:
    """Entity names and their vectors: given (text embeddings), or the mean of image vectors."""
    if text_vectors is not None:
        names = sorted({i.entity for i in items})
        return names, np.stack([text_vectors[n] for n in names]).astype(np.float32)
    if any(i.embedding is None for i in items):
        return None
    vectors = np.array([i.embedding for i in items], dtype=np.float32)
    return entity_vectors([i.entity for i in items], vectors)


def plan_pool(
    items: Sequence[PoolItem],
    settings: PlanSettings,
    text_vectors: Mapping[str, np.ndarray] | None = None,
) -> list[ScenePlan]:
    """The scenes of one (domain, split) pool. A pool with fewer than two entities has none."""
    items = sorted(items, key=lambda i: i.key)
    by_entity: dict[str, list[PoolItem]] = defaultdict(list)
    for item in items:
        by_entity[item.entity].append(item)
    if len(by_entity) < 2:
        return []
    vectors = _pool_vectors(items, text_vectors)
    index = pairwise = None
    if vectors is not None:
        index = DistractorIndex(*vectors)
        position = {name: i for i, name in enumerate(vectors[0])}
        pairwise = vectors[1] @ vectors[1].T

    def mean_similarity(query: int, names: tuple[str, ...]) -> float | None:
        """How alike the other members are to the query's entity (a difficulty signal)."""
        if pairwise is None:
            return None
        row = position[names[query]]
        return float(
            np.mean([pairwise[row, position[n]] for i, n in enumerate(names) if i != query])
        )

    entities = sorted(by_entity)
    plans = []
    # Seeds come from image content, not paths, so a recipe plans the same scenes wherever its
    # data lives; the occurrence count tells apart identical images kept twice (dedup off).
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for target in items:
        occurrence = seen[(target.image_id, target.entity)]
        seen[(target.image_id, target.entity)] += 1
        for n in range(settings.scenes_per_image):
            identity = (settings.seed, target.image_id, target.entity, occurrence, n)
            seed = _rng_seed(*identity)
            rng = random.Random(seed)
            k = min(settings.mix.draw_k(rng), len(entities))
            hard = index is not None and rng.random() < settings.hard_fraction
            others = [e for e in entities if e != target.entity]
            if hard:
                chosen = [
                    name
                    for name, _ in index.choose(
                        target.entity, k - 1, "hard", rng, pool=settings.hard_pool
                    )
                ]
            else:
                chosen = rng.sample(others, k - 1)
            members = [target] + [rng.choice(by_entity[name]) for name in chosen]
            order = list(range(len(members)))
            rng.shuffle(order)
            placed = [members[i] for i in order]
            target_slot = order.index(0)
            rest = [i for i in range(len(placed)) if i != target_slot]
            rng.shuffle(rest)
            queries = (target_slot, *rest[: settings.queries_per_scene - 1])
            names = tuple(m.entity for m in placed)
            sims = tuple(mean_similarity(q, names) for q in queries)
            plans.append(
                ScenePlan(
                    scene_id=stable_id("scene", *identity),
                    domain=target.domain,
                    split=target.split,
                    layout=settings.mix.draw_layout(rng),
                    members=tuple(m.key for m in placed),
                    entities=names,
                    queries=queries,
                    distractors="hard" if hard else "easy",
                    similarities=sims,
                    seed=seed,
                )
            )
    return plans


def plan_scenes(
    items: Sequence[PoolItem],
    settings: PlanSettings,
    text_vectors: Mapping[str, np.ndarray] | None = None,
) -> list[ScenePlan]:
    """Plans for every (domain, split) pool, sorted by scene id."""
    pools: dict[tuple[str, str], list[PoolItem]] = defaultdict(list)
    for item in items:
        pools[(item.domain, item.split)].append(item)
    plans = []
    for pool in sorted(pools):
        plans.extend(plan_pool(pools[pool], settings, text_vectors))
    return sorted(plans, key=lambda p: p.scene_id)
