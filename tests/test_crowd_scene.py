"""Synthetic crowds: exact visible boxes, full boxes, overlap control, determinism, real flags;
crowd plans drawn per image, bounded per crowd, the same in any order and on two Beam runners."""

from __future__ import annotations

import doctest
import io
import itertools
import pickle
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from groundforge.annotators.foreground import ForegroundAnnotator
from groundforge.filters.image import check_image
from groundforge.pipelines.plans import PlanCrowds
from groundforge.scenes import crowd as crowd_module
from groundforge.scenes.compose import RESAMPLE
from groundforge.scenes.crowd import (
    CrowdSpec,
    compose_crowd,
    crowd_offers,
    crowd_plan,
    crowds_in_pool,
    plan_crowds,
)
from groundforge.scenes.plan import PoolItem
from groundforge.schemas.box import Box, mask_box
from groundforge.schemas.records import ImageRecord, sha256_hex

FLAGS = Path(__file__).resolve().parent.parent / "examples" / "data" / "flags" / "africa"
# Outside its box every member is this colour: it is neither a member colour nor the canvas
# background, so seeing it on a canvas means something other than the trusted box was pasted.
SURROUND = (250, 250, 5)
# 64 solid colours, every channel 0, 60, 120 or 180: far apart, and none is white or SURROUND.
COLOURS = list(itertools.product((0, 60, 120, 180), repeat=3))
SMALL = CrowdSpec(width=200, height=150, count=(12, 24), scale=(0.15, 0.35))


def solid_member(colour: tuple[int, int, int], index: int) -> ImageRecord:
    """A member whose trusted box is one solid ``colour``; sizes and aspects vary with index."""
    width, height = 40 + 7 * (index % 5), 30 + 11 * (index % 4)
    box = Box(3 + index % 3, 2 + index % 4, width - 4, height - 3 - index % 2)
    image = Image.new("RGB", (width, height), SURROUND)
    image.paste(colour, tuple(int(v) for v in box.to_list()))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    return ImageRecord(sha256_hex(data), data, width, height, "test", box=box)


MEMBERS = [solid_member(colour, i) for i, colour in enumerate(COLOURS)]
COLOUR_OF = {member.image_id: colour for member, colour in zip(MEMBERS, COLOURS, strict=True)}


def pixels(scene) -> np.ndarray:
    with Image.open(io.BytesIO(scene.image)) as image:
        assert image.format == "PNG"
        assert image.size == (scene.width, scene.height)
        return np.asarray(image.convert("RGB"))


def colour_masks(scene) -> list[np.ndarray]:
    """Per instance, where its member's colour shows on the canvas (members are all distinct)."""
    assert len(set(scene.source_image_ids)) == len(scene.instances)
    canvas = pixels(scene)
    return [(canvas == COLOUR_OF[i]).all(axis=2) for i in scene.source_image_ids]


def mean_covered(spec: CrowdSpec, seeds: range) -> float:
    return float(
        np.mean([1 - np.mean(compose_crowd(MEMBERS, spec, s).visible_fraction) for s in seeds])
    )


@pytest.mark.parametrize("overlap", [0.3, 0.6])
def test_visible_boxes_and_fractions_match_the_pixels(overlap):
    spec = replace(SMALL, overlap=overlap)
    partly_hidden = 0
    for seed in range(6):
        scene = compose_crowd(MEMBERS, spec, seed)
        for instance, fraction, mask in zip(
            scene.instances, scene.visible_fraction, colour_masks(scene), strict=True
        ):
            assert instance.visible == mask_box(mask)
            assert fraction == pytest.approx(mask.sum() / instance.full.area, abs=1e-12)
            partly_hidden += 0 < fraction < 1
        # Nothing covers the last instance.
        assert scene.visible_fraction[-1] == 1
        assert scene.instances[-1].visible == scene.instances[-1].full
    assert partly_hidden >= 20


def test_full_boxes_hold_every_pixel_of_their_instance_and_lie_in_the_canvas():
    spec = replace(SMALL, overlap=0.4)
    for seed in range(6):
        scene = compose_crowd(MEMBERS, spec, seed)
        masks = colour_masks(scene)
        members = {m.image_id: m for m in MEMBERS}
        for instance, mask, source in zip(
            scene.instances, masks, scene.source_image_ids, strict=True
        ):
            full = instance.full
            assert instance.box == full
            assert 0 <= full.x1 < full.x2 <= scene.width and 0 <= full.y1 < full.y2 <= scene.height
            if mask.any():
                outside = mask.copy()
                outside[int(full.y1) : int(full.y2), int(full.x1) : int(full.x2)] = False
                assert not outside.any()
            # The object keeps the trusted box's aspect at the drawn scale.
            box = members[source].box
            long_side = max(full.width, full.height)
            assert 0.15 * 200 - 1 <= long_side <= 0.35 * 200 + 1
            assert full.width / full.height == pytest.approx(box.width / box.height, rel=0.1)
        # Only member colours and the background show: the surround never left its image.
        assert not (pixels(scene) == SURROUND).all(axis=2).any()


def test_overlap_zero_leaves_every_instance_whole_when_there_is_room():
    spec = CrowdSpec(width=200, height=150, count=(6, 10), scale=(0.1, 0.2), overlap=0)
    for seed in range(25):
        scene = compose_crowd(MEMBERS, spec, seed)
        assert all(f == 1 for f in scene.visible_fraction)
        assert all(i.visible == i.full for i in scene.instances)


def test_overlap_target_is_reached_on_average_and_orders_the_crowds():
    seeds = range(40)
    achieved = [mean_covered(replace(SMALL, overlap=t), seeds) for t in (0.1, 0.3, 0.5)]
    assert achieved[1] == pytest.approx(0.3, abs=0.05)
    assert achieved[2] == pytest.approx(0.5, abs=0.05)
    assert achieved[0] < achieved[1] < achieved[2]


def test_same_seed_same_crowd_other_seed_other_crowd():
    one = compose_crowd(MEMBERS[:10], SMALL, "crowd-1", label="thing")
    again = compose_crowd(MEMBERS[:10], SMALL, "crowd-1", label="thing")
    other = compose_crowd(MEMBERS[:10], SMALL, "crowd-2", label="thing")
    assert one == again
    assert other.image != one.image
    assert other.instances != one.instances


def test_count_stays_in_range_and_members_repeat_only_when_needed():
    spec = replace(SMALL, count=(5, 9))
    counts = set()
    for seed in range(30):
        scene = compose_crowd(MEMBERS[:4], spec, seed)
        counts.add(len(scene.instances))
        uses = [scene.source_image_ids.count(m.image_id) for m in MEMBERS[:4]]
        # Dealt from a reshuffled deck: every member once before any member twice.
        assert max(uses) - min(uses) <= 1
        assert len(scene.visible_fraction) == len(scene.instances)
    assert counts == set(range(5, 10))


def test_instances_below_min_visible_are_ignored():
    spec = replace(SMALL, overlap=0.6, min_visible=0.4)
    flags = []
    for seed in range(6):
        scene = compose_crowd(MEMBERS, spec, seed, label="thing")
        for instance, fraction in zip(scene.instances, scene.visible_fraction, strict=True):
            assert instance.ignore == (fraction < 0.4)
            assert instance.label == "thing"
            assert (instance.visible is None) == (fraction == 0)
            flags.append(instance.ignore)
    assert any(flags) and not all(flags)
    relaxed = compose_crowd(MEMBERS, replace(spec, min_visible=0), 0)
    assert not any(i.ignore for i in relaxed.instances)


def test_crowd_of_bundled_flags():
    annotate = ForegroundAnnotator(background="white")
    members = []
    for path in sorted(FLAGS.glob("*.png"))[:5]:
        data = path.read_bytes()
        record = ImageRecord(sha256_hex(data), data, 0, 0, "flag", entity=path.stem)
        record = annotate(check_image(record).value)
        (found,) = record.candidates["foreground"]
        members.append(replace(record, box=found.box))
    spec = CrowdSpec(count=(12, 12))
    scene = compose_crowd(members, spec, "flags", label="flag")
    assert (scene.width, scene.height) == (640, 480)
    assert pixels(scene).shape == (480, 640, 3)
    assert len(scene.instances) == len(scene.source_image_ids) == 12
    # 12 instances from 5 flags: two full decks and two more.
    assert sorted(scene.source_image_ids.count(m.image_id) for m in members) == [2, 2, 2, 3, 3]
    for instance, fraction in zip(scene.instances, scene.visible_fraction, strict=True):
        assert instance.label == "flag"
        if instance.visible is not None:
            v, f = instance.visible, instance.full
            assert f.x1 <= v.x1 < v.x2 <= f.x2 and f.y1 <= v.y1 < v.y2 <= f.y2
        assert 0 <= fraction <= 1
    assert 0 < 1 - np.mean(scene.visible_fraction) < 0.6
    # Nothing covers the last instance: it shows its flag's trusted box, resized.
    last = scene.instances[-1].full
    member = next(m for m in members if m.image_id == scene.source_image_ids[-1])
    with Image.open(io.BytesIO(member.image)) as image:
        expected = image.convert("RGB").crop(tuple(int(v) for v in member.box.to_list()))
        expected = expected.resize((int(last.width), int(last.height)), RESAMPLE)
    shown = pixels(scene)[int(last.y1) : int(last.y2), int(last.x1) : int(last.x2)]
    assert np.array_equal(shown, np.asarray(expected))


def test_bad_members_and_specs_are_named():
    with pytest.raises(ValueError, match="at least one member"):
        compose_crowd([], SMALL)
    with pytest.raises(ValueError, match="no trusted box"):
        compose_crowd([replace(MEMBERS[0], box=None)], SMALL)
    with pytest.raises(ValueError, match="no area inside"):
        compose_crowd([replace(MEMBERS[0], box=Box(500, 500, 600, 600))], SMALL)
    with pytest.raises(ValueError, match="record says"):
        compose_crowd([replace(MEMBERS[0], width=7)], SMALL)
    for bad in (
        {"count": (0, 3)},
        {"count": (5, 3)},
        {"scale": (0.0, 0.2)},
        {"scale": (0.3, 1.5)},
        {"overlap": 1.0},
        {"overlap": -0.1},
        {"min_visible": 1.5},
        {"width": 0},
        {"background": (0, 0, 300)},
    ):
        with pytest.raises(ValueError):
            CrowdSpec(**bad)


def test_objects_larger_than_the_canvas_are_shrunk_to_fit():
    spec = CrowdSpec(width=50, height=20, count=(3, 3), scale=(1, 1), overlap=0.5)
    scene = compose_crowd(MEMBERS[:3], spec, 0)
    for instance in scene.instances:
        assert instance.full.width <= 50 and instance.full.height <= 20
        assert max(instance.full.width / 50, instance.full.height / 20) == pytest.approx(
            1, abs=0.05
        )


RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def pool(n: int, split: str = "sft", domain: str = "flag") -> list[PoolItem]:
    return [
        PoolItem(f"/{domain}/{split}/{i:05}.png", f"{domain}{split}{i}", domain, split, f"e{i}")
        for i in range(n)
    ]


def test_crowd_plans_per_pool_size_distinct_members_and_no_mixing():
    spec = CrowdSpec(count=(3, 8))
    items = pool(300) + pool(40, "val") + pool(5, "sft", "car")
    plans = plan_crowds(items, spec, 0.2, "seed")
    split_of = {i.key: (i.domain, i.split) for i in items}
    for plan in plans:
        assert 1 <= len(plan.members) <= 8 and len(set(plan.members)) == len(plan.members)
        assert {split_of[k] for k in plan.members} == {(plan.domain, plan.split)}
    assert Counter((p.domain, p.split) for p in plans) == {
        ("flag", "sft"): 60,
        ("flag", "val"): 8,
        ("car", "sft"): 1,  # round(0.2 x 5) = 1
    }
    assert crowds_in_pool(2, 0.1) == 1
    # A pool no bigger than a crowd: every crowd may draw on all of it.
    assert [len(p.members) for p in plans if p.domain == "car"] == [5]
    # Large pools fill their crowds, all but about one in 300 up to count[1].
    sizes = Counter(len(p.members) for p in plans if p.domain == "flag")
    assert sizes[8] >= 66 and min(sizes) >= 3
    assert len({p.scene_id for p in plans}) == len(plans)


def test_crowd_plans_are_the_same_whatever_the_input_order():
    items = pool(500) + pool(30, "val")
    spec = CrowdSpec(count=(4, 10))
    reference = plan_crowds(items, spec, 0.3, "s")
    for seed in range(4):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        assert plan_crowds(shuffled, spec, 0.3, "s") == reference
    assert plan_crowds(items, spec, 0.3, "other") != reference


def test_crowd_steps_are_bounded_by_a_crowd_not_by_the_pool():
    # One pool of 2,000 images (a single-domain corpus): 600 crowds of 20.
    items = pool(2000)
    spec = CrowdSpec()
    offers = [crowd_offers(item, 2000, spec, 0.3, "s") for item in items]
    # Each image is offered to a few crowds, not to the 600 of its pool.
    per_item = [len(o) for o in offers]
    assert 5 < np.mean(per_item) < 20 and max(per_item) < 40
    assert all(0 <= n < 600 and len({m for m, _ in o}) == len(o) for o in offers for n, _ in o)
    # A crowd keeps its 20 lowest ranks among the few dozen images offered to it.
    offered: dict[int, list] = {}
    for item, item_offers in zip(items, offers, strict=True):
        for n, rank in item_offers:
            offered.setdefault(n, []).append((rank, item.key))
    assert len(offered) == 600 and max(len(o) for o in offered.values()) < 80
    plans = [crowd_plan(("flag", "sft", n), sorted(o)[:20], "s") for n, o in offered.items()]
    assert all(len(pickle.dumps(p)) < 2000 for p in plans)
    assert sum(len(p.members) == 20 for p in plans) >= 590
    assert sorted(plans, key=lambda p: p.scene_id) == sorted(
        plan_crowds(items, spec, 0.3, "s"), key=lambda p: p.scene_id
    )
    # Images take part evenly: few are left out of every crowd.
    used = Counter(k for p in plans for k in p.members)
    assert len(used) > 1950 and max(used.values()) < 20


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_beam_crowd_plans_are_the_in_memory_plans(runner):
    items = pool(400) + pool(25, "val") + pool(3, "sft", "car")
    spec = CrowdSpec(count=(2, 12))
    expected = plan_crowds(items, spec, 0.25, "s")
    with beam.Pipeline(options=PipelineOptions(RUNNERS[runner])) as p:
        plans = p | beam.Create(items) | PlanCrowds(spec, 0.25, "s")
        assert_that(plans, equal_to(expected))


def test_doctests():
    assert doctest.testmod(crowd_module).failed == 0
