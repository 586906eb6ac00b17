"""Settable knowledge levels: thresholds, the minimum number of answered questions per entity,
knowledge.json round trip, and how the KARL reward reads an entity left without a level."""

from __future__ import annotations

import io
import json

import apache_beam as beam
import pytest
from click.testing import CliRunner
from PIL import Image
from seededserver import SeededServer

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.cli import main
from groundforge.outputs.shards import WriteShards, finalize_shards
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec
from groundforge.schemas.records import Entity, KVGSample, Provenance, stable_id
from groundforge.trainer.data import knowledge_level, load_knowledge_levels
from groundforge.trainer.knowledge import (
    DEFAULT_MIN_QUESTIONS,
    EntityKnowledge,
    KnowledgeMap,
    ProbeItem,
    UnknownEntity,
    check_min_questions,
    check_thresholds,
    parse_thresholds,
    score_items,
)
from groundforge.trainer.rewards import DEFAULT_KNOWLEDGE_LEVEL, karl_iou

# -- thresholds and minimum questions -----------------------------------------------------------


def test_thresholds_parse_and_check():
    assert parse_thresholds("0.7,0.45,0.3,0.1") == (0.7, 0.45, 0.3, 0.1)
    assert parse_thresholds(" 1, 0.5 ,0.25,0.01") == (1.0, 0.5, 0.25, 0.01)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.7, 0.45, 0.45, 0.1], "strictly decreasing"),
        ([0.1, 0.3, 0.45, 0.7], "strictly decreasing"),
        ([0.7, 0.45, 0.3, 0.0], r"in \(0, 1\]"),
        ([1.2, 0.45, 0.3, 0.1], r"in \(0, 1\]"),
        ([0.7, 0.45, 0.3], "need 4 values"),
        ([0.7, 0.45, 0.3, 0.1, 0.05], "need 4 values"),
        (["high", 0.45, 0.3, 0.1], "numbers"),
    ],
)
def test_bad_thresholds_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        check_thresholds(values)


def test_min_questions_checks():
    assert DEFAULT_MIN_QUESTIONS > 1
    assert check_min_questions(5, per_entity=5) == 5
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="min_questions"):
            check_min_questions(bad)
    with pytest.raises(ValueError, match="more than per_entity"):
        check_min_questions(20, per_entity=10)


# -- scoring ------------------------------------------------------------------------------------


def item(entity: str, k: int) -> ProbeItem:
    return ProbeItem(
        item_id=f"{entity}-{k}",
        domain="flag",
        entity=entity,
        image_sha="0" * 64,
        box=(0.0, 0.0, 1.0, 1.0),
        options=(entity, "other"),
        answer=0,
        crop=b"",
    )


def scripted(plan: dict[str, list[object]]):
    """Questions and replies: per entity, ``True`` (right), ``False`` (wrong) or ``None``
    (a failed request)."""
    items, replies = [], []
    for entity, answers in plan.items():
        for k, right in enumerate(answers):
            it = item(entity, k)
            items.append(it)
            if right is None:
                replies.append(TeacherReply(it.item_id, error="timeout"))
            else:
                replies.append(TeacherReply(it.item_id, text="A" if right else "B"))
    return items, replies


PLAN = {
    "Chad": [True] * 6 + [False] * 4,  # 0.6 over 10
    "Mali": [True, True, None, None],  # 2 answered: too few
    "Niger": [False] * 5,  # 0.0 over 5
    "Togo": [None, None],  # nothing answered
}


def test_too_few_questions_leave_the_level_unset():
    items, replies = scripted(PLAN)
    default = score_items(items, replies)  # min_questions 10: only Chad has enough
    assert set(default.entities) == {"Chad"} and default.entities["Chad"].level == 1
    assert set(default.unknown) == {"Mali", "Niger"}
    assert default.unknown["Mali"] == UnknownEntity(1.0, 2, "too_few_questions")
    assert default.probe["unanswered"] == ["Togo"]

    five = score_items(items, replies, min_questions=5)
    assert {n: e.level for n, e in five.entities.items()} == {"Chad": 1, "Niger": 4}
    assert set(five.unknown) == {"Mali"}
    assert five.level("Mali") is None

    # other thresholds move Chad's 0.6 up a level
    strict = score_items(items, replies, thresholds=(0.5, 0.4, 0.3, 0.2), min_questions=5)
    assert strict.entities["Chad"].level == 0 and strict.thresholds == (0.5, 0.4, 0.3, 0.2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        score_items(items, replies, thresholds=(0.3, 0.4, 0.5, 0.6))


def test_summary_counts_the_entities_without_a_level():
    items, replies = scripted(PLAN)
    line = score_items(items, replies, min_questions=5).summary()
    assert line == (
        "2 entities with a level (level 1: 1, level 4: 1); 1 with too few questions "
        "(under 5 answered: no level); 1 unanswered (every request failed)"
    )


def test_knowledge_json_round_trip(tmp_path):
    items, replies = scripted(PLAN)
    knowledge = score_items(items, replies, thresholds=(0.8, 0.5, 0.25, 0.05), min_questions=4)
    path = knowledge.save(tmp_path / "knowledge.json")
    data = json.loads(path.read_text())
    assert data["thresholds"] == [0.8, 0.5, 0.25, 0.05]
    assert data["min_questions"] == 4
    assert data["unknown"] == {"Mali": {"accuracy": 1.0, "n": 2, "reason": "too_few_questions"}}
    assert set(data["entities"]) == {"Chad", "Niger"}
    assert KnowledgeMap.load(path) == knowledge

    # a map written before min_questions existed: every entity it lists has a level
    old = {"model": "m", "thresholds": [0.7, 0.45, 0.3, 0.1],
           "entities": {"Chad": {"accuracy": 1.0, "n": 1, "level": 0}}}  # fmt: skip
    loaded = KnowledgeMap.from_dict(old)
    assert loaded.min_questions == 1 and loaded.unknown == {} and loaded.level("Chad") == 0

    data["thresholds"] = [0.3, 0.45, 0.7, 0.1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"knowledge\.json.*strictly decreasing"):
        KnowledgeMap.load(path)


def test_the_karl_reward_treats_an_unlevelled_entity_as_unseen(tmp_path):
    knowledge = KnowledgeMap(
        "m",
        {"Chad": EntityKnowledge(1.0, 12, 0)},
        min_questions=10,
        unknown={"Mali": UnknownEntity(1.0, 3)},  # all right, but 3 answers only
    )
    levels = load_knowledge_levels(knowledge.save(tmp_path / "k.json"))
    assert knowledge_level(levels, "Chad") == 0
    assert knowledge_level(levels, "Mali") is None
    assert knowledge_level(levels, "Mali") == knowledge_level(levels, "never probed")

    reward = karl_iou(get_codec("pixel"))
    rows = {"gt_boxes": [[[0, 0, 100, 100]]] * 4, "width": [640] * 4, "height": [480] * 4}
    completions = ["<answer>[0, 0, 80, 100]</answer>"] * 4  # IoU 0.8
    row_levels = [knowledge_level(levels, e) for e in ("Chad", "Mali", "never probed")]
    got = reward(None, completions, **rows, knowledge_level=[*row_levels, DEFAULT_KNOWLEDGE_LEVEL])
    assert got[1] == got[2] == got[3]  # Mali scores as the middle level, like an unprobed one
    assert got[1] != got[0]  # and not as the level its 3 right answers would have given


# -- the command --------------------------------------------------------------------------------


def png(color) -> bytes:
    image = Image.new("RGB", (60, 40), (20, 20, 20))
    image.paste(color, (10, 5, 50, 35))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def one_entity_samples(entity: str, domain: str, images: int) -> list[KVGSample]:
    box = Box(10, 5, 50, 35)
    return [
        KVGSample(
            sample_id=stable_id("levels-test", entity, i),
            image=png((40 * i, 200, 100 if domain == "flag" else 250)),
            width=60,
            height=40,
            domain=domain,
            task="kvg",
            question=f"Find {entity}",
            target=entity,
            entities=(Entity(entity, box),),
            gt_boxes=(box,),
            split="sft",
            provenance=Provenance(),
        )
        for i in range(images)
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One entity per domain (no distractors, so no text model): Chad in 4 images, a sparrow
    in 2."""
    out = tmp_path_factory.mktemp("levels") / "shards"
    samples = one_entity_samples("Chad", "flag", 4) + one_entity_samples("sparrow", "bird", 2)
    with beam.Pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(out), "arrow", 2)
    finalize_shards(str(out), ["sft"], "arrow")
    return out


def test_probe_command_sets_and_records_the_levels(shards, tmp_path):
    out = tmp_path / "knowledge.json"
    with SeededServer(lambda body: "A") as server:
        result = CliRunner().invoke(
            main,
            ["knowledge", "probe", "--data", str(shards), "--endpoint", server.base_url,
             "--served-model", "m", "--out", str(out), "--min-questions", "3",
             "--thresholds", "0.9,0.6,0.3,0.1"],
        )  # fmt: skip
        asked = len(server.bodies)
    assert result.exit_code == 0, result.output
    assert asked == 6
    assert (
        "1 entity with a level (level 0: 1); 1 with too few questions (under 3 answered: no "
        f"level); written to {out}"
    ) in result.output
    data = json.loads(out.read_text())
    assert data["thresholds"] == [0.9, 0.6, 0.3, 0.1] and data["min_questions"] == 3
    assert data["entities"] == {"Chad": {"accuracy": 1.0, "n": 4, "level": 0}}
    assert data["unknown"] == {"sparrow": {"accuracy": 1.0, "n": 2, "reason": "too_few_questions"}}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--thresholds", "0.3,0.45,0.7,0.1"], "strictly decreasing"),
        (["--thresholds", "0.7,0.45"], "need 4 values"),
        (["--min-questions", "0"], "--min-questions"),
        (["--min-questions", "60"], "more than per_entity"),
    ],
)
def test_probe_command_refuses_bad_settings_before_asking(shards, tmp_path, option, message):
    with SeededServer(lambda body: "A") as server:
        result = CliRunner().invoke(
            main,
            ["knowledge", "probe", "--data", str(shards), "--endpoint", server.base_url,
             "--served-model", "m", "--out", str(tmp_path / "k.json"), *option],
        )  # fmt: skip
        asked = len(server.bodies)
    assert result.exit_code != 0
    assert message in result.output
    assert asked == 0 and not (tmp_path / "k.json").exists()
