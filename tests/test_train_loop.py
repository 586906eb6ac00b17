"""The documented loop on a corpus without rationales (the demo's): SFT teaches the bare box,
GRPO asks for the bare box and rewards it; and the warning for a reward that gives no signal."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from test_trainer_data import BUDGET, flag_samples, write_shards
from transformers import TrainerControl, TrainerState, TrainingArguments

from groundforge.cli import _grpo_answer_format, main
from groundforge.trainer.callbacks import RewardStall, TrainLogCallback, read_log
from groundforge.trainer.data import make_codec
from groundforge.trainer.rewards import DEEPPERCEPTION, build_rewards

# Short targets (no label) and a learning rate high enough for the tiny model to learn the box
# format from 4 samples in 40 steps (loss about 4.5 -> 0.2).
STAGE = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "warmup_ratio": 0.0,
}
CONFIG = {
    "dtype": "float32",
    "max_pixels": BUDGET,
    "box_label": False,
    "sft": {
        **STAGE,
        "max_steps": 40,
        "logging_steps": 10,
        "learning_rate": 4e-3,
        "lr_scheduler_type": "constant",
    },
    "grpo": {
        **STAGE,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-5,
        "num_generations": 4,
        "max_completion_length": 24,
    },
}


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory) -> Path:
    """Flag scenes without rationales, all in ``sft`` (4 samples) and ``val``, as in the demo."""
    samples = [replace(s, rationale=None) for s in flag_samples(grpo=0)]
    return write_shards(tmp_path_factory.mktemp("bare-run"), samples)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("mixed-run"), flag_samples())


@pytest.mark.slow
def test_a_corpus_without_rationales_learns_from_sft_to_grpo(bare_run, tiny_vlm_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    runner = CliRunner()
    common = ["--data", str(bare_run), "--config", str(config)]

    sft = runner.invoke(
        main, ["train", "sft", *common, "--model", str(tiny_vlm_dir), "--output", f"{tmp_path}/s"]
    )
    assert sft.exit_code == 0, sft.output
    assert "SFT targets: 0 of 4 samples of split 'sft' have a teacher rationale" in sft.output
    losses = [r["metrics"]["loss"] for r in read_log(tmp_path / "s") if "loss" in r["metrics"]]
    assert losses[-1] < 0.25 * losses[0]

    grpo = runner.invoke(
        main, ["train", "grpo", *common, "--model", f"{tmp_path}/s", "--output", f"{tmp_path}/g"]
    )
    assert grpo.exit_code == 0, grpo.output
    assert "GRPO answer format: bare box" in grpo.output
    assert "(left out: think_answer_format)" in grpo.output
    steps = [r for r in read_log(tmp_path / "g") if "rewards" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(sorted(r["rewards"]) == ["iou_thresholded", "parsable_box"] for r in steps)
    # The SFT model writes parsable boxes from GRPO's first step on: there is a signal.
    assert steps[0]["rewards"]["parsable_box"] > 0
    texts = [c["text"] for r in steps for c in r["completions"]]
    assert any(c["box"] for r in steps for c in r["completions"])
    # The think/answer rewards would have scored every one of these replies 0.
    codec = make_codec("qwen25vl", max_pixels=BUDGET, min_pixels=3136)
    n = len(texts)
    columns = {"gt_boxes": [[[0, 0, 50, 50]]] * n, "width": [112] * n, "height": [112] * n}
    for reward in build_rewards(DEEPPERCEPTION, codec)[0]:
        if reward.__name__ != "iou_thresholded":
            assert reward(None, texts, **columns) == [0.0] * n


# -- the answer format the train grpo command picks ---------------------------------------------


def test_grpo_keeps_the_reasoning_format_when_sft_taught_it(mixed_run):
    overrides = {"grpo.max_steps": 2}
    runner = CliRunner()
    with runner.isolation() as (out, _, _):
        assert _grpo_answer_format(str(mixed_run), None, overrides) is overrides
        said = out.getvalue().decode()
    assert "GRPO answer format: reasoning (1 of 2 samples have a teacher rationale" in said
    assert "rewards: iou_thresholded, think_answer_format, parsable_box" in said


def test_grpo_on_bare_boxes_reads_the_whole_reply_or_says_why_not(bare_run):
    runner = CliRunner()
    with runner.isolation():
        overrides = _grpo_answer_format(str(bare_run), None, {"grpo.rewards": "karl"})
    assert overrides["grpo.rewards"] == {
        "karl_iou": {"weight": 1.0, "require_answer": False},
        "parsable_box": {"weight": 0.5, "require_answer": False},
    }
    tags_only = {"grpo.rewards": {"think_answer_format": 1.0}}
    with runner.isolation(), pytest.raises(click.ClickException, match="teacher"):
        _grpo_answer_format(str(bare_run), None, tags_only)


# -- the stalled-reward warning ----------------------------------------------------------------


def test_reward_stall_counts_steps_and_tells_once_per_streak():
    stall = RewardStall(steps=3)
    told = [stall.update(step, {"a": 0.0, "b": 0.4}) for step in range(1, 6)]
    assert told == [{}, {}, {"a": "mean exactly 0 for 3 steps"}, {}, {}]
    assert stall.update(6, {"a": 0.5}) == {}  # the streak ends ...
    again = [stall.update(step, {"a": 0.0}) for step in (7, 8, 9)]
    assert again == [{}, {}, {"a": "mean exactly 0 for 3 steps"}]
    # Log events every 2 steps cover 2 steps each; a flat reward stalls whatever its mean.
    stall = RewardStall(steps=3)
    assert stall.update(2, {"c": 1.0}, {"c": True}) == {}
    assert stall.update(4, {"c": 1.0}, {"c": True}) == {
        "c": "mean 1, no variance within any group for 4 steps"
    }
    with pytest.raises(ValueError, match="stall_steps"):
        RewardStall(0)


class _Trainer:
    """What the callback reads of a GRPOTrainer: the last generation batch's rewards."""

    num_generations = 2

    def __init__(self):
        self._logs = {"completion": [], "rewards": {}}


def test_the_log_and_the_console_say_when_a_reward_gives_no_signal(tmp_path, caplog):
    callback = TrainLogCallback(tmp_path / "train_log.jsonl", stall_steps=2)
    trainer = _Trainer()
    callback.attach(trainer)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    with caplog.at_level(logging.WARNING, logger="groundforge.trainer.callbacks"):
        for step in (1, 2, 3):
            state.global_step = step
            # A format reward at 0, a group-flat reward (every group agrees) and a live one.
            trainer._logs["rewards"] = {
                "fmt": [0.0] * 4,
                "flat": [1.0, 1.0, 0.0, 0.0],
                "iou": [0.1, 0.7, 0.0, 0.2],
            }
            means = {"fmt": 0.0, "flat": 0.5, "iou": 0.25}
            logs = {"loss": 0.0, **{f"rewards/{k}/mean": v for k, v in means.items()}}
            callback.on_log(args, state, control, logs=logs)
    records = read_log(tmp_path)
    assert [r.get("stalled") for r in records] == [
        None,
        {
            "fmt": "mean exactly 0 for 2 steps",
            "flat": "mean 0.5, no variance within any group for 2 steps",
        },
        None,
    ]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert warned[0].startswith("step 2: reward fmt gives GRPO nothing to learn from")
    assert "answer format" in warned[0]
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[1])["step"] == 2
