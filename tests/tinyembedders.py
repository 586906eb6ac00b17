"""Tiny random CLIP and SigLIP dual encoders written to a folder, loadable with ``from_pretrained``.

Only the image side is used by :class:`groundforge.annotators.embed.TransformersImageEmbedder`, but
``AutoModel`` loads the whole dual model, so the text towers exist too (tiny, with a 64-word
vocabulary and special token ids inside it). No tokenizer is saved: image features need only the
image processor. Weights are random but deterministic (fixed seed).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32
CLIP_PROJECTION_DIM = 24
SIGLIP_HIDDEN = 40

_TEXT_TOWER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def _vision_tower(hidden_size: int) -> dict:
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 16,
    }


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model + PIL image processor) into ``path`` and return it.

    Vision: hidden 32, 2 layers, 32 px images in 16 px patches. Image features have
    :data:`CLIP_PROJECTION_DIM` dims (the projection, not the hidden size).
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=_TEXT_TOWER,
        vision_config=_vision_tower(32),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    # The Pil class saves as "CLIPImageProcessor", which loads back as the Pil class when
    # torchvision is absent (or with backend="pil").
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    ).save_pretrained(path)
    return path


def build_tiny_siglip(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SigLIP (model + PIL image processor) into ``path`` and return it.

    Vision: hidden :data:`SIGLIP_HIDDEN`, 2 layers, 32 px images in 16 px patches. SigLIP has no
    projection on the image side: image features have the vision hidden size.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = SiglipConfig(text_config=_TEXT_TOWER, vision_config=_vision_tower(SIGLIP_HIDDEN))
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(path)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path
