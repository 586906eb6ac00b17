"""Stage 2, GRPO with TRL's ``GRPOTrainer``, started from the SFT output folder.

Rewards come from :func:`groundforge.trainer.rewards.build_rewards` with the box codec of the
trained model (or of the config), so the IoU rewards read boxes in the frame the images were
resized to. ``grpo.rewards`` is a preset name (``deepperception``, ``karl``, ``dip_r1``) or a
spec ``{name: weight | {weight: .., param: ..}}``. KARL's reward reads ``knowledge_level``, joined
from the knowledge map (:mod:`groundforge.trainer.knowledge`) given as ``knowledge_map``.

The data is the ``grpo`` split (the items the SFT model gets right only some of the time), or the
``sft`` split when the run has none (``grpo.fallback_split``).
"""

from __future__ import annotations

import logging
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

    from groundforge.trainer.rewards import build_rewards

    cfg = load_train_config(config_path, overrides)
    stage = cfg.grpo
    if stage.use_vllm and not on_gpu():
        raise TrainError(
            "grpo.use_vllm: vLLM generation needs a CUDA device and this machine has none; "
            "set grpo.use_vllm: false to generate with transformers"
        )
    out = resolve_output_dir(output_dir, stage, "grpo")
    checkpoint = checkpoint_to_resume(out, resume)
    policy = load_policy(model, cfg, weights=full_model_weights(checkpoint))
    peft_config = prepare_trainable(policy, cfg)

    if reward_funcs is None:
        spec = reward_spec(stage.rewards)
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
