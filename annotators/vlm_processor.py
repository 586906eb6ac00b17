"""Image-only processors for the Qwen-VL families that work without torchvision.

The stock ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor`` always build a
video processor, and the video processors of transformers 5 need torchvision, which cannot be
installed next to a CPU torch. The processors here take only an image processor, a tokenizer and
a chat template; they expand ``<|image_pad|>`` exactly like the stock ones (they are subclasses),
so ``generate`` gets matching ``pixel_values``/``image_grid_thw``.

:func:`load_processor` is how every part of groundforge loads the processor of a model folder:
for a Qwen-VL model type it builds the image-only processor from the folder's image processor,
tokenizer and chat template, whatever processor class the folder names (the stock one, as a hub
download does, this module's, or any other), with or without torchvision; other model types get
``AutoProcessor``. Videos are not supported on this path.

A folder saved with an image-only processor records its class name, which
``AutoProcessor.from_pretrained`` resolves only after :func:`register_image_only_processor`;
without registration it silently falls back to the bare tokenizer.

The classes are built on first use (importing transformers' processing code takes seconds), so
importing this module stays cheap. Each is still a module attribute
(``Qwen2_5_VLImageOnlyProcessor`` and so on), which keeps instances picklable by reference.
"""

from __future__ import annotations

from typing import Any

_QWEN3 = ("qwen3_vl.processing_qwen3_vl", "Qwen3VLProcessor", "Qwen3VLImageOnlyProcessor")
# model type -> (module of the stock processor, stock class, image-only class name)
_FAMILIES = {
    "qwen2_vl": ("qwen2_vl.processing_qwen2_vl", "Qwen2VLProcessor", "Qwen2VLImageOnlyProcessor"),
    "qwen2_5_vl": (
        "qwen2_5_vl.processing_qwen2_5_vl",
        "Qwen2_5_VLProcessor",
        "Qwen2_5_VLImageOnlyProcessor",
    ),
    "qwen3_vl": _QWEN3,
    "qwen3_vl_moe": _QWEN3,
}
# Model types whose hub checkpoints name a stock (torchvision-bound) Qwen-VL processor.
IMAGE_ONLY_MODEL_TYPES = frozenset(_FAMILIES)
# The transformers config class of each model type, for AutoProcessor registration.
_CONFIGS = {
    "qwen2_vl": "Qwen2VLConfig",
    "qwen2_5_vl": "Qwen2_5_VLConfig",
    "qwen3_vl": "Qwen3VLConfig",
    "qwen3_vl_moe": "Qwen3VLMoeConfig",
}
_cache: dict[str, type] = {}


def _build_class(module: str, stock: str, name: str) -> type:
    import importlib

    base = getattr(importlib.import_module(f"transformers.models.{module}"), stock)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        # The stock __init__ sets the image/video (and, for Qwen3-VL, vision start/end) token
        # attributes, then hands a ``None`` video processor to ProcessorMixin, which fills only
        # the slots this class's signature names: image processor and tokenizer.
        base.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(
                f"{name} handles images only; use a processor with a video processor "
                "(it needs torchvision) for videos"
            )
        return base.__call__(self, images=images, text=text, **kwargs)

    return type(
        name,
        (base,),
        {
            "__init__": __init__,
            "__call__": __call__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"``{stock}`` without a video processor: images and text only.",
        },
    )


def image_only_processor_class(model_type: str = "qwen2_5_vl") -> type:
    """The image-only processor class of a Qwen-VL model type (built once, on first call)."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"no image-only processor for model type {model_type!r}; "
            f"known: {sorted(IMAGE_ONLY_MODEL_TYPES)}"
        )
    module, stock, name = _FAMILIES[model_type]
    if name not in _cache:
        _cache[name] = _build_class(module, stock, name)
    return _cache[name]


def __getattr__(name: str) -> Any:
    for model_type, (_, _, class_name) in _FAMILIES.items():
        if name == class_name:
            return image_only_processor_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_type_of(path: str) -> str | None:
    """The ``model_type`` of a model folder or hub id (read from its config)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "model_type", None)


def load_processor(path: str, model_type: str | None = None) -> Any:
    """The processor of a model folder: image-only for the Qwen-VL families (whatever processor
    class the folder names), ``AutoProcessor`` for other model types."""
    model_type = model_type or model_type_of(path)
    if model_type in IMAGE_ONLY_MODEL_TYPES:
        return image_only_processor_class(model_type).from_pretrained(path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def register_image_only_processor() -> type:
    """Make ``AutoProcessor.from_pretrained`` return the image-only processors for Qwen-VL folders
    saved with them. Safe to call any number of times; returns the Qwen2.5-VL class."""
    import transformers
    from transformers import AutoProcessor

    for model_type, config_name in _CONFIGS.items():
        config = getattr(transformers, config_name, None)
        if config is not None:
            # exist_ok=True is required: without it the registry silently ignores a transformers
            # config.
            AutoProcessor.register(config, image_only_processor_class(model_type), exist_ok=True)
    return image_only_processor_class("qwen2_5_vl")
