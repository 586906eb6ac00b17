"""SFT and GRPO steps/s and peak GPU memory on a small model of a real shape (about 0.4B
parameters, bf16 autocast over fp32 weights). Skipped without CUDA; on a GPU machine run
``pytest -m gpu tests/test_train_gpu.py -s`` and record the printed figures in
benchmarks/README.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from customrewards import char_variety
from test_train import STAGE
from test_trainer_data import BUDGET, flag_samples, write_shards
from tinymodels import SMALL_REAL_VLM, build_tiny_vlm

from groundforge.trainer.callbacks import read_log
from groundforge.trainer.grpo import run_grpo
from groundforge.trainer.sft import run_sft

pytestmark = pytest.mark.gpu

STEPS = 8
SETTINGS = {
    "dtype": "bfloat16",
    "max_pixels": BUDGET,
    "sft": {**STAGE, "max_steps": STEPS, "learning_rate": 2e-6, "warmup_ratio": 0.0},
    "grpo": {
        **STAGE,
        "max_steps": STEPS,
        "learning_rate": 1e-6,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "max_completion_length": 64,
    },
}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("small-vlm"), size=SMALL_REAL_VLM)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("gpu-shards"), flag_samples())


def _rate(stage: str, seconds: float, out: Path) -> dict:
    rate = {
        "stage": stage,
        "device": torch.cuda.get_device_name(),
        "steps": STEPS,
        "seconds": round(seconds, 2),
        "steps_per_s": round(STEPS / seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    (out / "gpu_rate.json").write_text(json.dumps(rate))
    print(json.dumps(rate))
    return rate


def test_sft_steps_per_second(small_model, shards, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = Path(run_sft(shards, small_model, output_dir=tmp_path / "sft", overrides=SETTINGS))
    rate = _rate("sft", time.perf_counter() - started, out)
    losses = [r["metrics"]["loss"] for r in read_log(out) if "loss" in r.get("metrics", {})]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)  # no NaN
    assert rate["steps_per_s"] > 0


def test_grpo_steps_per_second(small_model, shards, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = Path(
        run_grpo(
            shards,
            small_model,
            output_dir=tmp_path / "grpo",
            overrides=SETTINGS,
            reward_funcs=[char_variety],
        )
    )
    _rate("grpo", time.perf_counter() - started, out)
    records = [r for r in read_log(out) if "rewards" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["nonfinite"] == [] for r in records)
