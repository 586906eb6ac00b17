"""Stage 1, CoT-SFT with TRL's ``SFTTrainer``, and the model handling both stages share.

The model and processor are loaded here and handed to TRL as objects: given a path, TRL loads
the processor with ``AutoProcessor``, which for a Qwen-VL folder saved with the image-only
processor (the stock one needs torchvision) returns a bare tokenizer, and training then fails
with ``KeyError: 'pixel_values'``.

The processor's pixel budget is set to the config's ``max_pixels``, the budget the data was
resized to (:mod:`groundforge.trainer.data`), so the processor does not resize again and a
Qwen2.5-VL's absolute-pixel boxes mean the same thing in the data and in the model's eyes.

Weights that train are fp32 (:func:`weights_dtype`): updates of the size of a 2e-6 learning rate
are far below a bf16 weight's resolution and would round away, so full fine-tuning keeps fp32
master weights and gets bf16 (or fp16) from autocast on a GPU, and LoRA adapters stay fp32 (peft's
default) on base weights frozen in the config's dtype.

The output folder holds the final model (LoRA adapters merged into it) and its processor, so
the GRPO stage and the evaluation load it like any checkpoint; with LoRA the adapters alone are
also kept in ``adapter/``. A checkpoint is saved at ``save_steps`` (by default every tenth of
the run) and on Ctrl-C (:mod:`groundforge.trainer.interrupt`); ``resume`` continues the latest.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundforge.annotators.teacher.embedded import (
    IMAGE_ONLY_MODEL_TYPES,
    PIXEL_BUDGET_MODEL_TYPES,
)
from groundforge.trainer.callbacks import LOG_FILE, TrainLogCallback
from groundforge.trainer.config import StageSettings, TrainConfig, load_train_config
from groundforge.trainer.data import build_sft_dataset, codec_name_for, make_codec
from groundforge.trainer.interrupt import InterruptCallback, TrainingInterrupted

_LOG = logging.getLogger(__name__)

# Vision towers and projectors: ``model.visual`` (with its ``merger``, the projector) in the
# Qwen-VL families, ``vision_tower``/``multi_modal_projector`` in LLaVA-style models.
VISION_MODULE_NAMES = (
    "visual",
    "vision_tower",
    "vision_model",
    "multi_modal_projector",
    "mm_projector",
)
_VISION = "|".join(VISION_MODULE_NAMES)
VISION_MODULES = re.compile(rf"(?:^|\.)(?:{_VISION})(?:\.|$)")
# peft full-matches a string ``exclude_modules`` against each module name.
LORA_EXCLUDE = rf"(?:.*\.)?(?:{_VISION})(?:\..*)?"
DATA_CACHE = ".data-cache"
ADAPTER_DIR = "adapter"


class TrainError(ValueError):
    """A training run that cannot start: the message says which setting to change."""


@dataclass
class Policy:
    """The model being trained, its processor and the box codec of its family."""

    model: Any
    processor: Any
    codec: Any
    model_type: str | None


def is_vision_parameter(name: str) -> bool:
    """Whether a parameter belongs to the vision tower or the projector.

    >>> is_vision_parameter("model.visual.merger.mlp.0.weight")
    True
    >>> is_vision_parameter("model.language_model.layers.0.mlp.gate_proj.weight")
    False
    """
    return VISION_MODULES.search(name) is not None


def freeze_vision(model: Any) -> list[str]:
    """Stop gradients into the vision tower and projector; returns the frozen parameters."""
    frozen = []
    for name, param in model.named_parameters():
        if is_vision_parameter(name):
            param.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise TrainError(
            f"freeze_vision: no vision tower found in {type(model).__name__} (looked for "
            f"{VISION_MODULES.pattern}); set freeze_vision: false"
        )
    return frozen


def lora_config(cfg: TrainConfig):
    """peft's ``LoraConfig`` for the language model (vision modules excluded by name)."""
    from peft import LoraConfig

    settings = cfg.lora
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        exclude_modules=LORA_EXCLUDE,
        task_type="CAUSAL_LM",
    )


def _set_pixel_budget(processor: Any, max_pixels: int, min_pixels: int | None) -> int:
    """Give a Qwen-VL image processor the run's pixel budget; returns its minimum."""
    image_processor = processor.image_processor
    size = image_processor.size
    low = (
        min_pixels
        if min_pixels is not None
        else min(size["shortest_edge"] or max_pixels, max_pixels)
    )
    new_size = {"shortest_edge": low, "longest_edge": max_pixels}
    # transformers 5 keeps ``size`` as a SizeDict.
    image_processor.size = new_size if isinstance(size, dict) else type(size)(**new_size)
    return low


def weights_dtype(cfg: TrainConfig) -> str:
    """The dtype the model loads in for training: float32 for full fine-tuning (the optimizer's
    master weights; the config's dtype is the autocast precision on a GPU), the config's dtype
    with LoRA (the base weights stay frozen; peft keeps the adapters in float32).

    >>> from groundforge.trainer.config import parse_train_config
    >>> weights_dtype(parse_train_config({"dtype": "bfloat16"}))
    'float32'
    >>> weights_dtype(parse_train_config({"dtype": "bfloat16", "lora": {"r": 4}}))
    'bfloat16'
    """
    return "float32" if cfg.lora is None else cfg.dtype


def load_policy(
    model: str | Path,
    cfg: TrainConfig,
    weights: str | None = None,
    padding_side: str | None = None,
) -> Policy:
    """Load the model (in :func:`weights_dtype`) and its processor, with the run's pixel budget.

    ``weights`` is a checkpoint to take the weights from instead of ``model``'s (a resumed run).
    ``padding_side`` sets the tokenizer's padding (GRPO needs ``"left"``).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = str(model)
    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", None)
    if model_type in IMAGE_ONLY_MODEL_TYPES:
        from groundforge.annotators.vlm_processor import image_only_processor_class

        processor = image_only_processor_class().from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise TrainError(f"{path}: its processor ({type(processor).__name__}) reads no images")
    if padding_side is not None:
        processor.tokenizer.padding_side = padding_side
    codec_name = cfg.codec or codec_name_for(model_type)
    min_pixels = None
    if model_type in PIXEL_BUDGET_MODEL_TYPES:
        min_pixels = _set_pixel_budget(processor, cfg.max_pixels, cfg.min_pixels)
    elif codec_name == "qwen25vl":
        raise TrainError(
            f"codec qwen25vl needs a Qwen-VL processor with a pixel budget, not model type "
            f"{model_type!r}"
        )
    codec = make_codec(codec_name, max_pixels=cfg.max_pixels, min_pixels=min_pixels)
    kwargs: dict[str, Any] = {"dtype": weights_dtype(cfg)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    loaded = AutoModelForImageTextToText.from_pretrained(weights or path, **kwargs)
    # GRPO builds its KL reference from this name: the starting model, not a checkpoint.
    loaded.config._name_or_path = path
    return Policy(loaded, processor, codec, model_type)


def prepare_trainable(policy: Policy, cfg: TrainConfig):
    """Freeze the vision tower when asked; returns the peft config for a LoRA run, else None."""
    if cfg.lora is not None:
        return lora_config(cfg)
    if cfg.freeze_vision:
        freeze_vision(policy.model)
    return None


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_arguments(stage: StageSettings, cfg: TrainConfig, output_dir: Path) -> dict[str, Any]:
    """The ``TrainingArguments`` fields both stages set from the config."""
    gpu = on_gpu()
    return {
        "output_dir": str(output_dir),
        "learning_rate": stage.learning_rate,
        "num_train_epochs": stage.num_train_epochs,
        "per_device_train_batch_size": stage.per_device_train_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        # transformers 5 dropped warmup_ratio: a float below 1 in warmup_steps is the ratio.
        "warmup_steps": stage.warmup_ratio,
        "lr_scheduler_type": stage.lr_scheduler_type,
        "max_steps": stage.max_steps,
        "logging_steps": stage.logging_steps,
        "save_strategy": stage.save_strategy,
        "save_steps": stage.save_steps,
        "save_total_limit": stage.save_total_limit,
        # The new name; TRL's default for the old alias (gradient_checkpointing) warns.
        "activation_checkpointing": stage.gradient_checkpointing,
        "seed": cfg.seed,
        "use_cpu": not gpu,
        "bf16": gpu and cfg.dtype != "float16",
        "fp16": gpu and cfg.dtype == "float16",
        "report_to": "none",
    }


def resolve_output_dir(output_dir: str | Path | None, stage: StageSettings, name: str) -> Path:
    chosen = output_dir or stage.output_dir
    if not chosen:
        raise TrainError(
            f"no output folder for the {name} stage: pass one or set {name}.output_dir"
        )
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_to_resume(output_dir: Path, resume: bool) -> str | None:
    """The latest checkpoint in ``output_dir`` when asked to resume and there is one."""
    if not resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(output_dir))
    if found is None:
        _LOG.warning("no checkpoint in %s to resume from; starting from the beginning", output_dir)
        return None
    _LOG.info("resuming from %s", found)
    return found


def full_model_weights(checkpoint: str | None) -> str | None:
    """The checkpoint itself when it holds a whole model (not LoRA adapters only).

    The trainer cannot restore such weights itself (transformers#43701): checkpoints are saved
    under the hub's parameter names ("model.layers...", "visual..."), which ``Trainer`` loads
    with a plain ``load_state_dict`` into a model whose names differ ("model.language_model...",
    "model.visual..."), so nothing loads and training silently restarts from the initial
    weights, with only a missing-keys warning. ``from_pretrained`` renames them correctly.
    """
    if checkpoint is None or not (Path(checkpoint) / "config.json").is_file():
        return None
    return checkpoint


def train_and_save(trainer: Any, policy: Policy, output_dir: Path, checkpoint: str | None) -> str:
    """Train (from ``checkpoint`` when given), then save the final model (LoRA merged) and
    processor to ``output_dir``. On Ctrl-C, saves a checkpoint and raises
    :class:`~groundforge.trainer.interrupt.TrainingInterrupted`."""
    if full_model_weights(checkpoint):
        _LOG.info(
            "weights restored from %s; the trainer's missing/unexpected keys warning that "
            "follows is expected (transformers#43701)",
            checkpoint,
        )
    guard = InterruptCallback()
    trainer.add_callback(guard)
    with guard.catching():
        trainer.train(resume_from_checkpoint=checkpoint)
    if guard.interrupted:
        step = trainer.state.global_step
        saved = output_dir / f"checkpoint-{step}"
        raise TrainingInterrupted(
            f"training stopped at step {step} of {trainer.state.max_steps}; checkpoint in "
            f"{saved}: run again with --resume to continue"
        )
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model
        model.save_pretrained(str(output_dir / ADAPTER_DIR))
        model = model.merge_and_unload()
    model.save_pretrained(str(output_dir))
    policy.processor.save_pretrained(str(output_dir))
    shutil.rmtree(output_dir / DATA_CACHE, ignore_errors=True)
    return str(output_dir)


def log_callback(output_dir: Path) -> TrainLogCallback:
    return TrainLogCallback(output_dir / LOG_FILE)


def run_sft(
    data: Any,
    model: str | Path,
    config_path: str | Path | None = None,
    output_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> str:
    """CoT-SFT of ``model`` on the ``sft`` split of ``data`` (a run folder, its ``shards/`` or
    a ``DatasetDict``); returns the output folder holding the model and processor.

    ``overrides`` apply to the config (``{"sft": {"max_steps": 2}}`` or ``{"sft.max_steps": 2}``);
    ``output_dir`` wins over ``sft.output_dir``. With ``resume`` the latest checkpoint in the
    output folder is continued, when there is one.
    """
    from trl import SFTConfig, SFTTrainer

    cfg = load_train_config(config_path, overrides)
    stage = cfg.sft
    out = resolve_output_dir(output_dir, stage, "sft")
    checkpoint = checkpoint_to_resume(out, resume)
    policy = load_policy(model, cfg, weights=full_model_weights(checkpoint))
    peft_config = prepare_trainable(policy, cfg)
    dataset = build_sft_dataset(
        data,
        policy.codec,
        cfg.max_pixels,
        split=stage.split,
        limit=stage.limit,
        system=cfg.system_prompt,
        instruction=cfg.instruction,
        label=cfg.box_label,
        completion_only=stage.completion_only_loss,
        cache_dir=out / DATA_CACHE,
    )
    args = SFTConfig(
        **trainer_arguments(stage, cfg, out),
        # Truncation could cut image placeholder tokens and break the image features.
        max_length=None,
    )
    callback = log_callback(out)
    trainer = SFTTrainer(
        model=policy.model,
        args=args,
        train_dataset=dataset,
        processing_class=policy.processor,
        peft_config=peft_config,
        callbacks=[callback],
    )
    return train_and_save(trainer, policy, out, checkpoint)
