"""`groundforge run` keeps worker logs off the terminal on every local runner unless `-v`: a real
small run through the command, in a subprocess, with its stderr read whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from test_pipeline import folder_recipe

from groundforge.examples import demo_recipe_path

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = ["africa/chad.png", "europe/romania.png", "africa/mali.png"]
# What a worker says when it starts, reads its options or loads faiss.
WORKER_LINES = (
    "Pipeline_options",
    "sdk_worker",
    "Logging handler created",
    "faiss.loader",
    "apitools not found",
    "INFO:",
)
RUNNERS = {
    "in_memory": [],
    "multi_threading": ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "loopback": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker-logs")
    images = tmp / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(FLAGS / name, images / name.replace("/", "_"))
    recipe = folder_recipe(images, boxes={"foreground_background": "white"})
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(recipe_file, out, beam_args, verbose=False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "groundforge.cli"]
    command += ["-v"] * verbose + ["run", str(recipe_file), "--out", str(out), "--", *beam_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["samples"] == len(NAMES)
    return done


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_workers_are_quiet_without_verbose(recipe_file, tmp_path, runner):
    done = run_cli(recipe_file, tmp_path / "out", RUNNERS[runner])
    leaked = [line for line in done.stderr.splitlines() if any(w in line for w in WORKER_LINES)]
    assert leaked == [], "\n".join(leaked)
    assert "stage funnel" in done.stderr and "samples in" in done.stderr


def test_verbose_shows_the_worker_logs(recipe_file, tmp_path):
    done = run_cli(recipe_file, tmp_path / "out", RUNNERS["multi_processing"], verbose=True)
    assert "Logging handler created" in done.stderr
    assert "Pipeline_options" in done.stderr
