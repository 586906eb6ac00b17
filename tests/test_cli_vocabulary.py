"""One option vocabulary: `--out` for what a command writes, a positional RUN_DIR for the run
folder it reads, `-v` before or after any command; the older spellings still parse, hidden."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from groundforge.cli import main

# The older spellings, hidden from --help.
HIDDEN = ("--output", "--to", "--data", "--shards")


def leaf_commands(group: click.Group = main, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(leaf_commands())
WRITERS = {
    ("run",), ("demo",), ("report",), ("eval",), ("knowledge", "probe"), ("crawl",),
    ("train", "sft"), ("train", "grpo"), ("export", "llamafactory"), ("export", "verl"),
}  # fmt: skip
READERS = {
    ("report",): "RUN_DIR", ("inspect",): "RUN_DIR", ("train", "sft"): "RUN_DIR",
    ("train", "grpo"): "RUN_DIR", ("knowledge", "probe"): "RUN_DIR", ("eval",): "[RUN_DIR]",
    ("export", "llamafactory"): "RUN_DIR", ("export", "verl"): "RUN_DIR",
}  # fmt: skip


def help_of(command: tuple[str, ...]) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered():
    assert WRITERS | set(READERS) <= set(COMMANDS)
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_the_vocabulary_and_hides_the_old_names(command):
    shown = help_of(command)
    for old in HIDDEN:
        assert not re.search(rf"{old}\b", shown), f"{' '.join(command)} --help shows {old}"
    assert re.search(r"^\s*-v, --verbose\s", shown, re.M)
    if command in WRITERS:
        assert re.search(r"^\s*--out\b", shown, re.M), shown
    usage, text = shown.split("\n", 1)
    if command in READERS:
        assert READERS[command] in usage.split(), usage
    if command in READERS and command not in {("report",), ("inspect",)}:
        # These read only the shards: the help says that the shards/ folder will do.
        assert re.search(r"RUN_DIR[^.]*\bits shards/ folder", " ".join(text.split())), shown


@pytest.fixture
def calls(monkeypatch):
    """What reaches each command's function: the parsed values, recorded in place of the body."""
    seen: list[tuple[tuple[str, ...], dict]] = []
    for command in COMMANDS:
        target = main
        for name in command:
            target = target.commands[name]

        def record(*, _command=command, **params):
            seen.append((_command, params))

        monkeypatch.setattr(target, "callback", record)
    return seen


def parsed(calls, args: list[str]) -> dict:
    calls.clear()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert len(calls) == 1
    return calls[0][1]


@pytest.mark.parametrize(
    ("new", "old"),
    [
        (["train", "sft", "{d}", "--model", "m", "--out", "o"],
         ["train", "sft", "--data", "{d}", "--model", "m", "--output", "o"]),
        (["train", "grpo", "{d}", "--model", "m", "--out", "o"],
         ["train", "grpo", "--model", "m", "--output", "o", "--data", "{d}"]),
        (["eval", "{d}", "--split", "val", "--model", "m"],
         ["eval", "--shards", "{d}", "--split", "val", "--model", "m"]),
        (["knowledge", "probe", "{d}", "--model", "m", "--out", "k.json"],
         ["knowledge", "probe", "--data", "{d}", "--model", "m", "--out", "k.json"]),
        (["export", "verl", "{d}", "--out", "x"], ["export", "verl", "{d}", "--to", "x"]),
        (["export", "llamafactory", "{d}", "--out", "x", "--split", "val"],
         ["export", "llamafactory", "--to", "x", "{d}", "--split", "val"]),
    ],
)  # fmt: skip
def test_old_spellings_give_the_command_the_same_values(calls, tmp_path, new, old):
    fill = {"{d}": str(tmp_path)}
    new_values = parsed(calls, [fill.get(a, a) for a in new])
    old_values = parsed(calls, [fill.get(a, a) for a in old])
    assert new_values == old_values
    assert str(tmp_path) in new_values.values()


def test_run_dir_is_given_once(calls, tmp_path):
    both = CliRunner().invoke(
        main, ["train", "sft", str(tmp_path), "--data", str(tmp_path), "--model", "m"]
    )
    assert both.exit_code == 2 and "give RUN_DIR once" in both.output
    neither = CliRunner().invoke(main, ["knowledge", "probe", "--model", "m"])
    assert neither.exit_code == 2 and "Missing argument 'RUN_DIR'" in neither.output
    missing = CliRunner().invoke(main, ["export", "verl", str(tmp_path)])
    assert missing.exit_code == 2 and "Missing option '--out'" in missing.output
    assert "--to" not in missing.output
    assert not calls


def test_eval_takes_bench_or_run_dir(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--model", "m"])
    assert result.exit_code == 2 and "exactly one of --bench and RUN_DIR" in result.output


def test_crawl_verbose_before_or_after_logs_every_url_not_stored(tmp_path, caplog):
    from crawlservers import Route, serve
    from test_crawl import _manifest_crawl

    caplog.set_level(logging.NOTSET)
    logs = {}
    for where in ("quiet", "after", "before"):
        (tmp_path / where).mkdir()
        with serve() as server:
            entities = _manifest_crawl(tmp_path / where, server, 1, delay=0.0)
            server.routes["/gone.png"] = Route(status=410)
            with open(tmp_path / where / "urls.csv", "a", encoding="utf-8") as fh:
                fh.write(f"{server.url('/gone.png')},B757,,\n")
            args = ["crawl", str(entities), "--out", str(tmp_path / where / "out")]
            args = {"quiet": args, "after": [*args, "-v"], "before": ["-v", *args]}[where]
            caplog.clear()
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            # Each server has its own port.
            said = [r.getMessage().replace(server.url(""), "URL/") for r in caplog.records]
            logs[where] = [line for line in said if "gone.png" in line]
    assert logs["quiet"] == []
    assert logs["after"] and logs["after"] == logs["before"], logs
    assert "http_410" in logs["after"][0]


def test_verbose_after_the_command_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "groundforge.cli"]
    quiet = subprocess.run([*command, "inspect", str(tmp_path)], capture_output=True, text=True)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith("Error: ") and "manifest.json" in quiet.stderr
    for args in (["inspect", str(tmp_path), "-v"], ["-v", "inspect", str(tmp_path)]):
        loud = subprocess.run([*command, *args], capture_output=True, text=True)
        assert loud.returncode == 1 and "Traceback" in loud.stderr, loud.stderr
        assert "BrokenRun" in loud.stderr


def test_verbose_after_a_run_is_groundforges_not_beams(tmp_path):
    recipe = tmp_path / "r.yaml"
    images = tmp_path / "images"
    images.mkdir()
    recipe.write_text(f"name: r\ndomain: flag\nsource: {{kind: image_folder, path: {images}}}\n")
    result = CliRunner().invoke(
        main, ["run", str(recipe), "--out", str(tmp_path / "out"), "-v", "--dry-run"]
    )
    # Not refused as a Beam option: the dry run gets as far as the empty source.
    assert "groundforge's option" not in result.output
    assert "0 items" in result.output or "no item" in result.output, result.output
    assert logging.getLogger("apache_beam").level == logging.INFO
    after_dash = CliRunner().invoke(
        main, ["run", str(recipe), "--out", str(tmp_path / "out"), "--dry-run", "--", "-v"]
    )
    assert after_dash.exit_code == 1 and "-v is groundforge's option" in after_dash.output
