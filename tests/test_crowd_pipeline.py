"""The bundled crowd recipe offline, and the DIP-R1 trainer on what it writes."""

from __future__ import annotations

import math

import pytest
from test_trainer_data import BUDGET

from groundforge.examples import EXAMPLES_DIR
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import load_recipe
from groundforge.trainer.callbacks import read_log
from groundforge.trainer.grpo import reward_spec, run_grpo


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
    for record in records:
        assert list(record["rewards"]) == list(reward_spec("dip_r1"))
        assert all(math.isfinite(v) for v in record["rewards"].values())
