"""Stage 2, GRPO with TRL's ``GRPOTrainer``, started from the SFT output folder.

Rewards come from :func:`groundforge.trainer.rewards.build_rewards` with the box codec of the
trained model (or of the config), so the IoU rewards read boxes in the frame the images were
resized to. ``grpo.rewards`` is a preset name (``deepperception``, ``karl``, ``dip_r1``) or a
spec ``{name: weight | {weight: .., param: ..}}``. KARL's reward reads ``knowledge_level``, joined
from the knowledge map (:mod:`groundforge.trainer.knowledge`) given as ``knowledge_map``.

The data is the ``grpo`` split (the items the SFT model gets right only some of the time), or the
``sft`` split when the run has none (``grpo.fallback_split``).

A generation batch holds several prompts of different lengths. TRL left-pads the prompt ids but
builds the image inputs (``mm_token_type_ids`` among them) with the processor's own padding, so
the processor must pad on the left too: right padding shifts the image positions of every
shorter prompt (``get_rope_index`` then fails, or silently mis-positions the image). Rollouts
never sample a vision special token (:func:`vision_token_ids`): one in a completion has no image
features behind it and breaks the forward pass that scores the completion.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from groundforge.trainer.config import load_train_config, preset_name
from groundforge.trainer.data import build_grpo_dataset
from groundforge.trainer.sft import (
    DATA_CACHE,
    TrainError,
    checkpoint_to_resume,
    full_model_weights,
    load_policy,
    log_callback,
    on_gpu,
    prepare_trainable,
    resolve_output_dir,
    train_and_save,
    trainer_arguments,
)

_LOG = logging.getLogger(__name__)

# Special tokens that frame or stand for image/video features: Qwen-VL's <|vision_start|>,
# <|image_pad|>, ..., LLaVA's <image>, Gemma's <start_of_image>.
_VISION_TOKEN = re.compile(r"image|video|vision", re.IGNORECASE)


def vision_token_ids(processor: Any, model_config: Any = None) -> list[int]:
    """The ids of every vision special token: the tokenizer's special tokens whose text names
    an image, video or vision part, and the model config's ``*_token_id`` fields that do."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token.special and _VISION_TOKEN.search(token.content)
    }
    for token in tokenizer.all_special_tokens:
        if _VISION_TOKEN.search(token):
            ids.add(tokenizer.convert_tokens_to_ids(token))
    configs = [model_config, getattr(model_config, "text_config", None)]
    for config in filter(None, configs):
        for name, value in vars(config).items():
            if name.endswith("_token_id") and _VISION_TOKEN.search(name) and isinstance(value, int):
                ids.add(value)
    return sorted(ids)


def rollout_generation_kwargs(processor: Any, model_config: Any, use_vllm: bool) -> dict:
    """GRPOConfig's ``generation_kwargs`` that keep vision special tokens out of rollouts
    (``suppress_tokens`` for transformers' generate, ``bad_words`` for vLLM)."""
    ids = vision_token_ids(processor, model_config)
    if not use_vllm:
        return {"suppress_tokens": ids}
    tokenizer = getattr(processor, "tokenizer", processor)
    return {"bad_words": tokenizer.convert_ids_to_tokens(ids)}


def reward_spec(rewards: str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The reward spec of ``grpo.rewards``: a preset by name, or the mapping itself.

    >>> list(reward_spec("DeepPerception"))
    ['iou_thresholded', 'think_answer_format', 'parsable_box']
    """
    from groundforge.trainer import rewards as module

    if not isinstance(rewards, str):
        return rewards
    preset = getattr(module, preset_name(rewards).upper(), None)
    if not isinstance(preset, Mapping):
        raise TrainError(f"grpo.rewards: no reward preset called {rewards!r}")
    return preset


def run_grpo(
    data: Any,
    model: str | Path,
    config_path: str | Path | None = None,
    output_dir: str | Path | None = None,
    knowledge_map: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    reward_funcs: Sequence[Callable[..., list]] | None = None,
    reward_weights: Sequence[float] | None = None,
) -> str:
    """GRPO of ``model`` (normally the SFT output folder) on ``data``; returns the output folder
    holding the final model and processor.

    ``reward_funcs`` (TRL reward functions, with ``reward_weights``) replace the config's
    ``grpo.rewards``. See :func:`groundforge.trainer.sft.run_sft` for the other arguments.
    """
    from trl import GRPOConfig, GRPOTrainer

    from groundforge.trainer.data import BARE, answer_format_of, grpo_split
    from groundforge.trainer.rewards import bare_answer_spec, build_rewards

    cfg = load_train_config(config_path, overrides)
    stage = cfg.grpo
    if stage.use_vllm and not on_gpu():
        raise TrainError(
            "grpo.use_vllm: vLLM generation needs a CUDA device and this machine has none; "
            "set grpo.use_vllm: false to generate with transformers"
        )
    out = resolve_output_dir(output_dir, stage, "grpo")
    checkpoint = checkpoint_to_resume(out, resume)
    # TRL pads the prompt ids on the left; the image inputs must line up with them.
    policy = load_policy(model, cfg, weights=full_model_weights(checkpoint), padding_side="left")
    peft_config = prepare_trainable(policy, cfg)

    # Prompts and rewards follow what SFT taught: without rationales the reply is a bare box.
    answer_format = answer_format_of(grpo_split(data, stage.split, stage.fallback_split))
    if reward_funcs is None:
        spec = reward_spec(stage.rewards)
        if answer_format == BARE:
            spec = bare_answer_spec(spec)
        if "karl_iou" in spec and knowledge_map is None:
            _LOG.warning("karl_iou without a knowledge map: every entity gets the middle level")
        funcs, weights = build_rewards(spec, policy.codec)
    else:
        funcs = list(reward_funcs)
        weights = list(reward_weights) if reward_weights is not None else [1.0] * len(funcs)

    dataset = build_grpo_dataset(
        data,
        policy.codec,
        cfg.max_pixels,
        split=stage.split,
        fallback=stage.fallback_split,
        knowledge_map=knowledge_map,
        limit=stage.limit,
        system=cfg.system_prompt,
        instruction=cfg.instruction,
        cache_dir=out / DATA_CACHE,
        answer_format=answer_format,
    )
    vllm: dict[str, Any] = {}
    if stage.use_vllm:
        vllm = {"use_vllm": True, "vllm_mode": stage.vllm_mode}
        if stage.vllm_server_base_url:
            vllm["vllm_server_base_url"] = stage.vllm_server_base_url
    args = GRPOConfig(
        **trainer_arguments(stage, cfg, out),
        num_generations=stage.num_generations,
        beta=stage.beta,
        max_completion_length=stage.max_completion_length,
        temperature=stage.temperature,
        reward_weights=weights,
        log_completions=stage.log_completions,
        generation_kwargs=rollout_generation_kwargs(
            policy.processor, policy.model.config, stage.use_vllm
        ),
        **vllm,
    )
    callback = log_callback(out)
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=policy.processor,
        peft_config=peft_config,
        callbacks=[callback],
    )
    callback.attach(trainer)
    return train_and_save(trainer, policy, out, checkpoint)
