"""A rerun into an existing --out replaces the previous run only once it has finished: a failed,
interrupted or killed rerun leaves it as it was, and a folder that is not a run is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_lifecycle_preflight import ChatServer, chat, copy_flags, run_cli, write_recipe

from groundforge.outputs.manifest import check_run
from groundforge.pipelines import run as run_module
from groundforge.pipelines.run import STAGING_DIR, prepare_out, run_recipe
from groundforge.recipe import load_recipe


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file of a run (the reply cache aside: reruns add to it)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "cache"
    }


@pytest.fixture
def finished(tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """A recipe, the folder of its finished run, and that run's files."""
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"))
    out = tmp_path / "out"
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    files = snapshot(out)
    assert "manifest.json" in files and any(name.startswith("shards/") for name in files)
    return recipe, out, files


def test_a_rerun_with_a_wrong_source_keeps_the_previous_run(finished, tmp_path):
    recipe, out, files = finished
    typo = write_recipe(tmp_path, tmp_path / "imagez")
    result = run_cli(str(typo), "--out", str(out))
    assert result.exit_code == 1 and "imagez" in result.output
    assert snapshot(out) == files


def test_a_rerun_that_fails_after_writing_keeps_the_previous_run(finished, monkeypatch):
    recipe, out, files = finished

    def broken_report(run_dir, *args, **kwargs):
        # By now the new shards, rejections and manifest are written (in staging).
        assert (Path(run_dir) / "manifest.json").is_file()
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "write_report", broken_report)
    with pytest.raises(OSError, match="disk full"):
        run_recipe(load_recipe(recipe), str(out))
    assert snapshot(out) == files
    assert not (out / STAGING_DIR).exists()


def test_a_finished_rerun_replaces_the_previous_run(finished, tmp_path):
    recipe, out, files = finished
    data = yaml.safe_load(recipe.read_text())
    data["source"]["path"] = str(copy_flags(tmp_path / "fewer", ["africa/chad.png"]))
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = check_run(str(out))
    assert manifest["samples"] == 1
    # No shard of the previous run is left beside the new ones.
    shards = {p for p in snapshot(out) if p.startswith("shards/") and p.endswith(".arrow")}
    assert shards == {s["path"] for s in manifest["shards"]}
    assert not (out / STAGING_DIR).exists()


def test_a_run_killed_while_moving_into_place_is_finished_by_the_next(finished, monkeypatch):
    recipe, out, files = finished
    real_move = run_module.move_files
    calls = []

    def move_then_die(sources, destinations):
        calls.append(sources)
        if len(calls) == 1:
            # Half of the staged files arrive, then the process "dies".
            half = len(sources) // 2
            real_move(sources[:half], destinations[:half])
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "move_files", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe), str(out))
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(run_module, "move_files", real_move)

    prepare_out(str(out))
    check_run(str(out))  # every listed shard is there, with its checksum
    assert not (out / STAGING_DIR).exists()


def _slow_rerun(tmp_path: Path, server: ChatServer) -> tuple[Path, Path, dict[str, str]]:
    """A finished run with a student, then the recipe of a rerun whose requests are not cached
    (another seed) and answered slowly."""
    images = copy_flags(tmp_path / "images")
    student = chat(server.base_url, "served", k=2, max_concurrency=1, batch_size=1, seed=1)
    recipe = write_recipe(tmp_path, images, student=student)
    out = tmp_path / "out"
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    files = snapshot(out)
    student["seed"] = 2
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "student": student}))
    return recipe, out, files


def _start_and_wait(recipe: Path, out: Path, server: ChatServer) -> subprocess.Popen:
    before = server.chats
    proc = subprocess.Popen(
        [sys.executable, "-m", "groundforge.cli", "run", str(recipe), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while server.chats <= before + 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    return proc


def test_ctrl_c_during_a_rerun_keeps_the_previous_run(tmp_path):
    with ChatServer(models=["served"]) as server:
        recipe, out, files = _slow_rerun(tmp_path, server)
        server.delay = 0.5
        proc = _start_and_wait(recipe, out, server)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and f"{out} is as it was" in stderr
    assert "Traceback" not in stdout + stderr
    assert snapshot(out) == files


def test_a_killed_rerun_keeps_the_previous_run_and_the_next_resumes(tmp_path):
    with ChatServer(models=["served"]) as server:
        recipe, out, files = _slow_rerun(tmp_path, server)
        server.delay = 0.5
        proc = _start_and_wait(recipe, out, server)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        # Only the previous run is visible: the killed one never got past its staging folder.
        assert {k: v for k, v in snapshot(out).items() if not k.startswith(STAGING_DIR)} == files
        answered = server.chats
        server.delay = 0
        result = run_cli(str(recipe), "--out", str(out))
        assert result.exit_code == 0, result.output
        total = 2 * 3  # k answers for each of the three images
    manifest = json.loads((out / "manifest.json").read_text())
    # Replies that reached the cache before the kill are not asked again.
    assert manifest["models"]["student"]["cached"] > 0
    assert manifest["models"]["student"]["sent"] == total - manifest["models"]["student"]["cached"]
    assert server.chats - answered == manifest["models"]["student"]["sent"]
    assert manifest["recipe"]["student"]["seed"] == 2
    assert not (out / STAGING_DIR).exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"))
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    (out / "shards" / "keep.txt").write_text("mine")
    files = snapshot(out)
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 1
    assert str(out) in result.output and "--force" in result.output
    assert "README.md" in result.output and "Traceback" not in result.output
    assert snapshot(out) == files

    result = run_cli(str(recipe), "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    check_run(str(out))
    assert (out / "README.md").read_text() != "my notes"


def test_leftovers_of_an_unfinished_first_run_are_not_refused(tmp_path):
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"))
    out = tmp_path / "out"
    (out / "cache" / "ab").mkdir(parents=True)
    (out / "cache" / "ab" / "entry.json").write_text("{}")
    (out / STAGING_DIR / "shards").mkdir(parents=True)
    (out / STAGING_DIR / "shards" / "half.arrow").write_bytes(b"x")
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "cache" / "ab" / "entry.json").is_file()
    assert not (out / STAGING_DIR).exists()


def test_a_run_with_a_damaged_manifest_is_replaced_only_with_force(finished):
    recipe, out, files = finished
    with open(out / "manifest.json", "a") as fh:
        fh.write("}")
    files = snapshot(out)
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 1
    assert str(out / "manifest.json") in result.output and "--force" in result.output
    assert snapshot(out) == files
    assert run_cli(str(recipe), "--out", str(out), "--force").exit_code == 0
    check_run(str(out))
