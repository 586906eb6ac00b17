"""Shared test setup: offline hub, tiny cached models, the ``gpu`` marker."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tinymodels

# Set before any test module imports huggingface_hub/transformers/datasets: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` on a machine without CUDA."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


def _cached_model(request: pytest.FixtureRequest, name: str, build: Callable[[Path], Path]) -> Path:
    """Build a tiny model once per (transformers version, builder version) into pytest's cache.

    The folder is built under a temporary name and renamed into place, and builders are
    serialised by a file lock, so parallel test runs never see a half-written folder.
    """
    import transformers

    root = request.config.cache.mkdir("tiny-models")
    key = f"{name}-tf{transformers.__version__}-b{tinymodels.BUILDER_VERSION}"
    final = root / key
    if final.is_dir():
        return final
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            try:
                build(tmp)
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


@pytest.fixture(scope="session")
def tiny_detector_dir(request: pytest.FixtureRequest) -> Path:
    """A folder holding a tiny random Grounding DINO and its processor."""
    return _cached_model(request, "grounding-dino", tinymodels.build_tiny_detector)


@pytest.fixture(scope="session")
def tiny_vlm_dir(request: pytest.FixtureRequest) -> Path:
    """A folder holding a tiny random Qwen2.5-VL and its image-only processor."""
    return _cached_model(request, "qwen2_5_vl", tinymodels.build_tiny_vlm)


@pytest.fixture(scope="session")
def teacher_server(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real ``transformers serve`` process on 127.0.0.1 serving the tiny Qwen2.5-VL.

    Yields ``(base_url, model)``; the server log is in the fixture's temp folder.
    """
    from groundforge.annotators.teacher.serve import start_server

    log = tmp_path_factory.mktemp("teacher-server") / "server.log"
    proc, base_url = start_server(str(tiny_vlm_dir), log_path=str(log))
    try:
        yield base_url, str(tiny_vlm_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo, run once in process; tests only read it."""
    from groundforge.examples import demo_recipe_path
    from groundforge.pipelines.run import run_recipe
    from groundforge.recipe import load_recipe

    out = tmp_path_factory.mktemp("demo-run")
    run_recipe(load_recipe(demo_recipe_path()), str(out), [])
    return out
