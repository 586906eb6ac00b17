"""What a person sees when something is wrong: one error line naming the file or field (the
traceback only with -v), exit 130 on Ctrl-C, and report/inspect that refuse an incomplete run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_lifecycle_preflight import copy_flags, detector, run_cli, write_recipe

from groundforge.cli import error_text, main


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run, copied by each test that damages it."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    result = run_cli(str(write_recipe(tmp, copy_flags(tmp / "images"))), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def first_shard(run: Path) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    return run / next(s["path"] for s in manifest["shards"] if s["rows"])


def damage(run: Path, kind: str) -> Path:
    """Damage ``run`` one way; return the file the error must name."""
    if kind == "not a run":
        (run / "manifest.json").unlink()
        return run / "manifest.json"
    if kind == "broken manifest":
        with open(run / "manifest.json", "a") as fh:
            fh.write('{"samples": 0}\n')
        return run / "manifest.json"
    shard = first_shard(run)
    if kind == "deleted shard":
        shard.unlink()
    else:  # the same size, one byte changed: only the checksum can tell
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return shard


KINDS = ["not a run", "broken manifest", "deleted shard", "corrupted shard"]


@pytest.mark.parametrize("kind", KINDS)
def test_report_refuses_an_incomplete_run_naming_the_file(run_copy, kind):
    named = damage(run_copy, kind)
    report = run_copy / "report.html"
    report.unlink()
    result = CliRunner().invoke(main, ["report", str(run_copy)])
    assert result.exit_code == 1, result.output
    assert str(named) in result.output and "Traceback" not in result.output
    assert not report.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_refuses_an_incomplete_run_naming_the_file(run_copy, kind):
    named = damage(run_copy, kind)
    result = CliRunner().invoke(main, ["inspect", str(run_copy)])
    assert result.exit_code == 1, result.output
    assert str(named) in result.output
    if kind == "corrupted shard":
        assert "MISMATCH" in result.output  # in the shards table too
    assert "Traceback" not in result.output


def test_report_and_inspect_accept_a_complete_run(run_copy):
    assert CliRunner().invoke(main, ["report", str(run_copy)]).exit_code == 0
    assert CliRunner().invoke(main, ["inspect", str(run_copy)]).exit_code == 0


def test_an_empty_source_is_an_error_and_keeps_the_previous_run(run_copy, tmp_path):
    before = (run_copy / "manifest.json").read_text()
    (tmp_path / "empty").mkdir()
    result = run_cli(str(write_recipe(tmp_path, tmp_path / "empty")), "--out", str(run_copy))
    assert result.exit_code == 1
    assert "gave no items" in result.output and str(tmp_path / "empty") in result.output
    assert (run_copy / "manifest.json").read_text() == before


def test_a_run_that_keeps_nothing_says_so_and_fails(tmp_path):
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"), images={"min_side": 100000})
    result = run_cli(str(recipe), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "no sample was kept" in result.output
    # It is written all the same: its rejections say why.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == 0 and manifest["rejections"]["rows"] > 0


def test_an_error_inside_the_pipeline_has_no_traceback_unless_verbose(tmp_path, tiny_detector_dir):
    # The config loads (pre-flight passes) but the weights are missing: the detector step fails.
    model = tmp_path / "dino"
    model.mkdir()
    for path in tiny_detector_dir.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin")):
            shutil.copy(path, model / path.name)
    images = copy_flags(tmp_path / "images")
    recipe = write_recipe(tmp_path, images, boxes=detector(str(model)))
    command = [sys.executable, "-m", "groundforge.cli"]
    args = ["run", str(recipe), "--out", str(tmp_path / "out")]
    quiet = subprocess.run([*command, *args], capture_output=True, text=True)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr and quiet.stderr.startswith("Error: ")
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    loud = subprocess.run([*command, "-v", *args], capture_output=True, text=True)
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_ctrl_c_in_a_reading_command_exits_130(run_copy, monkeypatch):
    import groundforge.outputs.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    result = CliRunner().invoke(main, ["report", str(run_copy)])
    assert result.exit_code == 130 and "interrupted" in result.output


def test_error_text_keeps_the_innermost_message_of_a_worker_traceback():
    message = (
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "    load()\n"
        "OSError: Repo id must be in the form 'repo_name' [while running 'detect detector']\n"
    )
    text = error_text(RuntimeError(message))
    assert text == "OSError: Repo id must be in the form 'repo_name' (in step 'detect detector')"
    assert error_text(ValueError("plain")) == "plain"
