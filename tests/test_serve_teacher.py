"""``groundforge serve-teacher`` with tiny real models: Qwen-VL folders laid out as a hub download
are served with their images, a model it would serve text-only is refused at startup, replies
read like the in-process backend's, and the chat client notices a server that drops images."""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tinymodels
from PIL import Image

from groundforge.annotators.teacher import embedded
from groundforge.annotators.teacher.client import OpenAIBackend
from groundforge.annotators.teacher.embedded import TransformersBackend
from groundforge.annotators.teacher.serve import free_port, start_server
from groundforge.annotators.teacher.types import EndpointSettings, Sampling, TeacherRequest

GREEDY = Sampling(temperature=0.0, max_tokens=16, seed=0)
PROMPT = "Where is the flag of Chad in the image? Think step by step, then answer."
STOCK_PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def noise_png(seed: int, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def build_tiny_qwen_vl(path: Path, family: str) -> Path:
    """A tiny random Qwen2-VL or Qwen3-VL (model + image-only processor), shaped like
    :func:`tinymodels.build_tiny_vlm`: text hidden 64, 2 layers; vision depth 2."""
    import torch
    from transformers import GenerationConfig, Qwen2VLImageProcessorPil

    from groundforge.annotators.vlm_processor import image_only_processor_class

    tokenizer = tinymodels._train_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tinymodels.QWEN_SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    special = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        patch = 14
        config = Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": patch,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            **special,
        )
        model_class = Qwen2VLForConditionalGeneration
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        patch = 16
        config = Qwen3VLConfig(
            text_config={
                **text,
                "head_dim": 16,
                "rope_parameters": {**rope, "mrope_interleaved": True},
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "patch_size": patch,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [1],
            },
            **special,
        )
        model_class = Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    merged = (2 * patch) ** 2  # the pixels of one merged image token
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": merged * 4, "longest_edge": merged * 16}, patch_size=patch
    )
    processor = image_only_processor_class(family)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tinymodels.VLM_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def as_downloaded(folder: Path, out: Path, processor_class: str) -> Path:
    """A copy of a saved model folder in the layout of a hub Qwen-VL repository: the image
    processor in ``preprocessor_config.json``, the chat template in ``chat_template.json`` and
    in ``tokenizer_config.json``, and ``processor_class`` naming ``processor_class`` (the stock
    processor, for a hub download)."""
    shutil.copytree(folder, out)
    saved = json.loads((out / "processor_config.json").read_text())
    (out / "processor_config.json").unlink()
    preprocessor = {**saved["image_processor"], "processor_class": processor_class}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    template = out / "chat_template.jinja"
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["processor_class"] = processor_class
    tokenizer_config["chat_template"] = json.loads((out / "chat_template.json").read_text())[
        "chat_template"
    ]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def build_tiny_llava_without_processor(path: Path) -> Path:
    """A tiny random LLaVA whose tokenizer config names a processor class transformers does not
    know: ``AutoProcessor`` then returns the bare tokenizer, so images cannot reach the model."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )

    tokenizer = tinymodels._train_qwen_tokenizer()
    tokenizer.chat_template = tinymodels.VLM_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tinymodels.QWEN_SPECIAL_TOKENS}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["processor_class"] = "LlavaImageOnlyProcessor"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


@pytest.fixture(scope="module")
def folders(tiny_vlm_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL folders as a hub download lays them out, and a
    Qwen2.5-VL folder whose processor class transformers does not know."""
    root = tmp_path_factory.mktemp("served-folders")
    saved = {"qwen2_5_vl": Path(tiny_vlm_dir)}
    for family in ("qwen2_vl", "qwen3_vl"):
        saved[family] = build_tiny_qwen_vl(root / f"saved-{family}", family)
    out = {
        family: as_downloaded(saved[family], root / family, stock)
        for family, stock in STOCK_PROCESSORS.items()
    }
    out["unknown_class"] = as_downloaded(
        saved["qwen2_5_vl"], root / "unknown_class", "MyQwen2_5_VLImageProcessor"
    )
    return out


@pytest.mark.parametrize("family", sorted(STOCK_PROCESSORS))
def test_load_processor_reads_images_from_a_stock_folder(folders, family):
    from groundforge.annotators.vlm_processor import image_only_processor_class, load_processor

    processor = load_processor(str(folders[family]))
    assert type(processor) is image_only_processor_class(family)
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(noise_png(0, 320, 240)))
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    merge = processor.image_processor.merge_size
    expanded = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert expanded == int(inputs["image_grid_thw"].prod()) // merge**2 > 1
    with pytest.raises(ValueError, match="images only"):
        processor(images=[image], text=[text], videos=[np.zeros((2, 32, 32, 3), np.uint8)])


@contextmanager
def serving(folder: Path, log: Path):
    proc, base_url = start_server(str(folder), log_path=str(log))
    try:
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "unknown_class"])
def test_qwen_vl_folders_as_downloaded_are_served_with_images(folders, kind, tmp_path):
    from transformers import AutoProcessor

    folder = folders[kind]
    # What plain `transformers serve` would do with this folder: fail (the stock processor needs
    # torchvision for its video processor) or fall back to the tokenizer (an unknown class).
    if kind == "unknown_class":
        assert not hasattr(AutoProcessor.from_pretrained(folder), "image_processor")
    elif not torchvision_importable():
        with pytest.raises((OSError, ImportError), match="(?i)video processor|torchvision"):
            AutoProcessor.from_pretrained(folder)

    with serving(folder, tmp_path / "server.log") as base_url:
        backend = OpenAIBackend(EndpointSettings(base_url, str(folder), sampling=GREEDY))
        with_image, text_only = backend.answer(
            [
                TeacherRequest("image", PROMPT, images=(noise_png(0, 320, 240),)),
                TeacherRequest("text", PROMPT),
            ]
        )
        backend.close()
    assert with_image.ok and text_only.ok
    assert with_image.prompt_tokens > text_only.prompt_tokens
    assert "images reach" in (tmp_path / "server.log").read_text()


def build_tiny_text_lm(path: Path) -> Path:
    """A tiny random Qwen2 language model with its tokenizer: no vision at all."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tinymodels._train_qwen_tokenizer()
    tokenizer.chat_template = tinymodels.VLM_CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def refusal(folder: Path) -> str:
    """Run ``groundforge serve-teacher`` on ``folder``; it must exit 1 before it listens.
    Returns its error line."""
    done = subprocess.run(
        [sys.executable, "-m", "groundforge.cli", "serve-teacher", str(folder)]
        + ["--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: {folder} ")
    return message


def test_a_vision_model_it_would_serve_text_only_is_refused_at_startup(tmp_path):
    from transformers import AutoProcessor

    folder = build_tiny_llava_without_processor(tmp_path / "llava")
    # Plain `transformers serve` would load the bare tokenizer and drop every image.
    assert not hasattr(AutoProcessor.from_pretrained(folder), "image_processor")
    message = refusal(folder)
    assert "served text-only" in message and "vllm serve" in message


def test_a_text_only_model_is_refused_at_startup(tmp_path):
    message = refusal(build_tiny_text_lm(tmp_path / "text-lm"))
    assert "is a text-only model (model type 'qwen2')" in message
    assert "serve a vision-language model" in message


def test_served_and_in_process_replies_decode_alike(teacher_server, tiny_vlm_dir, monkeypatch):
    base_url, model = teacher_server
    # Greedy replies to varied images; some generations hold special tokens mid-reply.
    requests = [
        TeacherRequest(
            f"r{i}",
            f"Where is the flag {i}? Think step by step.",
            images=(noise_png(i, 56 + 8 * (i % 5), 56 + 4 * (i % 3)),),
        )
        for i in range(40)
    ]
    raw: list[str] = []
    decode = embedded.decode_replies

    def recording(tokenizer, rows):
        raw.extend(tokenizer.batch_decode(rows, skip_special_tokens=False))
        return decode(tokenizer, rows)

    monkeypatch.setattr(embedded, "decode_replies", recording)
    # One at a time, as the server generates: batching with padding may shift float noise.
    local = TransformersBackend(model, sampling=GREEDY, batch_size=1)
    in_process = local.answer(requests)
    local.close()
    backend = OpenAIBackend(EndpointSettings(base_url, model, sampling=GREEDY))
    served = backend.answer(requests)
    backend.close()

    inner = [t for t in tinymodels.QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]
    assert any(token in text for text in raw for token in inner)  # the case that used to differ
    assert all(r.ok for r in in_process + served)
    assert [r.prompt_tokens for r in served] == [r.prompt_tokens for r in in_process]
    assert [r.text for r in served] == [r.text for r in in_process]


@contextmanager
def plain_transformers_serve(folder: Path, log: Path):
    """``transformers serve`` itself, without groundforge's processor loading: it serves a
    folder whose processor class it does not know text-only, silently."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transformers.cli.transformers",
                "serve",
                str(folder),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "transformers serve did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


UNSEEN = "did not see the images"


def test_the_client_warns_once_when_the_server_drops_images(folders, tmp_path, caplog):
    folder = folders["unknown_class"]
    requests = [
        TeacherRequest(f"big-{i}", PROMPT, images=(noise_png(i, 320, 240),)) for i in range(3)
    ]
    with plain_transformers_serve(folder, tmp_path / "server.log") as base_url:
        backend = OpenAIBackend(EndpointSettings(base_url, str(folder), sampling=GREEDY))
        with caplog.at_level(logging.WARNING):
            replies = backend.answer(requests)
            replies += backend.answer(requests[:1])
        text_only = backend.answer([TeacherRequest("text", PROMPT)])[0]
        backend.close()

    # The server answered, ignoring the images: same count as the text alone.
    assert all(r.ok for r in replies)
    assert {r.prompt_tokens for r in replies} == {text_only.prompt_tokens}
    warnings = [r.getMessage() for r in caplog.records if UNSEEN in r.getMessage()]
    assert len(warnings) == 1
    assert base_url in warnings[0] and "320x240" in warnings[0]


def test_no_warning_when_the_server_sees_the_images(teacher_server, caplog):
    base_url, model = teacher_server
    # Within the tiny model's pixel budget (16 image tokens), far below any real model's.
    requests = [
        TeacherRequest(f"small-{i}", PROMPT, images=(noise_png(i, 112, 112),)) for i in range(3)
    ]
    backend = OpenAIBackend(EndpointSettings(base_url, model, sampling=GREEDY))
    with caplog.at_level(logging.WARNING):
        replies = backend.answer(requests)
    backend.close()
    assert all(r.ok for r in replies)
    assert not [r for r in caplog.records if UNSEEN in r.getMessage()]
