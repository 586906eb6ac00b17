"""``groundforge serve-teacher``: a local OpenAI-compatible endpoint for a model folder.

It runs ``transformers serve`` in this process with two changes:

- **Images reach the model.** The folder's processor is loaded with
  :func:`groundforge.annotators.vlm_processor.load_processor`, so any Qwen2-VL, Qwen2.5-VL or
  Qwen3-VL folder (the stock processor config of a hub download included, with or without
  torchvision) gets an image-only processor. Left alone, ``transformers serve`` fails to start on
  a stock config without torchvision, and silently serves text-only a folder whose processor
  class it does not know.
- **Replies are plain text**, decoded like the in-process backend
  (:func:`groundforge.annotators.teacher.embedded.decode_replies`): special tokens skipped and no
  response parsing. ``transformers serve`` otherwise parses Qwen replies (reasoning and tool
  calls) from a decode that keeps special tokens, so the two backends, which share one reply
  cache, would disagree on the same generation.

Before it listens, the server probes itself: one request with an image must cost more prompt
tokens than the same text alone. If not, the model would be served text-only, and
:func:`run_server` raises :class:`ServeError` instead (the command exits 1). Meant for CPU use and
tests; on GPUs serve the model with vLLM in its own environment (``vllm serve MODEL``).

:func:`start_server` runs ``groundforge serve-teacher`` as a subprocess and waits for it.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

PROBE_SIZE = (64, 64)
PROBE_TEXT = "Describe the image."


class ServeError(RuntimeError):
    """The model cannot be served as asked (the message names the folder and the fix)."""


def _prepare_environment() -> None:
    # /v1/models answers 500 when the hub cache folder does not exist.
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = str(cache)


def _patch_serving(model: str) -> None:
    """Load ``model``'s processor our way and switch the response parser off (module docstring).

    Both hooks are private to ``transformers serve``; a version that renames them fails here, at
    startup, rather than serving without images.
    """
    from transformers.cli.serving import model_manager, utils

    from groundforge.annotators.vlm_processor import load_processor

    manager = model_manager.ModelManager
    if not hasattr(manager, "_load_processor") or not hasattr(utils, "get_response_template"):
        raise ServeError(
            "this transformers version changed `transformers serve` (no "
            "ModelManager._load_processor or get_response_template); groundforge serve-teacher "
            "needs transformers 5.23 or later 5.x"
        )
    stock_load = manager._load_processor

    def _load_processor(self, model_id_and_revision, gguf_file=None):
        if gguf_file is None and model_id_and_revision == model:
            return load_processor(model)
        return stock_load(self, model_id_and_revision, gguf_file=gguf_file)

    manager._load_processor = _load_processor
    utils.get_response_template = lambda processor, model: None


def _probe_image() -> str:
    import base64

    from PIL import Image

    image = Image.new("RGB", PROBE_SIZE)
    image.putdata([(x * 4, y * 4, 128) for y in range(PROBE_SIZE[1]) for x in range(PROBE_SIZE[0])])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


async def _prompt_tokens(app, model: str) -> tuple[int, int]:
    """Prompt tokens of one request with an image and of the same text alone, sent to the app
    in process (nothing listens yet)."""
    import httpx

    text = {"type": "text", "text": PROBE_TEXT}
    image = {"type": "image_url", "image_url": {"url": _probe_image()}}
    counts = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        for content in ([image, text], [text]):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 1,
                "temperature": 0.0,
            }
            response = await client.post("/v1/chat/completions", json=body, timeout=None)
            if response.status_code != 200:
                raise ServeError(
                    f"{model}: the startup probe (a {PROBE_SIZE[0]}x{PROBE_SIZE[1]} image and a "
                    f"short text) failed with HTTP {response.status_code}: {response.text[:500]}"
                )
            counts.append(int(response.json()["usage"]["prompt_tokens"]))
    return counts[0], counts[1]


def check_images_reach_model(model: str, with_image: int, text_only: int) -> None:
    """Raise :class:`ServeError` unless the image cost prompt tokens."""
    if with_image > text_only:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    probe = (
        f"a request with a {PROBE_SIZE[0]}x{PROBE_SIZE[1]} image cost {with_image} prompt "
        f"tokens, the same text alone {text_only}"
    )
    if getattr(config, "vision_config", None) is None:
        raise ServeError(
            f"{model} is a text-only model (model type {config.model_type!r}): {probe}. Every "
            "teacher, grounder and student request carries an image; serve a vision-language "
            "model."
        )
    raise ServeError(
        f"{model} would be served text-only: {probe}. The processor transformers loads for this "
        "folder reads no images (a processor class it does not know, named in "
        "processor_config.json or tokenizer_config.json, falls back to the bare tokenizer), so "
        "every image would be dropped silently. Fix: put the processor files of the model's hub "
        "repository (preprocessor_config.json or processor_config.json, tokenizer_config.json, "
        f"the chat template) in {model}, or serve the model with vLLM in its own environment "
        "(`vllm serve MODEL`)."
    )


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """Load ``model``, probe that images reach it, then serve it until interrupted (blocks)."""
    _prepare_environment()
    _patch_serving(model)
    from transformers.cli.serve import Serve

    class _Unstarted(Serve):
        # non_blocking Serve listens from start_server(), in a thread; here the main thread
        # listens with server.run(), and only once the probe has passed.
        def start_server(self) -> None:
            pass

    try:
        serve = _Unstarted(
            force_model=model, host=host, port=port, device=device, non_blocking=True
        )
    except (OSError, ValueError, ImportError) as exc:  # a folder without the files it needs
        raise ServeError(f"cannot load {model}: {exc}") from exc
    with_image, text_only = asyncio.run(_prompt_tokens(serve.server.config.app, model))
    check_images_reach_model(model, with_image, text_only)
    print(
        f"images reach {model}: a {PROBE_SIZE[0]}x{PROBE_SIZE[1]} image costs "
        f"{with_image - text_only} prompt tokens",
        file=sys.stderr,
        flush=True,
    )
    serve.server.run()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _last_line(log_path: str | None) -> str:
    if not log_path:
        return ""
    lines = Path(log_path).read_text(errors="replace").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def start_server(
    model: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "cpu",
    log_path: str | None = None,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """Start a server subprocess and wait until it accepts connections (it listens only once its
    startup probe has passed).

    Returns the process and the base URL (``http://host:port/v1``). The caller stops the process.
    """
    port = port or free_port(host)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "groundforge.cli",
            "serve-teacher",
            model,
            "--host",
            host,
            "--port",
            str(port),
            "--device",
            device,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if log_path:
        log.close()  # the child has its own copy of the descriptor
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the teacher server for {model} exited with code {proc.returncode}"
                + (f"; see {log_path}{_last_line(log_path)}" if log_path else "")
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc, f"http://{host}:{port}/v1"
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise TimeoutError(
        f"the teacher server for {model} did not listen on {host}:{port} within {timeout:.0f} s"
    )
