"""The bundled trainer end to end on a CPU: CoT-SFT, then GRPO from its output, with a tiny
Qwen2.5-VL and shards of real flag scenes."""

from __future__ import annotations

import doctest
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from customrewards import char_variety
from safetensors.torch import load_file
from test_trainer_data import BUDGET, flag_samples, write_shards

from groundforge.trainer import grpo as grpo_module
from groundforge.trainer import sft as sft_module
from groundforge.trainer.callbacks import read_log
from groundforge.trainer.config import (
    TrainConfigError,
    load_train_config,
    merge_overrides,
    parse_train_config,
)
from groundforge.trainer.data import make_codec
from groundforge.trainer.grpo import reward_spec, run_grpo
from groundforge.trainer.rewards import build_rewards
from groundforge.trainer.sft import (
    LORA_EXCLUDE,
    TrainError,
    is_vision_parameter,
    run_sft,
)

# FIELD-NOTES' settings for a few seconds per stage on a CPU; a high learning rate so that two
# steps visibly move the weights.
STAGE = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "learning_rate": 1e-3,
}
TINY = {
    "dtype": "float32",
    "max_pixels": BUDGET,
    "sft": {**STAGE, "warmup_ratio": 0.0},
    "grpo": {
        **STAGE,
        "num_generations": 2,
        "max_completion_length": 8,
        "gradient_checkpointing": False,
    },
}
# Checkpoints keep the hub's names ("model.layers...", "visual..."), not the in-memory ones.
LM_WEIGHT = "model.layers.0.self_attn.q_proj.weight"
# The tiny processor's minimum pixels (28 x 28 x 4), which the codec takes over.
MIN_PIXELS = 3136


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("train-shards"), flag_samples())


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def vision_unchanged(before: dict, after: dict) -> bool:
    names = [n for n in before if is_vision_parameter(n)]
    return bool(names) and all(torch.equal(before[n], after[n]) for n in names)


def test_doctests():
    assert doctest.testmod(sft_module).failed == 0
    assert doctest.testmod(grpo_module).failed == 0


# -- config ------------------------------------------------------------------------------------


def test_defaults_are_the_reference_recipe():
    cfg = load_train_config()
    sft, grpo = cfg.sft, cfg.grpo
    assert 1e-6 <= sft.learning_rate <= 5e-6
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 16
    assert (sft.num_train_epochs, sft.lr_scheduler_type, sft.warmup_ratio) == (1, "cosine", 0.1)
    assert cfg.max_pixels == 401_408 and cfg.freeze_vision and cfg.lora is None
    assert (grpo.num_generations, grpo.learning_rate, grpo.num_train_epochs) == (4, 1e-6, 2)
    assert (grpo.max_completion_length, grpo.temperature, grpo.beta) == (512, 1.0, 0.04)
    assert grpo.rewards == "deepperception" and not grpo.use_vllm
    assert list(reward_spec("DeepPerception")) == [
        "iou_thresholded",
        "think_answer_format",
        "parsable_box",
    ]


def test_config_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("sft:\n  learning_rate: -1\ngrpo:\n  num_gen: 2\n")
    with pytest.raises(TrainConfigError) as err:
        load_train_config(path)
    message = str(err.value)
    assert str(path) in message and "sft.learning_rate" in message and "grpo.num_gen" in message
    with pytest.raises(TrainConfigError, match="multiple of num_generations"):
        parse_train_config(
            {"grpo": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}}
        )
    with pytest.raises(TrainConfigError, match="unknown preset 'deepseek'"):
        parse_train_config({"grpo": {"rewards": "deepseek"}})
    path.write_text("sft: [1, 2\n")
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_train_config(path)


def test_overrides_and_relative_output_dirs(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("lora: {r: 4}\nsft: {output_dir: out/sft, max_steps: 5}\n")
    cfg = load_train_config(path, {"sft.max_steps": 2, "grpo": {"rewards": {"iou_giou": 1.0}}})
    assert cfg.sft.max_steps == 2 and cfg.sft.output_dir == str(tmp_path / "out" / "sft")
    assert cfg.lora.r == 4 and cfg.lora.alpha == 32
    assert cfg.grpo.rewards == {"iou_giou": 1.0}
    assert merge_overrides({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_vision_modules_are_told_apart_from_the_language_model():
    import re

    vision = ["model.visual.blocks.0.mlp.gate_proj", "model.visual.merger.mlp.0"]
    language = ["model.language_model.layers.0.mlp.gate_proj", "lm_head"]
    assert all(is_vision_parameter(n + ".weight") for n in vision)
    assert not any(is_vision_parameter(n + ".weight") for n in language)
    # peft full-matches exclude_modules against module names.
    assert all(re.fullmatch(LORA_EXCLUDE, n) for n in vision)
    assert not any(re.fullmatch(LORA_EXCLUDE, n) for n in language)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_is_refused_on_a_cpu(run_dir, tmp_path):
    with pytest.raises(TrainError, match="CUDA"):
        run_grpo(run_dir, "unused", output_dir=tmp_path, overrides={"grpo.use_vllm": True})


# -- training ----------------------------------------------------------------------------------


def test_sft_then_grpo(run_dir, tiny_vlm_dir, tmp_path):
    from transformers import AutoProcessor

    from groundforge.annotators.vlm_processor import register_image_only_processor

    base = weights(tiny_vlm_dir)
    # Stage 1 with TRL's default gradient checkpointing and the vision tower frozen.
    sft_dir = run_sft(
        run_dir,
        tiny_vlm_dir,
        output_dir=tmp_path / "sft",
        overrides={**TINY, "sft": {**TINY["sft"], "gradient_checkpointing": True}},
    )
    after_sft = weights(sft_dir)
    assert not torch.equal(base[LM_WEIGHT], after_sft[LM_WEIGHT])
    assert vision_unchanged(base, after_sft)
    assert [r["step"] for r in read_log(sft_dir) if "loss" in r["metrics"]] == [1, 2]
    assert not (Path(sft_dir) / ".data-cache").exists()
    # The output folder is a complete checkpoint: the processor loads back as the image-only one.
    register_image_only_processor()
    processor = AutoProcessor.from_pretrained(sft_dir)
    assert type(processor).__name__ == "Qwen2_5_VLImageOnlyProcessor"
    assert processor.image_processor.size["longest_edge"] == BUDGET

    # Stage 2 from the SFT output, with real rewards (KARL's reads the knowledge levels) and one
    # that varies between completions.
    knowledge = tmp_path / "knowledge.json"
    knowledge.write_text(json.dumps({"entities": {"Chad": {"level": 0}, "Mali": {"level": 4}}}))
    codec = make_codec("qwen25vl", max_pixels=BUDGET, min_pixels=MIN_PIXELS)
    funcs, reward_weights = build_rewards(
        {"karl_iou": 1.0, "think_answer_format": 0.5, "parsable_box": 0.5}, codec
    )
    grpo_dir = run_grpo(
        run_dir,
        sft_dir,
        output_dir=tmp_path / "grpo",
        knowledge_map=knowledge,
        overrides=TINY,
        reward_funcs=[*funcs, char_variety],
        reward_weights=[*reward_weights, 1.0],
    )
    after_grpo = weights(grpo_dir)
    assert not torch.equal(after_sft[LM_WEIGHT], after_grpo[LM_WEIGHT])
    assert vision_unchanged(base, after_grpo)
    steps = [r for r in read_log(grpo_dir) if "rewards" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        names = ["karl_iou", "think_answer_format", "parsable_box", "char_variety"]
        assert sorted(record["rewards"]) == sorted(names)
        assert all(math.isfinite(v) for v in record["rewards"].values())
        assert record["nonfinite"] == []
        # An unformatted completion gets KARL's s- of its entity's level (-0.6 .. 0).
        assert -0.6 <= record["rewards"]["karl_iou"] <= 0
        assert len(record["completions"]) == 2
        assert all(set(c) == {"text", "box"} for c in record["completions"])


def test_lora_adapts_the_language_model_only(run_dir, tiny_vlm_dir, tmp_path):
    lora = {**TINY, "lora": {"r": 4, "alpha": 8}}
    sft_dir = Path(run_sft(run_dir, tiny_vlm_dir, output_dir=tmp_path / "sft", overrides=lora))
    adapter = load_file(str(sft_dir / "adapter" / "adapter_model.safetensors"))
    config = json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())
    assert "gate_proj" in config["target_modules"]  # a name the vision MLPs use as well
    assert adapter and all("language_model" in n and "lora_" in n for n in adapter)
    assert not any(is_vision_parameter(n) for n in adapter)
    # The output folder holds the merged model in full, ready for GRPO and evaluation.
    base, merged = weights(tiny_vlm_dir), weights(sft_dir)
    assert not any("lora" in n for n in merged)
    assert not torch.equal(base[LM_WEIGHT], merged[LM_WEIGHT])
    assert vision_unchanged(base, merged)

    # GRPO with LoRA again and the config's reward preset.
    grpo = {**lora, "grpo": {**TINY["grpo"], "max_steps": 1, "rewards": "deepperception"}}
    grpo_dir = run_grpo(run_dir, sft_dir, output_dir=tmp_path / "grpo", overrides=grpo)
    assert (Path(grpo_dir) / "adapter" / "adapter_model.safetensors").is_file()
    (record,) = [r for r in read_log(grpo_dir) if "rewards" in r]
    assert list(record["rewards"]) == list(reward_spec("deepperception"))
    assert all(math.isfinite(v) for v in record["rewards"].values())


def test_sft_resumes_from_its_last_checkpoint(run_dir, tiny_vlm_dir, tmp_path):
    out = tmp_path / "sft"
    overrides = {**TINY, "sft": {**TINY["sft"], "save_strategy": "steps", "save_steps": 1}}
    # Asked to resume with nothing to resume from: a fresh run.
    run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides, resume=True)
    finished = weights(out)
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()

    # Interrupted after step 1: the resumed run trains step 2 only and ends where it ended.
    shutil.rmtree(out / "checkpoint-2")
    (out / "train_log.jsonl").unlink()
    run_sft(run_dir, tiny_vlm_dir, output_dir=out, overrides=overrides, resume=True)
    assert [r["step"] for r in read_log(out) if "loss" in r["metrics"]] == [2]
    assert (out / "checkpoint-2").is_dir()
    resumed = weights(out)
    assert torch.allclose(finished[LM_WEIGHT], resumed[LM_WEIGHT], atol=1e-6)


@pytest.mark.gpu
def test_grpo_steps_on_cuda(run_dir, tiny_vlm_dir, tmp_path):
    steps = 6
    started = time.perf_counter()
    out = run_grpo(
        run_dir,
        tiny_vlm_dir,
        output_dir=tmp_path / "grpo",
        overrides={
            **TINY,
            "dtype": "bfloat16",
            "grpo": {**TINY["grpo"], "max_steps": steps, "max_completion_length": 32},
        },
        reward_funcs=[char_variety],
    )
    seconds = time.perf_counter() - started
    records = [r for r in read_log(out) if "rewards" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["nonfinite"] == [] for r in records)
    rate = {"steps": steps, "seconds": round(seconds, 2), "steps_per_s": steps / seconds}
    (tmp_path / "gpu_rate.json").write_text(json.dumps(rate))
    print(f"GRPO on {torch.cuda.get_device_name()}: {rate}")


def test_bundled_train_configs_are_the_papers_settings():
    from groundforge.examples import EXAMPLES_DIR

    deep = load_train_config(EXAMPLES_DIR / "train" / "deepperception.yaml")
    assert deep.model_dump(exclude={"sft": {"output_dir"}, "grpo": {"output_dir"}}) == (
        load_train_config().model_dump(exclude={"sft": {"output_dir"}, "grpo": {"output_dir"}})
    )
    karl = load_train_config(EXAMPLES_DIR / "train" / "karl.yaml").grpo
    assert (karl.rewards, karl.learning_rate, karl.beta, karl.max_completion_length) == (
        "karl",
        5e-7,
        0.02,
        1500,
    )
    dip = load_train_config(EXAMPLES_DIR / "train" / "dip-r1.yaml").grpo
    assert (dip.rewards, dip.num_generations, dip.max_completion_length) == ("dip_r1", 8, 2048)
    assert list(reward_spec(dip.rewards)) == [
        "think_look_answer_format",
        "weighted_precision_recall",
        "variance_guided_looking",
    ]
