"""Pre-flight: model folders and chat endpoints are checked before any Beam work, and the error
names the recipe field and the fix."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from groundforge.annotators.teacher.serve import free_port
from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.pipelines.preflight import check_endpoint, check_model

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = ["africa/chad.png", "europe/romania.png", "africa/mali.png"]


class ChatServer:
    """A loopback OpenAI-style endpoint: ``GET /v1/models`` lists ``models`` (or answers
    ``models_status``); chat completions answer ``reply`` after ``delay`` seconds."""

    def __init__(self, models=("served",), models_status=200, reply="no box", delay=0.0):
        self.models = list(models)
        self.models_status = models_status
        self.reply = reply
        self.delay = delay
        self.chats = 0
        self.listings = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner._lock:
            owner.listings += 1
        if self.path != "/v1/models" or owner.models_status != 200:
            self._send(owner.models_status if self.path == "/v1/models" else 404, {"error": {}})
            return
        self._send(200, {"object": "list", "data": [{"id": m} for m in owner.models]})

    def do_POST(self) -> None:
        owner = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with owner._lock:
            owner.chats += 1
        time.sleep(owner.delay)
        message = {"role": "assistant", "content": owner.reply}
        self._send(
            200,
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def copy_flags(folder: Path, names=NAMES) -> Path:
    for name in names:
        target = folder / name.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FLAGS / name, target)
    return folder


def write_recipe(tmp_path: Path, folder: Path, **sections) -> Path:
    recipe = {
        "name": "lifecycle",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(folder), "entity_from": "stem"},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def chat(base_url: str, model: str, **extra) -> dict:
    return {"model": model, "base_url": base_url, "max_retries": 0, "timeout": 10, **extra}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def detector(model: str) -> dict:
    return {"method": "detector", "detector": {"model": model, "labels": {"flag": ["flag"]}}}


@pytest.mark.parametrize("kind", ["missing", "empty", "broken"])
def test_a_detector_folder_that_does_not_load_stops_before_beam(tmp_path, kind):
    model = tmp_path / "models" / "dino"
    if kind != "missing":
        model.mkdir(parents=True)
    if kind == "broken":
        (model / "config.json").write_text('{"model_type": "grounding-dino", ')
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"), boxes=detector(str(model)))
    out = tmp_path / "out"
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 1
    assert "boxes.detector.model" in result.output and str(model) in result.output
    expected = {"missing": "does not exist", "empty": "no config.json", "broken": "does not load"}
    assert expected[kind] in result.output
    assert "Traceback" not in result.output
    # No Beam work: nothing was staged.
    assert not (out / "_staging").exists() and not (out / "manifest.json").exists()


def test_a_saved_model_folder_passes(tiny_detector_dir):
    assert check_model("boxes.detector.model", str(tiny_detector_dir)) is None


def test_hub_ids_are_looked_up_in_the_local_cache_only(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = check_model("embed.image", "nobody/not-a-cached-model")
    assert problem is not None and "embed.image" in problem and "cache" in problem
    # Online, a hub id is left to the loader (nothing is downloaded here).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert check_model("embed.image", "nobody/not-a-cached-model") is None


def test_a_wrong_model_name_stops_the_run_and_sends_no_request(tmp_path):
    with ChatServer(models=["served-model"]) as server:
        recipe = write_recipe(
            tmp_path, copy_flags(tmp_path / "images"), teacher=chat(server.base_url, "typo")
        )
        result = run_cli(str(recipe), "--out", str(tmp_path / "out"))
        assert server.listings == 1 and server.chats == 0
    assert result.exit_code == 1
    assert "teacher.model" in result.output and "'typo'" in result.output
    assert "served-model" in result.output and "Traceback" not in result.output


def test_every_endpoint_is_checked_and_every_problem_listed(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/v1"
    with ChatServer(models=["student"]) as server:
        recipe = write_recipe(
            tmp_path,
            copy_flags(tmp_path / "images"),
            teacher=chat(down, "teacher"),
            student=chat(server.base_url, "other", k=1),
        )
        result = run_cli(str(recipe), "--out", str(tmp_path / "out"))
        assert server.chats == 0
    assert result.exit_code == 1
    assert "teacher.base_url" in result.output and "does not answer" in result.output
    assert "student.model" in result.output


def test_endpoint_answers(monkeypatch):
    with ChatServer(models=["m"]) as server:
        assert check_endpoint("teacher", server.base_url, "m", None, 5) is None
    # A server that does not list its models cannot be checked; it is not refused.
    with ChatServer(models_status=404) as server:
        assert check_endpoint("teacher", server.base_url, "m", None, 5) is None
    with ChatServer(models_status=401) as server:
        monkeypatch.setenv("LIFECYCLE_KEY", "k")
        problem = check_endpoint("grounder", server.base_url, "m", "LIFECYCLE_KEY", 5)
        assert problem is not None and "grounder.api_key_env" in problem


def test_a_real_served_model_passes_and_a_wrong_name_does_not(teacher_server):
    base_url, model = teacher_server
    assert check_endpoint("teacher", base_url, model, None, 20) is None
    problem = check_endpoint("teacher", base_url, model + "-typo", None, 20)
    assert problem is not None and model in problem
