"""The bundled crowd recipe offline, the DIP-R1 trainer on what it writes, and the join of
plans with their member records."""

from __future__ import annotations

import math

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from test_trainer_data import BUDGET

from groundforge.examples import EXAMPLES_DIR
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.kvg import KVGGraph
from groundforge.pipelines.metrics import read_funnel
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import load_recipe
from groundforge.scenes.crowd import CrowdPlan
from groundforge.schemas.records import ImageRecord, item_id_of
from groundforge.trainer.callbacks import read_log
from groundforge.trainer.grpo import reward_spec, run_grpo
from groundforge.trainer.rewards import bare_answer_spec


@pytest.fixture(scope="module")
def crowd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("crowds")
    result = run_recipe(load_recipe(EXAMPLES_DIR / "crowd.yaml"), str(out))
    return out, result


def test_crowd_recipe_makes_detect_samples_offline(crowd_run):
    out, result = crowd_run
    recipe = load_recipe(EXAMPLES_DIR / "crowd.yaml")
    assert all(s.balanced for s in result.funnel)
    stages = {s.stage: s for s in result.funnel}
    assert stages["compose_crowd"].kept == stages["detect_sample"].total > 50
    samples = list(read_samples(str(out / "shards")))
    assert len(samples) == result.manifest["samples"]
    assert {s.split for s in samples} == {"sft", "val"}
    low, high = recipe.crowd.count
    hidden = 0
    for s in samples:
        assert s.task == "detect" and s.target == "flag"
        assert (s.width, s.height) == (recipe.crowd.width, recipe.crowd.height)
        assert low <= len(s.gt_boxes) + len(s.ignore_regions) <= high
        assert len(s.gt_boxes) <= recipe.detect.max_instances
        for box in (*s.gt_boxes, *s.ignore_regions):
            assert 0 <= box.x1 < box.x2 <= s.width and 0 <= box.y1 < box.y2 <= s.height
        assert s.provenance.layout == "crowd" and len(s.provenance.source_image_ids) >= low
        hidden += len(s.ignore_regions)
    # The overlap hides some flags past min_visible: they are asked for nowhere.
    assert hidden > 0


def test_dip_r1_grpo_steps_on_crowd_shards(crowd_run, tiny_vlm_dir, tmp_path):
    out, _ = crowd_run
    overrides = {
        "dtype": "float32",
        "max_pixels": BUDGET,
        "grpo": {
            "rewards": "dip_r1",
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "num_generations": 2,
            "max_completion_length": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "gradient_checkpointing": False,
        },
    }
    grpo_dir = run_grpo(out, tiny_vlm_dir, output_dir=tmp_path / "grpo", overrides=overrides)
    records = [r for r in read_log(grpo_dir) if "rewards" in r]
    assert [r["step"] for r in records] == [1, 2]
    # Crowd shards without teacher rationales: SFT taught the bare box list, so GRPO asks for it
    # and keeps the DIP-R1 rewards that read boxes, without the tag rewards.
    expected = list(bare_answer_spec(reward_spec("dip_r1")))
    assert expected == ["weighted_precision_recall"]
    for record in records:
        assert list(record["rewards"]) == expected
        assert all(math.isfinite(v) for v in record["rewards"].values())


def test_records_join_their_plan_slots_and_the_unwanted_are_dropped(tmp_path):
    records = [
        ImageRecord(f"id{i}", b"", 8, 8, "flag", f"e{i}", location=f"/img/{i}.png")
        for i in range(5)
    ]
    plans = [
        CrowdPlan("c1", "flag", "sft", ("/img/0.png", "/img/2.png")),
        CrowdPlan("c2", "flag", "sft", ("/img/2.png", "/img/4.png", "/img/0.png")),
    ]
    graph = KVGGraph(load_recipe(EXAMPLES_DIR / "crowd.yaml"), str(tmp_path))
    p = beam.Pipeline()
    members = graph._join_plans(
        p | "records" >> beam.Create(records), p | "plans" >> beam.Create(plans), "pool", "unused"
    )
    assert_that(
        members | beam.MapTuple(lambda plan, slot: (plan, slot[0], slot[1].location)),
        equal_to(
            [
                ("c1", 0, "/img/0.png"),
                ("c1", 1, "/img/2.png"),
                ("c2", 0, "/img/2.png"),
                ("c2", 1, "/img/4.png"),
                ("c2", 2, "/img/0.png"),
            ]
        ),
        label="members",
    )
    assert_that(
        graph._rejected[0]
        | beam.Map(lambda r: (r.sha256, r.stage, r.reason, r.source_id, r.item_id)),
        equal_to(
            [
                ("id1", "pool", "unused", "/img/1.png", item_id_of("/img/1.png", "id1")),
                ("id3", "pool", "unused", "/img/3.png", item_id_of("/img/3.png", "id3")),
            ]
        ),
        label="rejected",
    )
    result = p.run()
    result.wait_until_finish()
    (pool,) = read_funnel(result, graph.stages)
    assert (pool.total, pool.kept, pool.dropped) == (5, 3, {"unused": 2})
