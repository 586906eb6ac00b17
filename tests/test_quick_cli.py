"""`groundforge run/demo --limit/--sample/--dry-run` on the bundled flags, end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import apache_beam as beam
import pytest
from click.testing import CliRunner
from test_lifecycle_preflight import ChatServer, chat, copy_flags, detector, write_recipe

from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.outputs.rejections import iter_rejections
from groundforge.outputs.shards import read_samples
from groundforge.recipe import load_recipe
from groundforge.sources.image_folder import ImageFolderSource

RECIPE = demo_recipe_path()
MULTI = ["--", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
PORTABLE = ["--", "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


def flag_files() -> list[str]:
    """The bundled recipe's source files, as relative paths (what the items' ids are)."""
    cfg = load_recipe(RECIPE).source
    source = ImageFolderSource(root=cfg.path, domain="flag", exclude=tuple(cfg.exclude))
    return [rel for part in source.partitions() for rel in part]


def smallest(rels: list[str], n: int) -> set[str]:
    return set(sorted(rels, key=lambda r: hashlib.sha256(r.encode()).digest())[:n])


def items_read(out: Path) -> set[str]:
    """Every source file a run read, as a relative path: from its samples' provenance and its
    rejections."""
    root = Path(load_recipe(RECIPE).source.path)
    seen = {loc for s in read_samples(str(out / "shards")) for loc in s.provenance.locations}
    seen |= {r.source_id for r in iter_rejections(str(out / "rejections.parquet"))}
    return {Path(loc).relative_to(root).as_posix() for loc in seen}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture
def no_pipeline(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a Beam pipeline was run")

    monkeypatch.setattr(beam.Pipeline, "run", refuse)


def test_limit_reads_the_same_five_images_every_run_and_on_every_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    expected = smallest(flag_files(), 5)
    for name, extra in (("a", []), ("b", []), ("multi", MULTI), ("portable", PORTABLE)):
        out = tmp_path / name
        result = invoke("run", str(RECIPE), "--out", str(out), "--limit", "5", *extra)
        assert result.exit_code == 0, result.output
        assert "limited run" in result.output and "--limit 5" in result.output
        assert items_read(out) == expected, name
        m = manifest(out)
        assert m["selection"] == {"limit": 5}
        assert m["stages"][0]["stage"] == "read" and m["stages"][0]["in"] == 5


def test_sample_reads_about_a_tenth_and_the_same_ones_twice(tmp_path):
    files = flag_files()
    seen = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = invoke("run", str(RECIPE), "--out", str(out), "--sample", "0.1")
        assert result.exit_code == 0, result.output
        assert manifest(out)["selection"] == {"sample": 0.1}
        seen.append(items_read(out))
    assert seen[0] == seen[1]
    assert 0.05 * len(files) < len(seen[0]) < 0.15 * len(files)
    assert manifest(tmp_path / "a")["stages"][0]["in"] == len(seen[0])


def test_demo_takes_a_limit(tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", str(out), "--limit", "20")
    assert result.exit_code == 0, result.output
    assert manifest(out)["selection"] == {"limit": 20}
    assert items_read(out) == smallest(flag_files(), 20)


def test_dry_run_lists_checks_and_names_the_stages_without_running(tmp_path, no_pipeline):
    out = tmp_path / "out"
    result = invoke("run", str(RECIPE), "--out", str(out), "--dry-run", "--limit", "5")
    assert result.exit_code == 0, result.output
    n = len(flag_files())
    assert f"{n} items in 2 partitions" in result.output
    assert "selected: 5 items" in result.output
    assert "stages: read -> image -> reference" in result.output
    assert not out.exists()
    sampled = invoke("demo", "--out", str(out), "--dry-run", "--sample", "0.1")
    assert sampled.exit_code == 0, sampled.output
    assert "selected: " in sampled.output and not out.exists()


def test_dry_run_catches_a_wrong_teacher_model_name(tmp_path, no_pipeline):
    out = tmp_path / "out"
    with ChatServer(models=["served-model"]) as server:
        recipe = write_recipe(
            tmp_path, copy_flags(tmp_path / "images"), teacher=chat(server.base_url, "typo")
        )
        result = invoke("run", str(recipe), "--out", str(out), "--dry-run")
        assert server.chats == 0
    assert result.exit_code == 1
    assert "teacher.model" in result.output and "'typo'" in result.output
    assert "served-model" in result.output
    # The listing and the stages are still shown, and nothing is written.
    assert "3 items in 1 partition" in result.output and "-> rationale ->" in result.output
    assert not out.exists()


def test_dry_run_catches_a_missing_detector_folder(tmp_path, no_pipeline):
    out = tmp_path / "out"
    model = tmp_path / "models" / "dino"
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"), boxes=detector(str(model)))
    result = invoke("run", str(recipe), "--out", str(out), "--dry-run")
    assert result.exit_code == 1
    assert "boxes.detector.model" in result.output and "does not exist" in result.output
    assert not out.exists()


def test_limit_and_sample_together_is_a_usage_error(tmp_path):
    result = invoke(
        "run", str(RECIPE), "--out", str(tmp_path / "o"), "--limit", "5", "--sample", "0.1"
    )
    assert result.exit_code == 2 and "either --limit or --sample" in result.output
    assert not (tmp_path / "o").exists()


def test_help_shows_the_options():
    text = invoke("run", "--help").output
    for option in ("--limit", "--sample", "--dry-run"):
        assert option in text
    assert "--limit" in invoke("demo", "--help").output
