"""Scene plans: pools by domain and split, look-alike choice, determinism in any order, bounded
steps, and the Beam planning giving the in-memory plans on two runners."""

from __future__ import annotations

import math
import pickle
import random
from collections import Counter
from dataclasses import replace

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from groundforge.pipelines.plans import PlanScenes
from groundforge.scenes import plan as plan_module
from groundforge.scenes.plan import (
    EntityStats,
    PlanSettings,
    PoolItem,
    add_stats,
    entity_table,
    item_stats,
    plan_scenes,
    plan_target,
    rank_entity,
    slot_refs,
    with_members,
)
from groundforge.scenes.sampling import SceneMix

RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def unit(angle: float) -> tuple[float, float]:
    return (math.cos(angle), math.sin(angle))


def items(prefix: str = "/data", split: str = "sft", domain: str = "flag") -> list[PoolItem]:
    # Entities on a circle: neighbours in angle are look-alikes. Two images of entity "e0".
    out = []
    for i in range(8):
        out.append(PoolItem(f"{prefix}/e{i}.png", f"id{i}", domain, split, f"e{i}", unit(i * 0.3)))
    out.append(PoolItem(f"{prefix}/e0-b.png", "id0b", domain, split, "e0", unit(0.01)))
    return out


def crowded(seed: int = 0) -> list[PoolItem]:
    """Two pools of many images per entity, random vectors, and identical images kept twice."""
    rng = np.random.default_rng(seed)
    out = []
    for split, entities in (("sft", 6), ("val", 3)):
        for e in range(entities):
            for i in range(int(rng.integers(1, 12))):
                vector = rng.normal(size=16)
                vector /= np.linalg.norm(vector)
                image_id = f"{split}-{e}-{i}"
                key = f"/{split}/{e}/{i}.png"
                out.append(PoolItem(key, image_id, "flag", split, f"{split}{e}", tuple(vector)))
                if i % 4 == 0:  # the same file under a second name (dedup off)
                    out.append(
                        PoolItem(
                            key + ".copy", image_id, "flag", split, f"{split}{e}", tuple(vector)
                        )
                    )
    return out


def test_every_image_is_a_target_and_members_are_distinct_entities():
    settings = PlanSettings(scenes_per_image=2, queries_per_scene=2)
    plans = plan_scenes(items(), settings)
    assert len(plans) == 2 * len(items())
    by_key = {i.key: i for i in items()}
    ranks = {
        r.ref: r.key
        for r in rank_entity(
            ("flag", "sft", "e0"), [("/data/e0.png", "id0"), ("/data/e0-b.png", "id0b")]
        )
    }
    assert ranks == {
        ("flag", "sft", "e0", 0): "/data/e0-b.png",
        ("flag", "sft", "e0", 1): "/data/e0.png",
    }
    targets = Counter()
    for plan in plans:
        assert 2 <= len(plan.members) <= 6
        assert len(set(plan.entities)) == len(plan.entities)
        # Each member is the image its slot names: of its entity, at its rank in key order.
        assert [by_key[k].entity for k in plan.members] == list(plan.entities)
        for ref, key in zip(slot_refs(plan), plan.members, strict=True):
            assert ref[2] != "e0" or ranks[ref] == key
        assert len(plan.queries) == 2 and len(set(plan.queries)) == 2
        targets[plan.members[plan.queries[0]]] += 1
    assert set(targets.values()) == {2} and len(targets) == len(items())
    assert len({p.scene_id for p in plans}) == len(plans)


def test_hard_distractors_are_the_nearest_entities():
    mix = SceneMix(k_weights={3: 1.0})
    plans = plan_scenes(items(), PlanSettings(mix=mix, hard_fraction=1.0))
    by_target = {p.members[p.queries[0]]: p for p in plans}
    plan = by_target["/data/e4.png"]
    assert plan.distractors == "hard"
    assert sorted(plan.entities) == ["e3", "e4", "e5"]
    # cos(0.3) is the similarity of each neighbour.
    assert plan.similarities[0] == pytest.approx(math.cos(0.3), abs=1e-5)
    easy = plan_scenes(items(), PlanSettings(mix=mix, hard_fraction=0.0))
    assert {p.distractors for p in easy} == {"easy"}
    hard_mean = np.mean([p.similarities[0] for p in plans])
    easy_mean = np.mean([p.similarities[0] for p in easy])
    assert hard_mean > easy_mean


def test_k_is_capped_by_the_pool_and_a_single_entity_pool_has_no_scene():
    two = [i for i in items() if i.entity in ("e0", "e1")]
    plans = plan_scenes(two, PlanSettings(mix=SceneMix(k_weights={6: 1.0})))
    assert len(plans) == 3 and {len(p.members) for p in plans} == {2}
    assert plan_scenes([i for i in items() if i.entity == "e0"], PlanSettings()) == []


def test_pools_never_mix_splits_or_domains():
    held_out = [PoolItem(f"/v/{i}", f"v{i}", "flag", "val", f"v{i % 3}", unit(i)) for i in range(9)]
    pool = items("/a", "sft") + held_out + items("/c", "sft", "car")
    plans = plan_scenes(pool, PlanSettings(mix=SceneMix(k_weights={6: 1.0})))
    by_key = {i.key: i for i in pool}
    for plan in plans:
        members = [by_key[k] for k in plan.members]
        assert {m.split for m in members} == {plan.split}
        assert {m.domain for m in members} == {plan.domain}
    # A held-out entity never appears in a training scene, not even as a distractor.
    train = {e for p in plans if p.split == "sft" for e in p.entities}
    assert train and not train & {"v0", "v1", "v2"}
    assert Counter((p.domain, p.split) for p in plans) == {
        ("flag", "sft"): 9,
        ("flag", "val"): 9,
        ("car", "sft"): 9,
    }


def test_plans_depend_on_content_not_on_where_files_live():
    a = plan_scenes(items("/home/me/data"), PlanSettings())
    b = plan_scenes(list(reversed(items("/mnt/other"))), PlanSettings())
    strip = [(p.scene_id, p.layout, p.entities, p.queries, p.distractors) for p in a]
    assert strip == [(p.scene_id, p.layout, p.entities, p.queries, p.distractors) for p in b]
    c = plan_scenes(items(), PlanSettings(seed="another"))
    assert [p.scene_id for p in c] != [p.scene_id for p in a]


def test_the_same_plans_whatever_the_input_order():
    pool = crowded()
    settings = PlanSettings(scenes_per_image=2, queries_per_scene=2, hard_fraction=0.5)
    reference = plan_scenes(pool, settings)
    assert len(reference) == 2 * len(pool)
    # Identical images kept twice plan different scenes (their occurrence tells them apart).
    assert len({p.scene_id for p in reference}) == len(reference)
    for seed in range(5):
        shuffled = list(pool)
        random.Random(seed).shuffle(shuffled)
        assert plan_scenes(shuffled, settings) == reference


def test_vector_sums_are_exact_in_any_order():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(200, 32)) * rng.uniform(0.001, 1, size=(200, 1))
    one = [
        item_stats(PoolItem(str(i), str(i), "d", "s", "e", tuple(v))) for i, v in enumerate(vectors)
    ]
    forward = one[0]
    for stats in one[1:]:
        forward = add_stats(forward, stats)
    # Pairwise, from the other end: a different tree of additions, as two workers would make.
    level = one[::-1]
    while len(level) > 1:
        level = [
            add_stats(*level[i : i + 2]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    assert level[0] == forward and forward.count == 200
    table = entity_table([("e", forward), ("f", one[0])])
    again = entity_table([("f", one[0]), ("e", level[0])])
    assert table.index.vectors.tobytes() == again.index.vectors.tobytes()
    mean = vectors.mean(axis=0)
    assert table.index.vectors[0] == pytest.approx(mean / np.linalg.norm(mean), abs=1e-6)
    # One image without a vector: the entity, hence its pool, has no mean vector.
    missing = add_stats(forward, item_stats(PoolItem("x", "x", "d", "s", "e")))
    assert missing == EntityStats(201, None)
    assert entity_table([("e", missing), ("f", one[0])]).index is None


def test_no_step_holds_more_than_a_pool_table_or_an_entity():
    # A single-entity-heavy pool of 2,000 images: 1,990 of "big", one of each of ten others.
    pool = [
        PoolItem(f"/big/{i:04}", f"b{i}", "flag", "sft", "big", unit(i / 2000)) for i in range(1990)
    ]
    pool += [
        PoolItem(f"/o/{i}", f"o{i}", "flag", "sft", f"o{i}", unit(1 + i / 5)) for i in range(10)
    ]
    by_entity: dict[str, list[PoolItem]] = {}
    for item in pool:
        by_entity.setdefault(item.entity, []).append(item)

    # Per-entity stats: a count and one sum, the size of one image's stats.
    big = by_entity["big"]
    stats = {e: item_stats(group[0]) for e, group in by_entity.items()}
    for item in big[1:]:
        stats["big"] = add_stats(stats["big"], item_stats(item))
    assert stats["big"].count == 1990 and len(stats["big"].total) == 2
    assert len(pickle.dumps(stats["big"])) <= len(pickle.dumps(item_stats(big[0]))) + 16

    # The pool's table: one row per entity, as small as for a pool of one image per entity.
    table = entity_table(stats.items())
    small = entity_table((e, item_stats(group[0])) for e, group in by_entity.items())
    assert len(table) == 11 and table.count("big") == 1990
    assert len(pickle.dumps(table)) <= len(pickle.dumps(small)) + 16

    # The ranking holds one entity's keys; a target plans from one item and the table.
    ranked = rank_entity(("flag", "sft", "big"), [(i.key, i.image_id) for i in big])
    assert [r.index for r in ranked] == list(range(1990))
    assert {r.entity for r in ranked} == {"big"}
    settings = PlanSettings(scenes_per_image=3, mix=SceneMix(k_weights={6: 1.0}))
    drafts = plan_target(ranked[5], table, settings)
    assert len(drafts) == 3 and {len(d.entities) for d in drafts} == {6}
    assert all(d.members == () and slot_refs(d)[d.queries[0]][3] == 5 for d in drafts)
    # Big's images are drawn among all 1,990 of them as random distractors of the others.
    plans = plan_scenes(pool, replace(settings, hard_fraction=0.0))
    drawn = [
        i
        for p in plans
        if p.members[p.queries[0]].startswith("/o/")
        for e, i in zip(p.entities, p.indices, strict=True)
        if e == "big"
    ]
    assert len(drawn) >= 5 and len(set(drawn)) == len(drawn) and max(drawn) < 1990
    assert all(max(len(p.members), len(p.entities)) == 6 for p in plans)


def test_text_vectors_replace_image_vectors():
    no_images = [PoolItem(i.key, i.image_id, i.domain, i.split, i.entity) for i in items()]
    assert {p.similarities[0] for p in plan_scenes(no_images, PlanSettings())} == {None}
    assert {p.distractors for p in plan_scenes(no_images, PlanSettings())} == {"easy"}
    vectors = {f"e{i}": np.array(unit(i * 0.3), dtype=np.float32) for i in range(8)}
    plans = plan_scenes(no_images, PlanSettings(mix=SceneMix(k_weights={3: 1.0})), vectors)
    target = {p.members[p.queries[0]]: p for p in plans}["/data/e4.png"]
    assert sorted(target.entities) == ["e3", "e4", "e5"]


def test_an_unresolved_member_has_an_empty_key():
    (draft,) = plan_target(
        rank_entity(("flag", "sft", "e1"), [("/data/e1.png", "id1")])[0],
        entity_table([("e0", EntityStats(1, None)), ("e1", EntityStats(1, None))]),
        PlanSettings(),
    )
    target = draft.queries[0]
    resolved = with_members(draft, {target: "/data/e1.png"})
    assert resolved.members[target] == "/data/e1.png"
    assert resolved.members[1 - target] == ""


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_beam_plans_are_the_in_memory_plans(runner):
    pool = crowded(1) + items("/a", "sft", "car") + [items("/solo", "val", "car")[0]]
    settings = PlanSettings(scenes_per_image=2, queries_per_scene=2, hard_fraction=0.5)
    expected = plan_scenes(pool, settings)
    assert len(expected) == 2 * (len(pool) - 1)  # the lone car image has no scene
    with beam.Pipeline(options=PipelineOptions(RUNNERS[runner])) as p:
        plans = p | beam.Create(pool) | PlanScenes(settings)
        assert_that(plans, equal_to(expected))


def test_doctests():
    import doctest

    assert doctest.testmod(plan_module).failed == 0
