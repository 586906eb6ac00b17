"""The command line: fast help, clear errors, run/demo/inspect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import badinput
import yaml
from click.testing import CliRunner

from groundforge.cli import main

HEAVY = ("torch", "transformers", "apache_beam", "datasets", "pyarrow", "PIL", "openai", "faiss")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from groundforge.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "demo", "inspect"):
        assert command in result.output
    for command in ("run", "demo", "inspect"):
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0


def test_bad_recipe_names_the_field_without_a_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "domain": "flag",
                "source": {"kind": "image_folder", "path": "."},
                "boxes": {"method": "detector"},
            }
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "r.yaml" in result.output and "boxes" in result.output and "detector" in result.output
    assert "Traceback" not in result.output


def test_missing_source_folder_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"name": "x", "domain": "flag", "source": {"kind": "image_folder", "path": "nope"}}
        )
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert str(tmp_path / "nope") in result.output and "does not exist" in result.output


def test_run_then_inspect_and_detect_tampering(tmp_path):
    badinput.make_bad_corpus(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "cli",
                "domain": "flag",
                "source": {"kind": "image_folder", "path": "images"},
                "images": {"min_side": 8},
                "boxes": {"min_area_fraction": 0.0},
            }
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(recipe), "--out", str(out), "--", "--direct_num_workers=1"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runner"]["args"] == ["--direct_num_workers=1"]
    assert "stage funnel" in result.output and "rejections" in result.output

    result = CliRunner().invoke(main, ["inspect", str(out), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and manifest["recipe_hash"] in result.output

    shard = out / manifest["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes() + b"x")
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 1 and "MISMATCH" in result.output


def test_inspect_on_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "manifest.json" in result.output and "--out" in result.output


def test_demo_recipe_is_packaged_with_its_data():
    from groundforge.examples import demo_recipe_path

    root = demo_recipe_path().parent
    assert (root / "data" / "flags" / "COPYRIGHT").is_file()
    assert (root / "data" / "flags" / "metadata.jsonl").is_file()
    assert len(list((root / "data" / "flags").rglob("*.png"))) > 300
    assert Path(demo_recipe_path()).is_file()
