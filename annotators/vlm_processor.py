"""An image-only processor for Qwen2.5-VL models that works without torchvision.

The stock ``Qwen2_5_VLProcessor`` always builds a video processor, and the video processors of
transformers 5 need torchvision, which cannot be installed next to a CPU torch. This processor
takes only an image processor, a tokenizer and a chat template; it expands ``<|image_pad|>``
exactly like the stock one, so ``generate`` gets matching ``pixel_values``/``image_grid_thw``.

A folder saved with it records the class name, which ``AutoProcessor.from_pretrained`` resolves
only after :func:`register_image_only_processor`; without registration it silently falls back to
the bare tokenizer. A checkpoint saved by the stock processor (any hub Qwen2.5-VL model) names
``Qwen2_5_VLProcessor`` instead: load it with ``image_only_processor_class().from_pretrained``.

The class is built on first use (importing transformers' processing code takes seconds), so
importing this module stays cheap. ``Qwen2_5_VLImageOnlyProcessor`` is still a module attribute,
which keeps instances picklable by reference.
"""

from __future__ import annotations

from typing import Any

CLASS_NAME = "Qwen2_5_VLImageOnlyProcessor"

_cache: dict[str, type] = {}


def _build_class() -> type:
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without a video processor: images and text only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = getattr(
                tokenizer, "image_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = getattr(
                tokenizer, "video_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.video_token)
            # Skip the parent's __init__: it insists on a video processor slot.
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError(
                    f"{CLASS_NAME} handles images only; use a processor with a video processor "
                    "(it needs torchvision) for videos"
                )
            return super().__call__(images=images, text=text, **kwargs)

    Qwen2_5_VLImageOnlyProcessor.__module__ = __name__
    Qwen2_5_VLImageOnlyProcessor.__qualname__ = CLASS_NAME
    return Qwen2_5_VLImageOnlyProcessor


def image_only_processor_class() -> type:
    """The processor class (built once, on first call)."""
    if CLASS_NAME not in _cache:
        _cache[CLASS_NAME] = _build_class()
    return _cache[CLASS_NAME]


def __getattr__(name: str) -> Any:
    if name == CLASS_NAME:
        return image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_image_only_processor() -> type:
    """Make ``AutoProcessor.from_pretrained`` return the image-only processor for Qwen2.5-VL
    folders saved with it. Safe to call any number of times; returns the class."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig

    cls = image_only_processor_class()
    # exist_ok=True is required: without it the registry silently ignores a transformers config.
    AutoProcessor.register(Qwen2_5_VLConfig, cls, exist_ok=True)
    return cls
