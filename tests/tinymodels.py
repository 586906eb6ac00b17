"""Tiny random models written to a folder, loadable with the users' ``from_pretrained(path)``.

Weights are random but deterministic (fixed seeds). A build takes a few seconds (mostly imports), so
tests get them through the session fixtures in ``conftest.py``, which cache the folders.
"""

from __future__ import annotations

import json
from pathlib import Path

# Bump when a builder changes, so cached folders are rebuilt.
BUILDER_VERSION = "1"

DETECTOR_WORDS = (
    "flag",
    "airplane",
    "aircraft",
    "person",
    "dog",
    "car",
    "cat",
    "bird",
    "a",
    "an",
    "the",
    "of",
    "and",
    "national",
    "red",
    "blue",
    "green",
    "white",
)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough text for a byte-level BPE to learn merges for the words the tests and demos use.
_VLM_CORPUS = (
    "Where is the flag of Chad in the image? The answer is the box [10, 20, 110, 70].",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "flag"}] json bbox_2d label',
    "Think step by step about the colours: blue, yellow and red stripes. Romania or Chad?",
    "airplane person dog car cat bird aircraft national flag of France Germany Italy Japan",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 (x1,y1),(x2,y2) <think> </think> <answer> </answer>",
)


def build_tiny_detector(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Grounding DINO (model + processor) into ``path`` and return it.

    ResNet backbone with 4 stages, ``d_model`` 32, one encoder and two decoder layers, 20 queries,
    a one-layer BERT text backbone over :data:`DETECTOR_WORDS`, and an image processor that
    resizes to at most 320 px (the default 800/1333 is slow on a CPU).
    """
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        ResNetConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *DETECTOR_WORDS]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # `vocab=` is the transformers 5 keyword; `vocab_file=` is ignored and yields only [UNK].
    tokenizer = BertTokenizer(vocab=str(vocab_file))

    config = GroundingDinoConfig(
        backbone_config=ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # 1 fails at construction (tie_weights)
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=20,
        num_feature_levels=4,
        max_text_len=64,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 240, "longest_edge": 320}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _train_qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_VLM_CORPUS, trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    tokenizer = Qwen2TokenizerFast(
        vocab=bpe.get_vocab(),
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[
            t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
        ],
    )
    return tokenizer


# A small model of a real shape (Qwen2-0.5B's text tower, a shallow 640-wide vision tower, about
# 0.6B parameters): what the GPU tests time steps on.
SMALL_REAL_VLM = {
    "text": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "mrope_section": [8, 12, 12],
    },
    "vision": {"depth": 8, "hidden_size": 640, "intermediate_size": 2560, "num_heads": 10},
}


def build_tiny_vlm(path: str | Path, seed: int = 0, size: dict[str, dict] | None = None) -> Path:
    """Write a tiny random Qwen2.5-VL (model + image-only processor) into ``path``; return it.

    Text: hidden 64, 2 layers, 4 heads, 2 kv heads (head_dim 16, ``mrope_section`` sums to 8).
    Vision: depth 2, hidden 32, ``out_hidden_size`` 64. ``size`` overrides the ``text`` and
    ``vision`` settings (e.g. :data:`SMALL_REAL_VLM`). The image processor keeps images small
    (at most 16 merged image tokens). Load back with ``AutoModelForImageTextToText`` and, after
    :func:`groundforge.annotators.vlm_processor.register_image_only_processor`, ``AutoProcessor``.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from groundforge.annotators.vlm_processor import image_only_processor_class

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mrope_section": [2, 3, 3],
        **(size or {}).get("text", {}),
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        **(size or {}).get("vision", {}),
    }
    mrope_section = text.pop("mrope_section")
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **text,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            **vision,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    )
    processor = image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=VLM_CHAT_TEMPLATE
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
