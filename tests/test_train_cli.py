"""The README's loop through the command line: the demo's shards -> `train sft` -> `train grpo`
-> `eval`, then the exports, with the tiny Qwen2.5-VL on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from test_trainer_data import BUDGET

from groundforge.cli import main
from groundforge.outputs.shards import read_samples
from groundforge.trainer.callbacks import read_log

LM_WEIGHT = "model.layers.0.self_attn.q_proj.weight"
STAGE = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "learning_rate": 1e-3,
}
# The demo has no rationales: `train grpo` trains the bare box and leaves the tag reward out.
REWARDS = ["iou_thresholded", "parsable_box", "char_variety"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train-config") / "train.yaml"
    config = {
        "dtype": "float32",
        "max_pixels": BUDGET,
        "sft": {**STAGE, "warmup_ratio": 0.0},
        "grpo": {
            **STAGE,
            "num_generations": 2,
            "max_completion_length": 8,
            # The preset's terms are all 0 for a random model; a varying reward moves it.
            "rewards": {
                "iou_thresholded": {"weight": 1.0, "tau": 0.85},
                "think_answer_format": 0.5,
                "parsable_box": 0.5,
                "customrewards:char_variety": 1.0,
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_then_sft_grpo_eval(demo_run, tiny_vlm_dir, train_yaml, tmp_path):
    base = weights(tiny_vlm_dir)
    sft = tmp_path / "sft"
    out = invoke(
        "train", "sft", "--data", demo_run, "--model", tiny_vlm_dir,
        "--config", train_yaml, "--output", sft,
    )  # fmt: skip
    assert f"saved to {sft}" in out
    after_sft = weights(sft)
    assert not torch.equal(base[LM_WEIGHT], after_sft[LM_WEIGHT])
    losses = [r["metrics"]["loss"] for r in read_log(sft) if "loss" in r["metrics"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    grpo = tmp_path / "grpo"
    invoke(
        "train", "grpo", "--data", demo_run, "--model", sft, "--config", train_yaml,
        "--output", grpo, "--set", "grpo.max_completion_length=12",
    )  # fmt: skip
    assert not torch.equal(after_sft[LM_WEIGHT], weights(grpo)[LM_WEIGHT])
    steps = [r for r in read_log(grpo) if "rewards" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert sorted(record["rewards"]) == sorted(REWARDS)
        assert all(math.isfinite(v) for v in record["rewards"].values())
        # --set wins over the config file.
        assert record["metrics"]["completions/max_length"] <= 12

    report = tmp_path / "eval"
    table = invoke(
        "eval", "--shards", demo_run, "--split", "val", "--model", grpo, "--codec", "qwen25vl",
        "--max-pixels", BUDGET, "--max-tokens", 8, "--limit", 3, "--out", report,
    )  # fmt: skip
    assert "Acc@0.5" in table
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["config"]["model"] == str(grpo) and metrics["config"]["split"] == "val"
    predictions = [json.loads(line) for line in (report / "predictions.jsonl").open()]
    first_val = [s.sample_id for s in read_samples(str(demo_run / "shards"), "val")][:3]
    assert [p["question_id"] for p in predictions] == first_val


def test_exports_from_the_command_line(demo_run, tmp_path):
    val = sum(1 for _ in read_samples(str(demo_run / "shards"), "val"))
    invoke("export", "llamafactory", demo_run, "--to", tmp_path / "lf", "--split", "val",
           "--max-pixels", BUDGET)  # fmt: skip
    records = json.loads((tmp_path / "lf" / "groundforge_val.json").read_text())
    assert len(records) == val
    for record in records:
        assert record["messages"][0]["content"].count("<image>") == len(record["images"]) == 1
        assert (tmp_path / "lf" / record["images"][0]).is_file()
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert list(info) == ["groundforge_val"]

    invoke("export", "verl", demo_run / "shards", "--to", tmp_path / "verl")
    splits = sorted(p.stem for p in (tmp_path / "verl").glob("*.parquet"))
    assert splits == ["sft", "val"]
    assert pq.read_metadata(tmp_path / "verl" / "val.parquet").num_rows == val


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--shards", "{demo}"], "exactly one of --model and --endpoint"),
        (["eval", "--model", "m"], "exactly one of --bench and RUN_DIR"),
        (["train", "sft", "--data", "{demo}", "--model", "m", "--set", "sft.max_steps"],
         "expected FIELD=VALUE"),
        (["train", "sft", "--data", "{demo}", "--model", "m", "--set", "sft.learning_rate=-1"],
         "sft.learning_rate"),
        (["export", "verl", "{demo}", "--to", "x", "--codec", "norm1000", "--max-pixels", "9"],
         "--max-pixels applies to --codec qwen25vl only"),
    ],
)  # fmt: skip
def test_command_line_errors_name_the_fix(demo_run, tmp_path, args, message):
    result = CliRunner().invoke(main, [a.format(demo=demo_run) for a in args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
