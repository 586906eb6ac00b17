"""Training on real batches: GRPO generation batches mixing prompts of different lengths and
image sizes, fp32 master weights under a bf16 config, checkpoints at the default cadence and on
Ctrl-C, and resuming from them."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from customrewards import char_variety
from test_train import LM_WEIGHT, TINY, weights
from test_trainer_data import flag_samples, write_shards
from tinymodels import QWEN_SPECIAL_TOKENS

from groundforge.trainer import sft as sft_module
from groundforge.trainer.callbacks import TrainLogCallback, read_log
from groundforge.trainer.config import load_train_config
from groundforge.trainer.grpo import run_grpo
from groundforge.trainer.interrupt import TrainingInterrupted
from groundforge.trainer.sft import is_vision_parameter, load_policy, lora_config, run_sft


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("batch-shards"), flag_samples())


def mixed_prompts() -> list:
    """Four train prompts from two scenes of different sizes, every other one with a longer
    question, so left padding in a batch exceeds the tokens before the image."""
    samples = flag_samples(grpo=0)
    longer = " Both flags hang side by side on a plain white wall; compare their colours closely."
    train = [s for s in samples if s.split == "sft"]
    for sample in train[1::2]:
        samples[samples.index(sample)] = replace(sample, question=sample.question + longer)
    return samples


# -- GRPO generation batches -------------------------------------------------------------------


def test_grpo_batches_of_several_prompts_of_different_lengths(tiny_vlm_dir, tmp_path):
    data = write_shards(tmp_path / "shards", mixed_prompts())
    overrides = {
        **TINY,
        "grpo": {
            **TINY["grpo"],
            "split": "sft",
            "num_generations": 3,
            # Two micro-batches of 6 completions per generation batch: 4 prompts x 3.
            "per_device_train_batch_size": 6,
            "gradient_accumulation_steps": 2,
            "max_steps": 2,
        },
    }
    out = run_grpo(
        data,
        tiny_vlm_dir,
        output_dir=tmp_path / "grpo",
        overrides=overrides,
        reward_funcs=[char_variety],
    )
    records = [r for r in read_log(out) if "rewards" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["rewards"]["char_variety"]) for r in records)
    assert all(r["nonfinite"] == [] for r in records)


class _Built(Exception):
    pass


def test_grpo_hands_trl_a_left_padding_processor_without_vision_tokens(
    run_dir, tiny_vlm_dir, tmp_path, monkeypatch
):
    import trl

    def capture(**kwargs):
        raise _Built(kwargs)

    monkeypatch.setattr(trl, "GRPOTrainer", capture)
    with pytest.raises(_Built) as built:
        run_grpo(run_dir, tiny_vlm_dir, output_dir=tmp_path, overrides=TINY)
    kwargs = built.value.args[0]
    processor = kwargs["processing_class"]
    assert processor.tokenizer.padding_side == "left"
    vision = [t for t in QWEN_SPECIAL_TOKENS if re.search("vision|image|video", t)]
    assert len(vision) == 5
    expected = set(processor.tokenizer.convert_tokens_to_ids(vision))
    suppressed = set(kwargs["args"].generation_kwargs["suppress_tokens"])
    assert suppressed == expected
    # The box and reference tokens stay available to the policy.
    assert processor.tokenizer.convert_tokens_to_ids("<|box_start|>") not in suppressed


# -- fp32 master weights -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_vlm_dir(tiny_vlm_dir, tmp_path_factory) -> Path:
    """The tiny model stored in bfloat16, as hub checkpoints are."""
    from transformers import AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("bf16-vlm") / "model"
    shutil.copytree(tiny_vlm_dir, folder)
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vlm_dir), dtype="bfloat16")
    model.save_pretrained(str(folder))
    return folder


def test_trained_weights_load_in_fp32_under_a_bf16_config(bf16_vlm_dir):
    from peft import get_peft_model

    cfg = load_train_config(None, {"dtype": "bfloat16", "max_pixels": TINY["max_pixels"]})
    policy = load_policy(bf16_vlm_dir, cfg)
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    # LoRA: the frozen base stays in the config's dtype, the adapters train in fp32.
    lora = load_train_config(None, {"dtype": "bfloat16", "lora": {"r": 4}})
    model = get_peft_model(load_policy(bf16_vlm_dir, lora).model, lora_config(lora))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_small_updates_reach_most_weights_under_a_bf16_config(run_dir, bf16_vlm_dir, tmp_path):
    overrides = {
        **TINY,
        "dtype": "bfloat16",
        "sft": {**TINY["sft"], "learning_rate": 2e-6, "lr_scheduler_type": "constant"},
    }
    out = run_sft(run_dir, bf16_vlm_dir, output_dir=tmp_path / "sft", overrides=overrides)
    base, after = weights(bf16_vlm_dir), weights(out)
    changed = total = 0
    for name, before in base.items():
        if is_vision_parameter(name):
            continue
        changed += int((after[name].float() != before.float()).sum())
        total += before.numel()
    assert changed / total > 0.5, f"{changed} of {total} language-model weights changed"
    assert after[LM_WEIGHT].dtype == torch.float32


# -- checkpoints and resuming ------------------------------------------------------------------


def _sft(steps: int, **stage) -> dict:
    sft = {**TINY["sft"], "max_steps": steps, "learning_rate": 1e-4, **stage}
    sft.pop("save_strategy")  # the default cadence
    return {**TINY, "sft": sft}


def _global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_default_cadence_leaves_checkpoints_and_resume_continues(run_dir, tiny_vlm_dir, tmp_path):
    out = tmp_path / "sft"
    overrides = _sft(4, save_total_limit=None)
    run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides)
    finished = weights(out)
    # A tenth of 4 steps rounds up to a checkpoint every step.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        f"checkpoint-{i}" for i in range(1, 5)
    ]

    # Lost after step 2: --resume trains steps 3 and 4 only and ends where the full run ended.
    for step in (3, 4):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "train_log.jsonl").unlink()
    run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides, resume=True)
    assert [r["step"] for r in read_log(out) if "loss" in r["metrics"]] == [3, 4]
    assert _global_step(out / "checkpoint-4") == 4
    assert torch.allclose(finished[LM_WEIGHT], weights(out)[LM_WEIGHT], atol=1e-6)


class _CtrlCAt(TrainLogCallback):
    """The training log, plus a Ctrl-C once step ``at`` ends."""

    at = 2

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().on_step_end(args, state, control, **kwargs)


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(
    run_dir, tiny_vlm_dir, tmp_path, monkeypatch
):
    out = tmp_path / "sft"
    overrides = _sft(4, save_steps=100)  # no scheduled checkpoint before the end
    monkeypatch.setattr(
        sft_module, "log_callback", lambda folder: _CtrlCAt(folder / "train_log.jsonl")
    )
    with pytest.raises(TrainingInterrupted, match="step 2 of 4"):
        run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert _global_step(out / "checkpoint-2") == 2
    assert not (out / "model.safetensors").exists()  # no final model from a stopped run
    # The handler is gone after the run: Ctrl-C means KeyboardInterrupt again.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(
        sft_module, "log_callback", lambda folder: TrainLogCallback(folder / "train_log.jsonl")
    )
    run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides, resume=True)
    assert [r["step"] for r in read_log(out) if "loss" in r["metrics"]] == [1, 2, 3, 4]
    assert (out / "model.safetensors").is_file()
