"""README.md runs as written: its shell and Python blocks, in order, in a copy of the project
after the set-up (`make demo`), with `groundforge` on PATH from this venv and the hub ids swapped
for tiny local models. A block that needs the network, a GPU, a cloud runner or a bucket says so
in the README, on the line before it: ``<!-- readme-test: skip (why) -->``. A block marked
``<!-- readme-test: server -->`` starts a server: it is run in the background, asked one chat
request, and stopped. New blocks are picked up as they are written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from groundforge.annotators.teacher.serve import free_port

pytestmark = [pytest.mark.readme, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

SHELL = {"bash", "sh", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3"}
MODES = {"run", "skip", "server"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->")
# What a user's checkout holds, less what is built or run in it.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"
)
# Seconds a block may take; the demo-sized ones take well under a minute.
BLOCK_TIMEOUT = 900


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    text: str
    mode: str
    reason: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced shell and Python blocks of ``text``, each with the marker on the last
    non-blank line before its fence (``run`` when there is none)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.group(1), fence.group(2).lower()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(before)
        mode, reason = (marker.group(1), marker.group(2) or "") if marker else ("run", "")
        if lang in SHELL | PYTHON:
            if lang == "console":
                body = _console_commands(body)
            blocks.append(Block(i + 1, lang, body, mode, reason))
        i = end + 1
    return blocks


def _console_commands(body: str) -> str:
    """The commands of a ``console`` block: its ``$ `` lines and their continuations."""
    commands, going_on = [], False
    for line in body.splitlines():
        if line.startswith("$ ") or going_on:
            commands.append(line[2:] if line.startswith("$ ") and not going_on else line)
            going_on = line.rstrip().endswith("\\")
    return "\n".join(commands)


BLOCKS = readme_blocks(README.read_text())


def substitutions(vlm: Path, detector: Path, port: int) -> list[tuple[str, str]]:
    """Hub ids (and the README's model placeholders) to tiny local models; the README's port
    to a free one. Regex, replacement; applied to every block."""
    from groundforge.annotators.embed import default_text_model

    text_model = default_text_model()
    table = [
        (r"\bQwen/Qwen[\w.-]*-VL-[\w.-]+", str(vlm)),
        (r"\bpath/to/qwen[\w.-]*", str(vlm)),
        (r"\bIDEA-Research/grounding-dino-[\w.-]+", str(detector)),
        (r"(--port[ =]|127\.0\.0\.1:|localhost:)8000\b", rf"\g<1>{port}"),
    ]
    if text_model is not None:
        table.append((r"\bsentence-transformers/all-MiniLM-L6-v2\b", str(text_model)))
    return table


def substitute(text: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        text = re.sub(pattern, replacement, text)
    return text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_run, tiny_vlm_dir, tiny_detector_dir):
    """A copy of the project as the set-up leaves it, and what a block runs with.

    `make demo` writes ``runs/demo`` with `groundforge demo`; the session's demo run is that
    same run (the bundled recipe through the same code), so it is copied instead of run twice.
    """
    folder = tmp_path_factory.mktemp("readme") / "groundforge"
    shutil.copytree(ROOT, folder, ignore=NOT_COPIED, symlinks=True)
    shutil.copytree(demo_run, folder / "runs" / "demo")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    port = free_port()
    return folder, env, substitutions(tiny_vlm_dir, tiny_detector_dir, port), port


def test_make_demo_is_the_demo_command():
    """What the workspace stands in for: `make demo` runs `groundforge demo` (default out
    runs/demo) from the venv."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("demo:")))
    assert lines[start + 1].strip() == "$(VENV)/bin/groundforge demo"
    from groundforge.cli import DEMO_OUT

    assert DEMO_OUT == "runs/demo"


def test_the_readme_has_blocks_and_known_markers():
    assert any(b.mode == "run" and b.lang in SHELL for b in BLOCKS)
    assert any(b.lang in PYTHON for b in BLOCKS)
    for block in BLOCKS:
        assert block.mode in MODES, f"README.md line {block.line}: unknown marker {block.mode!r}"
        assert block.mode != "skip" or block.reason, f"README.md line {block.line}: skip (why?)"


def test_markers_and_substitutions_are_read_as_written():
    text = (
        "<!-- readme-test: skip (needs Dataflow) -->\n```bash\ngroundforge run x\n```\n\n"
        "```python\nprint(1)\n```\n"
        "<!-- readme-test: server -->\n\n```console\n$ groundforge serve-teacher M \\\n"
        "    --port 8000\nloading M\n```\n"
        "```yaml\nname: x\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.mode, b.reason) for b in blocks] == [
        (2, "bash", "skip", "needs Dataflow"),
        (6, "python", "run", ""),
        (11, "console", "server", ""),
    ]
    assert blocks[2].text == "groundforge serve-teacher M \\\n    --port 8000"
    table = substitutions(Path("/m/vlm"), Path("/m/dino"), 4321)
    line = "train sft --model Qwen/Qwen2.5-VL-7B-Instruct; IDEA-Research/grounding-dino-tiny"
    assert substitute(line, table) == "train sft --model /m/vlm; /m/dino"
    assert substitute(blocks[2].text, table).endswith("--port 4321")


def _run(block: Block, workspace) -> None:
    folder, env, table, _ = workspace
    text = substitute(block.text, table)
    if block.lang in PYTHON:
        command = [sys.executable, "-c", text]
    else:
        command = ["bash", "-euo", "pipefail", "-c", text]
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )
    assert done.returncode == 0, (
        f"README.md line {block.line} ({block.lang}) exited {done.returncode}:\n{text}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )


def _serve(block: Block, workspace) -> None:
    """Start the block's server, ask it one chat request, stop it with Ctrl-C."""
    from openai import OpenAI

    folder, env, table, port = workspace
    text = substitute(block.text, table)
    command = [line for line in text.splitlines() if line.strip()]
    assert len(command) == 1, f"README.md line {block.line}: a server block holds one command"
    model = shlex.split(command[0], comments=True)[2]
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command[0]}"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"README.md line {block.line} exited:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, f"README.md line {block.line}: no server on {port}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Chad or Romania?"}], max_tokens=4
        )
        assert reply.choices and reply.usage.prompt_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, workspace):
    if block.mode == "skip":
        pytest.skip(f"README.md line {block.line}: {block.reason}")
    if block.mode == "server":
        _serve(block, workspace)
    else:
        _run(block, workspace)
