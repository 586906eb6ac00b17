"""The KARL knowledge probe: levels, letter parsing, crops, distractors, and the probe end to end
with a scripted backend (exact arithmetic) and with the tiny random Qwen2.5-VL (structure)."""

from __future__ import annotations

import io
import json
import math
import re

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.outputs.shards import WriteShards, finalize_shards
from groundforge.schemas.box import Box
from groundforge.schemas.records import Entity, KVGSample, Provenance, stable_id
from groundforge.trainer.knowledge import (
    THRESHOLDS,
    KnowledgeMap,
    build_items,
    crop_png,
    crop_rect,
    domain_distractors,
    level_for,
    parse_choice,
    probe,
    question_text,
    run_probe,
    select_crops,
)

# -- helpers ------------------------------------------------------------------------------------

COLORS = {
    "X": (255, 0, 0),
    "Y": (0, 255, 0),
    "Z": (0, 0, 255),
    "W": (255, 255, 0),
    "sparrow": (0, 255, 255),
    "robin": (255, 0, 255),
}
DOMAINS = {"X": "flag", "Y": "flag", "Z": "flag", "W": "flag", "sparrow": "bird", "robin": "bird"}
CELL = 40


def scene(names: list[str], shade: int, queries: list[int] | None = None) -> list[KVGSample]:
    """A strip of solid cells, one per entity (``shade`` varies the background so images
    differ), and one sample per query (all of them by default), all listing every entity."""
    width, height = CELL * len(names) + 20, CELL + 20
    image = Image.new("RGB", (width, height), (shade, shade, shade))
    entities = []
    for i, name in enumerate(names):
        box = Box(10 + i * CELL, 10, 10 + (i + 1) * CELL, 10 + CELL)
        image.paste(COLORS[name], tuple(int(v) for v in box.to_list()))
        entities.append(Entity(name, box))
    entities.append(Entity("", Box(0, 0, 5, 5)))  # an unnamed entity: skipped by the probe
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    samples = []
    for q in range(len(names)) if queries is None else queries:
        samples.append(
            KVGSample(
                sample_id=stable_id("knowledge-test", shade, names, q),
                image=data,
                width=width,
                height=height,
                domain=DOMAINS[names[0]],
                task="kvg",
                question=f"Find {names[q]}",
                target=names[q],
                entities=tuple(entities),
                gt_boxes=(entities[q].box,),
                split="sft" if shade % 2 else "val",
                provenance=Provenance(),
            )
        )
    return samples


def write_shards(samples, out, splits=("sft", "val")):
    with beam.Pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(out), "arrow", 3)
    finalize_shards(str(out), list(splits), "arrow")
    return out


class OneHotEmbedder:
    """Text vectors without a model: one fixed direction per name."""

    name = "one-hot"

    def __init__(self, names):
        self.names = sorted(names)

    def embed_texts(self, texts):
        return np.eye(len(self.names), dtype=np.float32)[[self.names.index(t) for t in texts]]


def options_of(prompt: str) -> dict[str, str]:
    """name -> letter, from a probe question."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^([A-D])\. (.+)$", prompt, re.M)}


def entity_in_crop(data: bytes) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    color = image.getpixel((image.width // 2, image.height // 2))
    return next(name for name, c in COLORS.items() if c == color)


class ScriptedBackend:
    """Answers from what the crop shows: right for X and sparrow (by option text), wrong for Y,
    right on every other question for Z, gibberish for W, an error reply for robin."""

    model = "scripted"

    def __init__(self):
        self.seen: list = []
        self.z_count = 0

    def answer(self, requests):
        replies = []
        for request in requests:
            self.seen.append(request)
            entity = entity_in_crop(request.images[0])
            letters = options_of(request.prompt)
            wrong = next(letter for name, letter in letters.items() if name != entity)
            if entity == "X":
                text = letters["X"]
            elif entity == "sparrow":
                text = "It is a sparrow."
            elif entity == "Y":
                text = f"{wrong}."
            elif entity == "Z":
                self.z_count += 1
                text = f"The answer is {letters['Z'] if self.z_count % 2 else wrong}"
            elif entity == "W":
                text = "I do not know"
            else:
                replies.append(TeacherReply(request.item_id, error="timeout"))
                continue
            replies.append(TeacherReply(request.item_id, text=text))
        return replies


@pytest.fixture(scope="module")
def scripted_shards(tmp_path_factory):
    samples = []
    # X in 5 images (capped at 3 by per_entity=3), Y, Z, W in 4; each scene image also yields one
    # sample per query, which must not multiply its crops.
    samples += scene(["X", "Y", "Z", "W"], shade=1)
    samples += scene(["Y", "X", "W", "Z"], shade=2)
    samples += scene(["Z", "W", "X", "Y"], shade=3)
    samples += scene(["W", "Z", "Y", "X"], shade=4)
    samples += scene(["X"], shade=5)
    samples += scene(["sparrow", "robin"], shade=6)
    samples += scene(["robin", "sparrow"], shade=7, queries=[0])
    return write_shards(samples, tmp_path_factory.mktemp("knowledge") / "shards")


# -- levels -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accuracy", "level"),
    [
        (1.0, 0),
        (0.7, 0),
        (math.nextafter(0.7, 0), 1),
        (math.nextafter(0.7, 1), 0),
        (0.45, 1),
        (math.nextafter(0.45, 0), 2),
        (0.3, 2),
        (math.nextafter(0.3, 0), 3),
        (0.1, 3),
        (math.nextafter(0.1, 0), 4),
        (0.0, 4),
        # accuracies as the probe computes them: k / n lands exactly on a boundary
        (7 / 10, 0),
        (35 / 50, 0),
        (34 / 50, 1),
        (9 / 20, 1),
        (22 / 50, 2),
        (3 / 10, 2),
        (15 / 50, 2),
        (14 / 50, 3),
        (1 / 10, 3),
        (5 / 50, 3),
        (4 / 50, 4),
    ],
)
def test_level_thresholds(accuracy, level):
    assert level_for(accuracy) == level


def test_level_rejects_what_is_not_an_accuracy():
    assert THRESHOLDS == (0.7, 0.45, 0.3, 0.1)
    for bad in (-0.01, 1.01, float("nan"), None):
        with pytest.raises(ValueError):
            level_for(bad)


# -- letters ------------------------------------------------------------------------------------

OPTS = ["Boeing 737", "Boeing 747", "Airbus A320", "Boeing 737 MAX"]


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("A", 0),
        ("B", 1),
        (" C\n", 2),
        ("D.", 3),
        ("(B)", 1),
        ("b", 1),
        ("**C**", 2),
        ("B. Boeing 747", 1),
        ("C) Airbus A320", 2),
        ("D: Boeing 737 MAX", 3),
        ("The answer is C.", 2),
        ("Answer: (D)", 3),
        ("answer: B", 1),
        ("I think it is B", 1),
        ("Boeing 747", 1),
        ("a boeing 747", 1),
        ("A Boeing 747, clearly", 1),  # a leading "A" before a word is an article
        ("It is the Boeing 737 MAX", 3),  # the longest option at one place
        ("Boeing 737 or Airbus A320?", 0),  # the earliest option
        ("E", None),
        ("", None),
        ("I do not know", None),
        (None, None),
    ],
)
def test_parse_choice(text, choice):
    assert parse_choice(text, OPTS) == choice


def test_parse_choice_counts_only_the_letters_of_the_options():
    assert parse_choice("C", ["a", "b"]) is None
    assert parse_choice("B", ["a", "b"]) == 1
    assert parse_choice("A", ["only"]) == 0


def test_question_text():
    assert question_text("aircraft", ["Boeing 747", "Airbus A320", "Cessna 172", "ATR 72"]) == (
        "Which aircraft is shown in the image?\n"
        "A. Boeing 747\nB. Airbus A320\nC. Cessna 172\nD. ATR 72\n"
        "Answer with the letter."
    )
    with pytest.raises(ValueError):
        question_text("aircraft", ["a", "b", "c", "d", "e"])


# -- crops --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "size", "kwargs", "rect"),
    [
        (Box(10, 20, 50, 60), (100, 100), {}, (8, 18, 52, 62)),
        (Box(10, 20, 50, 60), (100, 100), {"pad": 0}, (10, 20, 50, 60)),
        (Box(10.4, 20.6, 50.2, 60.1), (100, 100), {"pad": 0}, (10, 20, 51, 61)),
        (Box(0, 0, 100, 80), (100, 80), {}, (0, 0, 100, 80)),  # padding clipped to the image
        (Box(95, 75, 120, 90), (100, 80), {"pad": 0}, (95, 75, 100, 80)),  # box clipped first
        (Box(50, 50, 51, 51), (100, 100), {}, (48, 48, 52, 52)),  # grown to min_side around it
        (Box(0, 0, 1, 1), (100, 100), {}, (0, 0, 4, 4)),  # grown inwards at the border
        (Box(98, 98, 100, 100), (100, 100), {}, (96, 96, 100, 100)),
        (Box(1, 1, 2, 2), (3, 3), {}, (0, 0, 3, 3)),  # image smaller than min_side
        (Box(10, 10, 20, 20), (100, 100), {"pad": 0.5, "min_side": 1}, (5, 5, 25, 25)),
    ],
)
def test_crop_rect(box, size, kwargs, rect):
    assert crop_rect(box, *size, **kwargs) == rect


def test_crop_png_takes_the_box_and_upscales_tiny_crops():
    image = Image.new("RGB", (100, 60), (0, 0, 0))
    image.paste((255, 0, 0), (20, 10, 60, 50))
    big = Image.open(io.BytesIO(crop_png(image, Box(20, 10, 60, 50), pad=0)))
    assert big.size == (40, 40)
    assert set(big.getdata()) == {(255, 0, 0)}
    padded = Image.open(io.BytesIO(crop_png(image, Box(20, 10, 60, 50))))
    assert padded.size == (44, 44)
    tiny = Image.open(io.BytesIO(crop_png(image, Box(20, 10, 30, 15), pad=0)))
    assert tiny.size == (56, 28)  # 10 x 5 upscaled so the shorter side is 28


def test_select_crops_dedups_caps_and_ignores_order(scripted_shards):
    from groundforge.outputs.shards import read_samples

    samples = list(read_samples(str(scripted_shards)))
    chosen = select_crops(samples, per_entity=3, seed=0)
    assert sorted(chosen) == [
        ("bird", "robin"),
        ("bird", "sparrow"),
        ("flag", "W"),
        ("flag", "X"),
        ("flag", "Y"),
        ("flag", "Z"),
    ]
    assert {k: len(v) for k, v in chosen.items()} == {
        ("bird", "robin"): 2,
        ("bird", "sparrow"): 2,
        ("flag", "W"): 3,
        ("flag", "X"): 3,
        ("flag", "Y"): 3,
        ("flag", "Z"): 3,
    }
    all_x = select_crops(samples, per_entity=50, seed=0)[("flag", "X")]
    assert len(all_x) == 5  # 5 images, however many samples share them
    assert select_crops(samples[::-1], per_entity=3, seed=0) == chosen
    assert chosen[("flag", "X")] == all_x[:3]  # a smaller cap keeps a prefix
    other_seed = select_crops(samples, per_entity=3, seed=1)[("flag", "X")]
    assert set(other_seed) <= set(all_x)


# -- distractors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from groundforge.annotators.embed import TextEmbedder

    embedder = TextEmbedder()
    embedder.load()
    return embedder


AIRCRAFT = ["Boeing 737", "Boeing 747", "Boeing 757", "Airbus A320", "Airbus A380", "Cessna 172"]
DOGS = ["golden retriever", "Labrador retriever", "German shepherd", "beagle", "pug"]


def test_distractors_are_the_most_similar_names_of_the_domain(minilm):
    for names in (AIRCRAFT, DOGS):
        picked = domain_distractors(names, minilm)
        vectors = minilm.embed_texts(names)
        sims = vectors @ vectors.T
        for i, name in enumerate(names):
            ranked = [names[j] for j in np.argsort(-sims[i], kind="stable") if j != i]
            assert picked[name] == ranked[:3]
    aircraft = domain_distractors(AIRCRAFT, minilm)
    assert "Boeing 747" in aircraft["Boeing 737"]
    assert "Airbus A320" in aircraft["Airbus A380"]
    assert domain_distractors(["Boeing 737", "Boeing 747"], minilm) == {
        "Boeing 737": ["Boeing 747"],
        "Boeing 747": ["Boeing 737"],
    }
    assert domain_distractors(["alone"], minilm) == {"alone": []}


def test_probe_questions_stay_in_the_domain(tmp_path, minilm):
    """Every question of a probe over aircraft and dog scenes offers the target and its three
    nearest names of its own domain, shuffled."""
    samples = []
    for d, names in (("aircraft", AIRCRAFT), ("dog", DOGS)):
        for k, name in enumerate(names):
            image = Image.new("RGB", (40, 40), (k * 30, 10, 10))
            buf = io.BytesIO()
            image.save(buf, "PNG")
            box = Box(5, 5, 35, 35)
            samples.append(
                KVGSample(
                    sample_id=stable_id("domain-test", name),
                    image=buf.getvalue(),
                    width=40,
                    height=40,
                    domain=d,
                    task="kvg",
                    question=f"Find {name}",
                    target=name,
                    entities=(Entity(name, box),),
                    gt_boxes=(box,),
                    split="sft",
                    provenance=Provenance(),
                )
            )
    shards = write_shards(samples, tmp_path / "shards", splits=("sft",))
    items = build_items(shards, per_entity=5, seed=0, text_embedder=minilm)
    assert len(items) == len(AIRCRAFT) + len(DOGS)
    expected = {**domain_distractors(AIRCRAFT, minilm), **domain_distractors(DOGS, minilm)}
    first_positions = set()
    for item in items:
        pool = AIRCRAFT if item.domain == "aircraft" else DOGS
        assert set(item.options) <= set(pool)
        assert set(item.options) == {item.entity, *expected[item.entity]}
        assert item.options[item.answer] == item.entity
        assert options_of(item.prompt) == {n: "ABCD"[i] for i, n in enumerate(item.options)}
        assert item.prompt.startswith(f"Which {item.domain} is shown in the image?\n")
        first_positions.add(item.answer)
    assert len(first_positions) > 1  # shuffled, not always A
    again = build_items(shards, per_entity=5, seed=0, text_embedder=minilm)
    assert [(i.item_id, i.options) for i in again] == [(i.item_id, i.options) for i in items]


# -- the probe end to end -----------------------------------------------------------------------


def test_probe_with_a_scripted_backend(scripted_shards, tmp_path):
    backend = ScriptedBackend()
    calls = []
    knowledge = probe(
        scripted_shards,
        backend,
        per_entity=3,
        seed=0,
        text_embedder=OneHotEmbedder(COLORS),
        progress=lambda done, total: calls.append((done, total)),
        batch_size=4,
        min_questions=3,
    )
    got = {name: (e.accuracy, e.n, e.level) for name, e in knowledge.entities.items()}
    # Z: right on questions 1 and 3 of 3 -> 2/3 = 0.667 -> level 1.
    assert got == {
        "X": (1.0, 3, 0),
        "Y": (0.0, 3, 4),
        "Z": (2 / 3, 3, 1),
        "W": (0.0, 3, 4),
    }  # robin: every request failed, so no accuracy
    # sparrow: 2 crops, both answered right, but under min_questions: no level
    assert {n: (e.accuracy, e.n, e.reason) for n, e in knowledge.unknown.items()} == {
        "sparrow": (1.0, 2, "too_few_questions")
    }
    assert knowledge.min_questions == 3
    assert knowledge.model == "scripted"
    assert knowledge.probe["requests"] == 16
    assert knowledge.probe["failed"] == 2
    assert knowledge.probe["unanswered"] == ["robin"]
    assert calls[0] == (0, 16) and calls[-1] == (16, 16) and len(calls) == 5
    for request in backend.seen:
        entity = entity_in_crop(request.images[0])
        names = set(options_of(request.prompt))
        if DOMAINS[entity] == "flag":
            assert names == {"X", "Y", "Z", "W"}
            assert request.prompt.startswith("Which flag is shown in the image?")
        else:
            assert names == {"sparrow", "robin"}  # a 2-entity domain: 2 choices
            assert "C." not in request.prompt

    path = knowledge.save(tmp_path / "k" / "knowledge.json")
    data = json.loads(path.read_text())
    assert data["model"] == "scripted"
    assert data["thresholds"] == [0.7, 0.45, 0.3, 0.1]
    assert data["min_questions"] == 3
    assert data["unknown"] == {"sparrow": {"accuracy": 1.0, "n": 2, "reason": "too_few_questions"}}
    assert data["entities"]["X"] == {"accuracy": 1.0, "n": 3, "level": 0}
    assert list(data["entities"]) == sorted(data["entities"])
    loaded = KnowledgeMap.load(path)
    assert loaded == knowledge
    assert loaded.level("Z") == 1 and loaded.level("robin") is None
    assert loaded.level("sparrow") is None
    assert loaded.level("never seen", default=2) == 2
    assert loaded.levels() == {"W": 4, "X": 0, "Y": 4, "Z": 1}
    # What the trainer's KARL reward reads: entities.<name>.level, an int.
    assert {n: e["level"] for n, e in data["entities"].items()} == loaded.levels()


def test_probe_is_deterministic(scripted_shards):
    def run(seed):
        backend = ScriptedBackend()
        probe(
            scripted_shards,
            backend,
            per_entity=3,
            seed=seed,
            text_embedder=OneHotEmbedder(COLORS),
            min_questions=1,
        )
        return [(r.item_id, r.prompt, r.images) for r in backend.seen]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_knowledge_map_load_names_a_bad_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"entities": {"X": {"accuracy": 1.0}}}')
    with pytest.raises(ValueError, match="bad.json"):
        KnowledgeMap.load(path)


def test_run_probe_needs_a_model():
    with pytest.raises(ValueError, match="model"):
        run_probe("nowhere")
    with pytest.raises(ValueError, match="served_model"):
        run_probe("nowhere", endpoint="http://127.0.0.1:1/v1")


def test_probe_with_the_tiny_vlm(scripted_shards, tiny_vlm_dir, tmp_path):
    """The real in-process backend (random weights): the map's structure, not its values."""
    out = tmp_path / "knowledge.json"
    knowledge = run_probe(
        scripted_shards,
        model=str(tiny_vlm_dir),
        out=out,
        per_entity=2,
        max_tokens=4,
        batch_size=4,
        min_questions=2,
    )
    assert sorted(knowledge.entities) == sorted(COLORS)
    for entity in knowledge.entities.values():
        assert entity.n == 2  # every request answered (random text still parses or is wrong)
        assert 0.0 <= entity.accuracy <= 1.0
        assert entity.level == level_for(entity.accuracy)
        assert entity.level in range(5)
    assert knowledge.model == str(tiny_vlm_dir)
    assert knowledge.probe["failed"] == 0 and knowledge.probe["unanswered"] == []
    assert KnowledgeMap.load(out) == knowledge
