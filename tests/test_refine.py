"""`groundforge refine` on real flags: a scripted student that fails on known entities (a loopback
chat server whose reply is a function of the request), then the same loop against the tiny
Qwen2.5-VL behind `transformers serve` through the CLI."""

from __future__ import annotations

import base64
import doctest
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from faultproxy import FaultProxy
from seededserver import SeededServer

from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.outputs.manifest import check_run
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.schemas.records import sha256_hex
from groundforge.trainer import failures as failures_module
from groundforge.trainer.refine import RefineError, Student, refine

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = [
    "africa/chad.png",
    "europe/romania.png",
    "europe/andorra.png",
    "africa/mali.png",
    "africa/guinea.png",
    "europe/italy/italy.png",
    "europe/france/france.png",
    "europe/belgium/belgium.png",
]
FAILED = {"Chad", "Mali"}


@pytest.fixture(scope="module")
def round_one(tmp_path_factory) -> Path:
    """The first run (read only): eight real flags, every one held out."""
    tmp_path = tmp_path_factory.mktemp("round-one")
    images = tmp_path / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(FLAGS / name, images / Path(name).name)
    recipe = {
        "name": "refine",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(images)},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        # Three flags a scene, always the target's two nearest look-alikes.
        "scenes": {
            "cell_size": 96,
            "max_side": 640,
            "k_weights": {3: 1},
            "hard_fraction": 1.0,
        },
        # Every flag held out: the student is scored on all of them.
        "split": {"val_domains": ["flag"]},
    }
    out = tmp_path / "round-1"
    run_recipe(parse_recipe(recipe, tmp_path), str(out))
    return out


def norm1000(box, sample) -> str:
    x1, y1, x2, y2 = (
        round(v * 1000 / s)
        for v, s in zip(
            (box.x1, box.y1, box.x2, box.y2), (sample.width, sample.height) * 2, strict=True
        )
    )
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def asked_sample(body, samples):
    """The sample a request asks about: by its image and its question (two scenes can be the
    same picture: Mali's and Chad's with the same three flags in the same order)."""
    (turn,) = [m for m in body["messages"] if m["role"] == "user"]
    parts = {part["type"]: part for part in turn["content"]}
    image = base64.b64decode(parts["image_url"]["image_url"]["url"].split(",", 1)[1])
    key = (sha256_hex(image), parts["text"]["text"])
    return {(sha256_hex(s.image), s.question): s for s in samples}.get(key)


def scripted_student(samples):
    """Right on every entity but FAILED; for those it gives the box of the first (by name) other
    flag of the scene: it takes Chad for one of its look-alikes."""
    picked = {}

    def answer(body):
        sample = asked_sample(body, samples)
        if sample is None:
            return "(0,0),(1,1)"
        if sample.target not in FAILED:
            return norm1000(sample.gt_boxes[0], sample)
        other = min((e for e in sample.entities if e.name != sample.target), key=lambda e: e.name)
        picked[sample.target] = other.name
        return norm1000(other.box, sample)

    return answer, picked


def targets(run: Path) -> Counter:
    return Counter(s.target for s in read_samples(str(run / "shards")))


def test_round_two_adds_scenes_for_exactly_the_failed_entities_with_their_look_alikes(
    round_one, tmp_path
):
    run = round_one
    samples = list(read_samples(str(run / "shards"), "val"))
    assert FAILED <= {s.target for s in samples}
    answer, picked = scripted_student(samples)
    with SeededServer(answer) as server:
        student = Student(server.base_url, served_model="student", seed=3)
        body = refine(str(run), student, out=str(tmp_path / "a"))
        asked = len(server.bodies)
        again = refine(str(run), student, out=str(tmp_path / "b"))

    (record,) = body["rounds"]
    assert record["failed_entities"] == sorted(FAILED)
    entities = record["entities"]
    for name, row in entities.items():
        assert row["accuracy"] == (0.0 if name in FAILED else 1.0)
    for name in FAILED:
        assert entities[name]["confused_with"] == [picked[name]]

    round2 = Path(record["out"])
    assert round2 == tmp_path / "a" / "round-2"
    manifest = check_run(str(round2))  # a normal, complete run folder
    before, after = targets(run), targets(round2)
    grown = {name for name in after if after[name] != before[name]}
    assert grown == FAILED
    # Two scenes per failed item, one query each: what refine.json says it added.
    for name in FAILED:
        assert after[name] - before[name] == entities[name]["samples_added"] == 2
        assert manifest["recipe"]["scenes"]["focus"]["entities"][name] == 2

    # The distractors of the new scenes are the failed flag's nearest look-alikes: the flags of
    # its first-round scene (three flags, always the two nearest), the confused one among them.
    first = {s.target: s for s in samples}
    old_ids = {s.sample_id for s in read_samples(str(run / "shards"))}
    new = [s for s in read_samples(str(round2 / "shards")) if s.sample_id not in old_ids]
    assert {s.target for s in new} == FAILED
    for s in new:
        look_alikes = {e.name for e in first[s.target].entities} - {s.target}
        assert {e.name for e in s.entities} - {s.target} == look_alikes
        assert picked[s.target] in look_alikes and s.distractors == "hard"

    # What the evaluation cost: one request per item, the tokens the server counted.
    assert record["cost"]["eval"]["requests"] == len(samples) == asked
    assert record["cost"]["eval"]["prompt_tokens"] == len(samples)
    assert sum(row["requests"] for row in entities.values()) == len(samples)
    saved = json.loads((tmp_path / "a" / "refine.json").read_text())
    assert saved["rounds"][0]["entities"] == entities

    # The same seed gives the same round.
    ids = {s.sample_id for s in read_samples(str(round2 / "shards"))}
    assert ids == {s.sample_id for s in read_samples(str(tmp_path / "b" / "round-2" / "shards"))}
    assert again["rounds"][0]["focus"] == record["focus"]


def test_a_student_that_fails_nothing_adds_nothing_and_bad_inputs_are_named(round_one, tmp_path):
    run = round_one
    samples = list(read_samples(str(run / "shards"), "val"))

    def always_right(body):
        sample = asked_sample(body, samples)
        return norm1000(sample.gt_boxes[0], sample)

    with SeededServer(always_right) as server:
        body = refine(
            str(run), Student(server.base_url, "student"), out=str(tmp_path / "r"), rounds=3
        )
        with pytest.raises(RefineError, match="--served-model"):
            refine(str(run), Student(server.base_url), out=str(tmp_path / "x"))
        with pytest.raises(RefineError, match="'sft' split holds no grounding sample"):
            refine(
                str(run), Student(server.base_url, "student"), out=str(tmp_path / "x"), split="sft"
            )
    (record,) = body["rounds"]  # nothing failed: no second round
    assert record["out"] is None and record["failed_entities"] == []
    assert not (tmp_path / "r" / "round-2").exists()
    assert all(row["scenes_added"] == 0 for row in record["entities"].values())


def test_failed_requests_are_counted_not_scored_as_wrong(round_one, tmp_path):
    run = round_one
    samples = list(read_samples(str(run / "shards"), "val"))

    def always_right(body):
        sample = asked_sample(body, samples)
        return norm1000(sample.gt_boxes[0], sample)

    with SeededServer(always_right) as server:
        some = FaultProxy(server.base_url, rule=lambda n, body: "bad_request" if n <= 2 else None)
        with some as proxy:
            body = refine(str(run), Student(proxy.base_url, "student"), out=str(tmp_path / "r"))
        (record,) = body["rounds"]
        assert record["cost"]["eval"]["failed"] == {"bad_request": 2}
        # The student was right on every answer it gave: nothing to refine.
        assert record["failed_entities"] == [] and record["out"] is None
        with FaultProxy(server.base_url, rule=lambda n, body: "bad_request") as proxy:
            with pytest.raises(RefineError, match=r"answered none of \d+ requests \(bad_request"):
                refine(str(run), Student(proxy.base_url, "student"), out=str(tmp_path / "x"))
    assert not (tmp_path / "x" / "round-2").exists()


def test_two_rounds_through_the_cli_against_a_served_tiny_model(
    round_one, tmp_path, teacher_server
):
    base_url, model = teacher_server
    run = round_one
    out = tmp_path / "refined"
    result = CliRunner().invoke(
        main,
        [
            "refine",
            str(run),
            "--student",
            base_url,
            "--served-model",
            model,
            "--rounds",
            "2",
            "--extra-scenes",
            "3",
            "--max-tokens",
            "16",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    body = json.loads((out / "refine.json").read_text())
    one, two = body["rounds"]
    assert one["failed_entities"]  # a random tiny model finds no flag
    assert sum(r["scenes_added"] for r in one["entities"].values()) == 3
    assert sum(r["samples_added"] for r in one["entities"].values()) == 3
    # Round two scores the round-two folder (its new val scenes too) and adds to its focus.
    assert two["evaluated"] == str(out / "round-2")
    assert two["items"] == one["items"] + 3
    focus = check_run(str(out / "round-3"))["recipe"]["scenes"]["focus"]["entities"]
    assert sum(focus.values()) == 6
    # The real server counts the image tokens of every request.
    assert one["cost"]["eval"]["requests"] == one["items"]
    assert one["cost"]["eval"]["prompt_tokens"] > 10 * one["items"]
    assert "round 1:" in result.output and "round 2:" in result.output


def test_doctests():
    assert doctest.testmod(failures_module).failed == 0
