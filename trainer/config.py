"""``train.yaml``: the settings of the two training stages, validated.

.. code-block:: yaml

    dtype: bfloat16
    max_pixels: 401408
    freeze_vision: true
    lora: null                  # or {r: 16, alpha: 32, dropout: 0.05}
    sft:
      learning_rate: 2.0e-6
      output_dir: runs/sft
    grpo:
      rewards: deepperception   # a preset, or {name: weight, name: {weight: .., param: ..}}
      output_dir: runs/grpo

Defaults are DeepPerception's for 7B-class models; settings the papers leave open are marked
*ours*. Field names follow ``transformers.TrainingArguments`` where one exists, so they mean
what they mean there. Errors name the file and the field.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from groundforge.trainer.data import REASONING_INSTRUCTION
from groundforge.yamlfile import describe_errors, read_yaml

REWARD_PRESETS = ("deepperception", "karl", "dip_r1")
# transformers' SchedulerType values (those that need no extra scheduler arguments).
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class TrainConfigError(ValueError):
    """A training config that cannot be used; the message names the file and the field."""


def preset_name(rewards: str) -> str:
    """The canonical preset name.

    >>> preset_name(" DIP-R1")
    'dip_r1'
    """
    return rewards.strip().lower().replace("-", "_")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    """LoRA adapters on the language model only (the vision tower and projector are excluded
    whatever ``target_modules`` says: their MLPs reuse the names ``gate_proj``/``up_proj``)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


class StageSettings(_Strict):
    """What both stages share: optimisation, logging, checkpoints and which data they read."""

    output_dir: str | None = None
    learning_rate: float = Field(1e-6, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    # Effective batch = per_device_train_batch_size x gradient_accumulation_steps x devices.
    per_device_train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler_type: Scheduler = "cosine"
    max_steps: int = Field(-1, ge=-1)  # -1: run num_train_epochs
    logging_steps: int = Field(10, ge=1)
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    # Below 1: a fraction of the run's total steps (transformers' convention, rounded up), so
    # the default checkpoints every tenth of any run; 1 or more: every that many steps.
    save_steps: int | float = Field(0.1, gt=0)
    save_total_limit: int | None = Field(2, ge=1)
    gradient_checkpointing: bool = True
    split: str = "sft"
    limit: int | None = Field(None, ge=1)

    @field_validator("save_steps")
    @classmethod
    def _whole_steps(cls, value: int | float) -> int | float:
        if value > 1 and value != int(value):
            raise ValueError(f"a fraction of the run below 1 or whole steps, not {value}")
        return int(value) if value >= 1 else value


class SFTSettings(StageSettings):
    """Stage 1, CoT-SFT: 1 epoch, batch 16, cosine, warmup 0.1, lr 1e-6 to 5e-6 (DeepPerception)."""

    learning_rate: float = Field(2e-6, gt=0)
    # *ours*: the loss covers the answer only, as in LLaMA-Factory (the papers' SFT tool); with
    # false it covers the whole conversation, image placeholders included.
    completion_only_loss: bool = True


class GRPOSettings(StageSettings):
    """Stage 2, GRPO: 4 samples per prompt, lr 1e-6, 2 epochs, completions up to 512 tokens,
    temperature 1.0, KL weight 0.04 against the stage-1 model (DeepPerception; KARL: lr 5e-7,
    beta 0.02, 1,500 tokens)."""

    learning_rate: float = Field(1e-6, gt=0)
    num_train_epochs: float = Field(2.0, gt=0)
    # *ours*: one prompt's 4 completions per device step, 4 prompts per optimizer step.
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # *ours*
    lr_scheduler_type: Scheduler = "constant"  # *ours*
    logging_steps: int = Field(1, ge=1)
    split: str = "grpo"
    # The split used when ``split`` is empty: a run without a student pass has no grpo split.
    fallback_split: str | None = "sft"
    num_generations: int = Field(4, ge=2)
    beta: float = Field(0.04, ge=0)
    max_completion_length: int = Field(512, ge=1)
    temperature: float = Field(1.0, gt=0)
    rewards: str | dict[str, float | dict[str, Any]] = "deepperception"
    use_vllm: bool = False  # needs CUDA and a vLLM install (a server in its own venv)
    vllm_mode: Literal["server", "colocate"] = "server"
    vllm_server_base_url: str | None = None
    log_completions: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> GRPOSettings:
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({batch}) must be a "
                f"multiple of num_generations ({self.num_generations})"
            )
        if isinstance(self.rewards, str) and preset_name(self.rewards) not in REWARD_PRESETS:
            raise ValueError(
                f"rewards: unknown preset {self.rewards!r}; use one of {', '.join(REWARD_PRESETS)}"
                " or a mapping of reward names to weights"
            )
        if isinstance(self.rewards, dict) and not self.rewards:
            raise ValueError("rewards: give at least one reward")
        return self


class TrainConfig(_Strict):
    """A whole ``train.yaml``."""

    # Training precision. Trained weights load in float32 whatever this says (bf16 weights would
    # round small updates away); on a GPU, bfloat16 and float32 mean bf16 autocast, float16 fp16
    # autocast. With LoRA the frozen base weights load in this dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: str | None = None
    seed: int = 42
    # Box codec; None derives it from the model type (qwen2_vl, qwen2_5_vl, qwen3_vl).
    codec: Literal["pixel", "norm1000", "qwen25vl", "qwen3vl", "norm01"] | None = None
    # Pixel budget of every image (DeepPerception and KARL: 401,408 = 512 x 28 x 28).
    max_pixels: int = Field(401_408, ge=28 * 28)
    min_pixels: int | None = Field(None, ge=1)  # None: the processor's own
    system_prompt: str | None = None
    instruction: str = REASONING_INSTRUCTION
    box_label: bool = True  # render the entity's name with the answer box
    # Stage 1 trains the language model with the vision tower and projector frozen. With LoRA
    # every base weight stays frozen and only the language model gets adapters.
    freeze_vision: bool = True
    lora: LoraSettings | None = None
    sft: SFTSettings = Field(default_factory=SFTSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)

    @model_validator(mode="after")
    def _pixels(self) -> TrainConfig:
        if self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
            )
        return self


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def field_annotation(dotted: str) -> Any:
    """The type of the config field ``dotted`` names (``"sft.save_strategy"``), or None when
    it names no field.

    >>> field_annotation("sft.max_steps"), field_annotation("sft.nothing")
    (<class 'int'>, None)
    """
    node: Any = TrainConfig
    annotation = None
    for key in dotted.split("."):
        models = [m for m in _members(node) if isinstance(m, type) and issubclass(m, BaseModel)]
        field = models[0].model_fields.get(key) if models else None
        if field is None:
            return None
        node = annotation = field.annotation
    return annotation


def _takes_text(annotation: Any) -> bool:
    """Whether a field of this type accepts a string (``str`` or a ``Literal`` of strings)."""
    for member in _members(annotation):
        if member is str:
            return True
        if typing.get_origin(member) is Literal and any(
            isinstance(v, str) for v in typing.get_args(member)
        ):
            return True
    return False


def parse_override(dotted: str, text: str) -> Any:
    """The value of ``--set FIELD=TEXT``: ``TEXT`` read as YAML, except that a string field
    keeps a scalar YAML would read as a boolean, a number or a date as the text written, so
    ``save_strategy=no`` is ``"no"``, while a boolean field still reads ``no`` as false. A
    field without a boolean type keeps ``yes``/``no``/``on``/``off`` as text too, so a number
    field refuses them instead of reading 0 or 1.

    >>> parse_override("sft.save_strategy", "no"), parse_override("freeze_vision", "no")
    ('no', False)
    >>> parse_override("sft.split", "2024"), parse_override("sft.max_steps", "2")
    ('2024', 2)
    """
    value = yaml.safe_load(text)
    if value is None or isinstance(value, (str, list, dict)):
        return value
    annotation = field_annotation(dotted)
    if annotation is None:
        return value
    if isinstance(value, bool) and bool not in _members(annotation):
        # Lax validation would turn a boolean into 0 or 1; the text gets a clear error.
        return text.strip()
    if not _takes_text(annotation):
        return value
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        return text.strip()
    return value


def merge_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """``data`` with ``overrides`` applied: nested mappings merge, ``"sft.max_steps": 2`` style
    dotted keys set one field.

    >>> merge_overrides({"sft": {"max_steps": -1, "seed": 1}}, {"sft.max_steps": 2})
    {'sft': {'max_steps': 2, 'seed': 1}}
    """
    merged = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if "." in key:
            _set_dotted(merged, key, value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_train_config(
    data: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    origin: str = "<train config>",
) -> TrainConfig:
    """Validate a config given as a mapping, with ``overrides`` applied first."""
    if data is not None and not isinstance(data, Mapping):
        raise TrainConfigError(
            f"{origin}: a training config is a mapping, got {type(data).__name__}"
        )
    merged = merge_overrides(dict(data or {}), overrides)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as err:
        raise TrainConfigError(
            f"{origin}: invalid training config\n{describe_errors(err)}"
        ) from None


def load_train_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Read ``train.yaml`` (or take the defaults when ``path`` is None) and apply ``overrides``.

    Relative ``output_dir`` values in the file resolve against the file's folder.
    """
    if path is None:
        return parse_train_config({}, overrides, "<defaults>")
    path = Path(path)
    data = read_yaml(path, TrainConfigError, "training config")
    if isinstance(data, dict):
        for stage in ("sft", "grpo"):
            section = data.get(stage)
            if isinstance(section, dict) and isinstance(section.get("output_dir"), str):
                local = Path(section["output_dir"]).expanduser()
                if not local.is_absolute():
                    data[stage] = {**section, "output_dir": str(path.parent / local)}
    return parse_train_config(data, overrides, str(path))
