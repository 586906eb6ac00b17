"""``groundforge serve-teacher``: a local OpenAI-compatible endpoint for a model folder.

It runs ``transformers serve`` in this process after registering the image-only Qwen-VL processor
(without it, ``transformers serve`` silently drops the images of every request, because the stock
Qwen-VL processors need torchvision). Meant for CPU use and tests; on GPUs serve the model with
vLLM in its own environment (``vllm serve MODEL``).

:func:`start_server` runs ``groundforge serve-teacher`` as a subprocess and waits for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def serve_argv(model: str, host: str, port: int, device: str = "cpu") -> list[str]:
    """The ``transformers serve`` arguments for one preloaded model."""
    return ["serve", model, "--host", host, "--port", str(port), "--device", device]


def _prepare_environment() -> None:
    # /v1/models answers 500 when the hub cache folder does not exist.
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = str(cache)


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """Serve ``model`` until interrupted (blocks)."""
    _prepare_environment()
    from transformers.cli.transformers import app

    from groundforge.annotators.vlm_processor import register_image_only_processor

    register_image_only_processor()
    app(serve_argv(model, host, port, device), standalone_mode=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    model: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "cpu",
    log_path: str | None = None,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """Start a server subprocess and wait until it accepts connections.

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
                + (f"; see {log_path}" if log_path else "")
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
