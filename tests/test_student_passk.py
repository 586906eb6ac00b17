"""The student's pass@k against an endpoint that honours the seed: k independent samples per
item (one seed each), items right 1..k-1 times in the grpo split, every sample cached on its own
(a rerun sends nothing, a larger k sends only the new samples)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image
from seededserver import SeededServer

from groundforge.annotators.foreground import foreground_box
from groundforge.examples import demo_recipe_path
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.pixels import image_bytes
from groundforge.recipe import parse_recipe
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = [
    "africa/chad.png",
    "europe/romania.png",
    "africa/mali.png",
    "africa/niger.png",
    "europe/italy/italy.png",
    "europe/hungary.png",
    "africa/nigeria.png",
    "europe/ireland.png",
]
CODEC = get_codec("pixel")
K = 4


def right(seed: int) -> bool:
    """Whether the server's sample under ``seed`` finds the flag (about half of them do)."""
    return seed % 2 == 0


def image_of(body: dict) -> bytes:
    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


def seeded_answer(body: dict) -> str:
    """The flag's box for a lucky seed, a box in the top-left corner otherwise."""
    image = Image.open(io.BytesIO(image_of(body))).convert("RGB")
    width, height = image.size
    if right(body["seed"]):
        box = foreground_box(image, background=(255, 255, 255))
    else:
        box = Box(0, 0, width / 4, height / 4)
    return f"<answer>{CODEC.render(box, width, height)}</answer>"


@pytest.fixture
def flags(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(FLAGS / name, folder / name.replace("/", "_"))
    return folder


@pytest.fixture
def server():
    with SeededServer(seeded_answer) as s:
        yield s


def student_recipe(flags: Path, base_url: str, k: int):
    student = {
        "model": "student",
        "base_url": base_url,
        "codec": "pixel",
        "k": k,
        "max_retries": 0,
        "max_concurrency": 4,
        "batch_size": 4,
    }
    recipe = {
        "name": "passk",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(flags), "entity_from": "stem"},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        "student": student,
    }
    return parse_recipe(recipe, flags.parent)


def by_item(bodies: list[dict]) -> dict[str, list[dict]]:
    """Request bodies grouped by the item they ask about (its image and question)."""
    items = defaultdict(list)
    for body in bodies:
        question = body["messages"][-1]["content"][-1]["text"]
        items[hashlib.sha256(image_of(body)).hexdigest() + question].append(body)
    return items


def without_seed(body: dict) -> str:
    return json.dumps({k: v for k, v in body.items() if k != "seed"}, sort_keys=True)


def shard_digests(out: Path) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["path"], s["sha256"]) for s in manifest["shards"]]


def test_k_seeded_samples_per_item_fill_the_grpo_split(flags, tmp_path, server):
    out = tmp_path / "out"
    result = run_recipe(student_recipe(flags, server.base_url, K), str(out))
    n = result.manifest["samples"]
    assert n == len(NAMES)

    # k requests per item, every body distinct; within an item only the seed differs.
    assert len(server.bodies) == K * n
    assert len(set(server.raw)) == K * n
    items = by_item(server.bodies)
    assert len(items) == n
    for bodies in items.values():
        assert len({b["seed"] for b in bodies}) == K
        assert len({without_seed(b) for b in bodies}) == 1
        assert {b["temperature"] for b in bodies} == {1.0}

    # Each sample's pass count is what the server answered for that item's seeds.
    samples = list(read_samples(str(out / "shards")))
    assert len(samples) == n
    counts = []
    for sample in samples:
        key = hashlib.sha256(image_bytes(sample)).hexdigest() + sample.question
        expected = sum(right(b["seed"]) for b in items[key])
        assert (sample.student_k, sample.student_correct) == (K, expected)
        assert sample.split == ("grpo" if 0 < expected < K else "sft")
        counts.append(expected)
    assert any(0 < c < K for c in counts), counts
    splits = result.manifest["splits"]
    assert splits["grpo"] == sum(0 < c < K for c in counts) > 0
    assert splits["sft"] == n - splits["grpo"]

    # A rerun is answered from the cache alone and writes the same shards.
    digests = shard_digests(out)
    server.reset()
    again = run_recipe(student_recipe(flags, server.base_url, K), str(out))
    assert server.bodies == []
    assert again.manifest["models"]["student"]["cached"] == K * n
    assert shard_digests(out) == digests

    # A larger k keeps the k samples it has and asks only for the new ones.
    server.reset()
    more = run_recipe(student_recipe(flags, server.base_url, K + 2), str(out))
    assert len(server.bodies) == 2 * n
    assert more.manifest["models"]["student"]["cached"] == K * n
    new_seeds = {key: {b["seed"] for b in bodies} for key, bodies in by_item(server.bodies).items()}
    for key, bodies in items.items():
        assert len(new_seeds[key]) == 2 and not new_seeds[key] & {b["seed"] for b in bodies}
    assert all(s.student_k == K + 2 for s in read_samples(str(out / "shards")))
