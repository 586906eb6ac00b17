"""Focus scenes: extra scenes for named entities, on top of the usual ones, with the entities a
student took them for and then their nearest look-alikes as distractors; the same plans in
memory and in Beam; the recipe section that sets them."""

from __future__ import annotations

import doctest
import math
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from groundforge.pipelines.plans import PlanScenes
from groundforge.recipe import FocusConfig, RecipeError, parse_recipe
from groundforge.scenes import focus as focus_module
from groundforge.scenes.focus import Focus
from groundforge.scenes.plan import PlanSettings, PoolItem, plan_scenes
from groundforge.scenes.sampling import SceneMix


def pool() -> list[PoolItem]:
    """Ten entities on a circle (neighbours in angle are look-alikes); e0 has three images."""
    out = [
        PoolItem(
            f"/d/e{i}.png", f"id{i}", "flag", "val", f"e{i}", (math.cos(i * 0.3), math.sin(i * 0.3))
        )
        for i in range(10)
    ]
    out += [
        PoolItem(
            f"/d/e0-{j}.png",
            f"id0-{j}",
            "flag",
            "val",
            "e0",
            (math.cos(j * 0.01), math.sin(j * 0.01)),
        )
        for j in (1, 2)
    ]
    return out


def targets(plans) -> Counter:
    return Counter(p.entities[p.queries[0]] for p in plans)


MIX = SceneMix(k_weights={3: 1.0})


def test_focused_entities_get_exactly_their_extra_scenes_and_nothing_else_changes():
    base = PlanSettings(mix=MIX, queries_per_scene=2)
    focus = Focus(scenes={"e0": 5, "e6": 2})
    plain = plan_scenes(pool(), base)
    focused = plan_scenes(pool(), PlanSettings(mix=MIX, queries_per_scene=2, focus=focus))
    # Every usual scene is planned as before, the focus scenes come on top.
    assert set(plain) <= set(focused)
    extra = [p for p in focused if p not in set(plain)]
    assert targets(extra) == Counter({"e0": 5, "e6": 2})
    # One query each: only the focused entity gets samples from its extra scenes.
    assert {len(p.queries) for p in extra} == {1}
    # e0's five scenes are spread over its three images: 2, 2, 1.
    target_images = Counter(
        p.indices[p.queries[0]] for p in extra if p.entities[p.queries[0]] == "e0"
    )
    assert sorted(target_images.values()) == [1, 2, 2]


def test_distractors_are_the_confusions_then_the_nearest_look_alikes():
    focus = Focus(scenes={"e5": 4, "e2": 3}, distractors={"e5": ["e9"]})
    plans = plan_scenes(pool(), PlanSettings(mix=MIX, focus=focus))
    extra = [
        p
        for p in plans
        if p.scene_id not in {q.scene_id for q in plan_scenes(pool(), PlanSettings(mix=MIX))}
    ]
    by_target = {}
    for p in extra:
        by_target.setdefault(p.entities[p.queries[0]], []).append(p)
    # e9 is what the student took e5 for; e4 and e6 are e5's nearest (tied) look-alikes.
    for p in by_target["e5"]:
        assert sorted(p.entities) == ["e4", "e5", "e9"] or sorted(p.entities) == ["e5", "e6", "e9"]
        assert p.distractors == "hard"
    # Without a confusion: the two nearest look-alikes.
    assert {tuple(sorted(p.entities)) for p in by_target["e2"]} == {("e1", "e2", "e3")}


def test_focus_scenes_follow_their_own_mix_and_seed():
    mix = SceneMix(k_weights={2: 1.0}, layout_weights={"grid": 1.0})
    focus = Focus(scenes={"e3": 6}, mix=mix)
    plans = plan_scenes(pool(), PlanSettings(mix=MIX, focus=focus))
    extra = [p for p in plans if len(p.queries) == 1 and len(p.entities) == 2]
    assert len(extra) == 6 and {p.layout for p in extra} == {"grid"}
    again = plan_scenes(pool(), PlanSettings(mix=MIX, focus=focus))
    assert again == plans
    reseeded = plan_scenes(pool(), PlanSettings(mix=MIX, focus=Focus(scenes={"e3": 6}, seed="b")))
    assert {p.scene_id for p in reseeded} != {p.scene_id for p in plans}


def test_beam_focus_plans_are_the_in_memory_plans():
    settings = PlanSettings(
        mix=MIX, focus=Focus(scenes={"e0": 4, "e7": 1}, distractors={"e7": ["e1"]})
    )
    expected = plan_scenes(pool(), settings)
    with beam.Pipeline() as p:
        plans = p | beam.Create(pool()) | PlanScenes(settings)
        assert_that(plans, equal_to(expected))


def recipe(focus: dict) -> dict:
    return {
        "name": "r",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": "images"},
        "scenes": {"k_weights": {2: 1, 3: 1}, "focus": focus},
    }


def test_the_recipe_section_gives_the_focus(tmp_path):
    cfg = parse_recipe(
        recipe(
            {
                "entities": {"Chad": 3},
                "distractors": {"Chad": ["Romania"]},
                "layout_weights": {"grid": 2.0},
            }
        ),
        tmp_path,
    ).scenes
    focus = cfg.focus.settings(SceneMix(k_weights=cfg.k_weights))
    assert focus.scenes == {"Chad": 3} and focus.distractors == {"Chad": ("Romania",)}
    # k weights left out are the scenes section's.
    assert dict(focus.mix.k_weights) == {2: 1, 3: 1} and dict(focus.mix.layout_weights) == {
        "grid": 2.0
    }
    assert FocusConfig(entities={"Chad": 1}).settings().mix is None


@pytest.mark.parametrize(
    "focus, field",
    [
        ({"entities": {"Chad": -1}}, "entities.Chad"),
        ({"entities": {"Chad": 1}, "layout_weights": {"spiral": 1.0}}, "spiral"),
        ({"entities": {"Chad": 1}, "hard_fraction": 2}, "hard_fraction"),
    ],
)
def test_a_bad_focus_names_its_field(tmp_path, focus, field):
    with pytest.raises(RecipeError, match=field):
        parse_recipe(recipe(focus), tmp_path, "r.yaml")


def test_doctests():
    assert doctest.testmod(focus_module).failed == 0
