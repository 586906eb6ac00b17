"""Commands that need an optional extra say which one, and still show their help."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from groundforge.cli import main

REAL_FIND_SPEC = importlib.util.find_spec


def without(monkeypatch, *names: str) -> None:
    def find_spec(name, *args, **kwargs):
        return None if name in names else REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_training_help_shows_without_trl_and_a_run_names_the_extra(monkeypatch, tmp_path, command):
    without(monkeypatch, "trl")
    shown = CliRunner().invoke(main, ["train", command, "--help"])
    assert shown.exit_code == 0 and "--model" in shown.output, shown.output
    args = ["train", command, "--data", str(tmp_path), "--model", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "training needs trl" in result.output
    assert "pip install 'groundforge[train]'" in result.output


def test_serve_teacher_names_the_serve_extra(monkeypatch, tmp_path):
    without(monkeypatch, "fastapi")
    result = CliRunner().invoke(main, ["serve-teacher", str(tmp_path)])
    assert result.exit_code == 1
    assert "serve-teacher needs fastapi" in result.output
    assert "pip install 'groundforge[serve]'" in result.output
