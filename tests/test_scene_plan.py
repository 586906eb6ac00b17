"""Scene plans: pools by domain and split, look-alike choice, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from groundforge.scenes.plan import PlanSettings, PoolItem, plan_pool, plan_scenes
from groundforge.scenes.sampling import SceneMix


def unit(angle: float) -> tuple[float, float]:
    return (math.cos(angle), math.sin(angle))


def items(prefix: str = "/data", split: str = "sft", domain: str = "flag") -> list[PoolItem]:
    # Entities on a circle: neighbours in angle are look-alikes. Two images of entity "e0".
    out = []
    for i in range(8):
        out.append(PoolItem(f"{prefix}/e{i}.png", f"id{i}", domain, split, f"e{i}", unit(i * 0.3)))
    out.append(PoolItem(f"{prefix}/e0-b.png", "id0b", domain, split, "e0", unit(0.01)))
    return out


def test_every_image_is_a_target_and_members_are_distinct_entities():
    settings = PlanSettings(scenes_per_image=2, queries_per_scene=2)
    plans = plan_pool(items(), settings)
    assert len(plans) == 2 * len(items())
    targets = Counter()
    for plan in plans:
        assert 2 <= len(plan.members) <= 6
        assert len(set(plan.entities)) == len(plan.entities)
        assert len(plan.queries) == 2 and len(set(plan.queries)) == 2
        targets[plan.members[plan.queries[0]]] += 1
    assert set(targets.values()) == {2} and len(targets) == len(items())
    assert len({p.scene_id for p in plans}) == len(plans)


def test_hard_distractors_are_the_nearest_entities():
    mix = SceneMix(k_weights={3: 1.0})
    plans = plan_pool(items(), PlanSettings(mix=mix, hard_fraction=1.0))
    by_target = {p.members[p.queries[0]]: p for p in plans}
    plan = by_target["/data/e4.png"]
    assert plan.distractors == "hard"
    assert sorted(plan.entities) == ["e3", "e4", "e5"]
    # cos(0.3) is the similarity of each neighbour.
    assert plan.similarities[0] == pytest.approx(math.cos(0.3), abs=1e-5)
    easy = plan_pool(items(), PlanSettings(mix=mix, hard_fraction=0.0))
    assert {p.distractors for p in easy} == {"easy"}
    hard_mean = np.mean([p.similarities[0] for p in plans])
    easy_mean = np.mean([p.similarities[0] for p in easy])
    assert hard_mean > easy_mean


def test_k_is_capped_by_the_pool_and_a_single_entity_pool_has_no_scene():
    two = [i for i in items() if i.entity in ("e0", "e1")]
    plans = plan_pool(two, PlanSettings(mix=SceneMix(k_weights={6: 1.0})))
    assert {len(p.members) for p in plans} == {2}
    assert plan_pool([i for i in items() if i.entity == "e0"], PlanSettings()) == []


def test_pools_never_mix_splits_or_domains():
    pool = items("/a", "sft") + items("/b", "val") + items("/c", "sft", "car")
    plans = plan_scenes(pool, PlanSettings())
    by_key = {i.key: i for i in pool}
    for plan in plans:
        members = [by_key[k] for k in plan.members]
        assert {m.split for m in members} == {plan.split}
        assert {m.domain for m in members} == {plan.domain}
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


def test_text_vectors_replace_image_vectors():
    no_images = [PoolItem(i.key, i.image_id, i.domain, i.split, i.entity) for i in items()]
    assert {p.similarities[0] for p in plan_pool(no_images, PlanSettings())} == {None}
    vectors = {f"e{i}": np.array(unit(i * 0.3), dtype=np.float32) for i in range(8)}
    plans = plan_pool(no_images, PlanSettings(mix=SceneMix(k_weights={3: 1.0})), vectors)
    target = {p.members[p.queries[0]]: p for p in plans}["/data/e4.png"]
    assert sorted(target.entities) == ["e3", "e4", "e5"]
