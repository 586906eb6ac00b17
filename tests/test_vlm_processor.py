"""The image-only Qwen2.5-VL processor: loads without torchvision, expands image tokens, saves."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def test_vlm_processor_module_imports_without_transformers():
    code = "import sys, groundforge.annotators.vlm_processor; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tiny_vlm_loads_and_generates_with_the_image_only_processor(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from groundforge.annotators import vlm_processor

    cls = vlm_processor.register_image_only_processor()
    assert vlm_processor.register_image_only_processor() is cls
    assert vlm_processor.Qwen2_5_VLImageOnlyProcessor is cls

    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    assert type(processor) is cls
    assert type(pickle.loads(pickle.dumps(processor))) is cls
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"

    images = [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), np.uint8)),
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 90, 3), np.uint8)),
    ]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in ("Where is the flag?", "Find the airplane.")
    ]
    assert texts[0].count("<|image_pad|>") == 1
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)

    merge = processor.image_processor.merge_size
    per_image = (inputs["image_grid_thw"].prod(dim=-1) // merge**2).tolist()
    per_row = (inputs["input_ids"] == processor.image_token_id).sum(dim=-1).tolist()
    assert per_row == per_image
    assert per_image[0] != per_image[1]  # different sizes, different expansions
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(dim=-1).sum())

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0], str)

    # the one-call path (images inside the messages) expands the same way
    one_call = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images[0]},
                    {"type": "text", "text": "Where is the flag?"},
                ],
            }
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    alone = processor(images=images[:1], text=texts[:1], return_tensors="pt")
    assert one_call["input_ids"].tolist() == alone["input_ids"].tolist()
    assert torch.equal(one_call["image_grid_thw"], alone["image_grid_thw"])

    with pytest.raises(ValueError, match="images only"):
        processor(text=texts[:1], images=images[:1], videos=[np.zeros((2, 28, 28, 3))])


def test_image_only_processor_saves_and_loads_back(tiny_vlm_dir, tmp_path):
    from groundforge.annotators.vlm_processor import image_only_processor_class

    cls = image_only_processor_class()
    processor = cls.from_pretrained(tiny_vlm_dir)
    processor.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.chat_template == processor.chat_template
    assert again.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.image_processor.size == processor.image_processor.size
