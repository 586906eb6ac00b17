"""Prompt templates (built-in and overridden), rationale and grounding prompts, knowledge."""

from __future__ import annotations

import doctest
import hashlib
import json
from dataclasses import replace
from importlib import resources

import jinja2
import pytest

import groundforge.annotators.teacher.knowledge as knowledge_module
import groundforge.annotators.teacher.prompts as prompts_module
from groundforge.annotators.teacher.knowledge import (
    Knowledge,
    KnowledgeEntry,
    KnowledgeError,
    load_knowledge,
)
from groundforge.annotators.teacher.prompts import (
    BUILTIN_TEMPLATES,
    CODEC_HINTS,
    PromptTemplate,
    PromptTemplateError,
    codec_hint,
    grounding_prompt,
    load_template,
    rationale_prompt,
)
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import CODECS, get_codec
from groundforge.schemas.records import Entity, KVGSample, Provenance

CODEC_PARAMS = [
    ("pixel", {}),
    ("norm1000", {}),
    ("norm1000", {"tokens": False}),
    ("qwen25vl", {"max_pixels": 256 * 28 * 28}),
    ("qwen3vl", {}),
    ("norm01", {}),
]
CODEC_IDS = ["pixel", "norm1000", "norm1000_plain", "qwen25vl", "qwen3vl", "norm01"]

SAMPLE = KVGSample(
    sample_id="s1",
    image=b"",
    width=640,
    height=480,
    domain="aircraft",
    task="kvg",
    question="Find and give the bounding box of <|object_ref_start|>Boeing 757<|object_ref_end|>",
    target="Boeing 757",
    entities=(
        Entity("Airbus A321", Box(20.5, 30, 300, 200)),
        Entity("", Box(330, 40, 620, 210)),
        Entity("Boeing 757", Box(40, 250, 330, 460)),
        Entity("  ", Box(350, 260, 630, 470)),
    ),
    gt_boxes=(Box(40, 250, 330, 460),),
    split="sft",
    provenance=Provenance(),
)
KNOWLEDGE = Knowledge(
    {
        "boeing 757": KnowledgeEntry(
            "A narrow-body twin-engine airliner.", ("long slender fuselage", "tall nose gear")
        ),
        "Airbus A321": KnowledgeEntry("The stretched member of the A320 family."),
        "Airbus A380": KnowledgeEntry("A double-deck four-engine airliner."),
    }
)


@pytest.fixture(params=CODEC_PARAMS, ids=CODEC_IDS)
def codec(request):
    name, params = request.param
    return get_codec(name, **params)


def render(codec, box):
    return codec.render(box, SAMPLE.width, SAMPLE.height)


def test_doctests():
    for module in (prompts_module, knowledge_module):
        assert doctest.testmod(module).failed == 0, module.__name__


# --- templates ---------------------------------------------------------------------------------


def test_builtin_templates_load_with_a_stable_hash():
    for name in BUILTIN_TEMPLATES:
        first, again = load_template(name), load_template(name)
        source = resources.files("groundforge.annotators.teacher") / "prompts" / f"{name}.j2"
        assert first.name == name
        assert first.source == source.read_text(encoding="utf-8")
        assert first.hash == again.hash == hashlib.sha256(first.source.encode()).hexdigest()
    assert load_template("kvg_rationale").hash != load_template("grounding").hash


def test_a_template_file_overrides_and_its_hash_follows_its_source(tmp_path):
    path = tmp_path / "mine.j2"
    path.write_text("Where is {{ entity }}? {{ codec_hint }}", encoding="utf-8")
    t = load_template(path)
    assert t.name == str(path) and load_template(str(path)).hash == t.hash
    assert grounding_prompt("Chad", "flag", get_codec("pixel"), t) == (
        "Where is Chad? " + codec_hint(get_codec("pixel"))
    )
    path.write_text("Box of {{ entity }}, please.", encoding="utf-8")
    changed = load_template(path)
    assert changed.hash != t.hash
    assert changed.hash == hashlib.sha256(b"Box of {{ entity }}, please.").hexdigest()


def test_a_builtin_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "grounding").write_text("not this", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_template("grounding").source != "not this"


def test_unknown_templates_and_syntax_errors_are_named(tmp_path):
    with pytest.raises(PromptTemplateError, match="'nope' is neither a built-in"):
        load_template("nope")
    bad = tmp_path / "bad.j2"
    bad.write_text("line one\n{% if x %}unclosed", encoding="utf-8")
    with pytest.raises(PromptTemplateError, match=r"bad\.j2, line 2"):
        load_template(bad)


def test_undefined_variables_raise():
    with pytest.raises(jinja2.UndefinedError, match="nope"):
        PromptTemplate("t", "Hello {{ nope }}").render()
    with pytest.raises(jinja2.UndefinedError):
        PromptTemplate("t", "{{ target.missing }}").render(target={"name": "x"})
    broken = PromptTemplate("t", "{{ entity }} in {{ domian }}")
    with pytest.raises(jinja2.UndefinedError, match="domian"):
        grounding_prompt("Chad", "flag", get_codec("pixel"), broken)


def test_no_autoescape_and_trimmed_blocks():
    t = PromptTemplate("t", "{% for x in xs %}\n{{ x }}\n{% endfor %}\n")
    assert t.render(xs=["<a & b>", '"c"']) == '<a & b>\n"c"\n'


# --- the rationale prompt ----------------------------------------------------------------------


def test_rationale_prompt_lists_every_entity_and_box(codec):
    text = rationale_prompt(SAMPLE, codec, load_template("kvg_rationale"))
    names = ["Airbus A321", "unknown object 1", "Boeing 757", "unknown object 2"]
    lines = [
        f"{i}. {name}: {render(codec, e.box)}"
        for i, (name, e) in enumerate(zip(names, SAMPLE.entities, strict=True), start=1)
    ]
    for line in lines:
        assert line in text
    # in the sample's order, one line each
    assert [text.index(line) for line in lines] == sorted(text.index(line) for line in lines)
    assert text.count("unknown object") == 2
    assert "unknown object 3" not in text
    assert text.count("compare it by appearance only") == 2
    target_box = render(codec, SAMPLE.gt_boxes[0])
    assert f"The target is Boeing 757, at {target_box}." in text
    assert f"<think>your reasoning</think><answer>{target_box}</answer>" in text
    assert codec_hint(codec, SAMPLE.width, SAMPLE.height) in text
    assert "Background knowledge" not in text


def test_rationale_prompt_asks_for_the_three_steps_and_no_leaks():
    text = rationale_prompt(SAMPLE, get_codec("norm1000"), load_template("kvg_rationale"))
    for words in ("visual features of each object", "Compare the look-alike", "Conclude"):
        assert words in text
    assert "Never say or hint that you were told" in text
    assert "aircraft" in text


def test_rationale_prompt_boxes_render_exactly_as_the_codec_does():
    codec = get_codec("norm1000")
    text = rationale_prompt(SAMPLE, codec, load_template("kvg_rationale"))
    # 20.5 / 640 * 1000 = 32.03 -> 32; 30 / 480 * 1000 = 62.5 -> 62 (round half to even)
    assert "1. Airbus A321: <|box_start|>(32,62),(469,417)<|box_end|>\n" in text
    assert "<answer><|box_start|>(62,521),(516,958)<|box_end|></answer>" in text


def test_rationale_prompt_with_knowledge(codec):
    text = rationale_prompt(SAMPLE, codec, load_template("kvg_rationale"), KNOWLEDGE)
    assert "Background knowledge:" in text
    assert (
        "- Boeing 757: A narrow-body twin-engine airliner. "
        "Distinctive features: long slender fuselage; tall nose gear.\n"
    ) in text
    assert "- Airbus A321: The stretched member of the A320 family.\n" in text
    # only entities in the scene, and unknown objects get none
    assert "A380" not in text


def test_rationale_prompt_accepts_a_plain_mapping_and_skips_empty_entries():
    kb = {"Airbus A321": KnowledgeEntry("Stretched A320."), "Boeing 757": KnowledgeEntry()}
    text = rationale_prompt(SAMPLE, get_codec("pixel"), load_template("kvg_rationale"), kb)
    assert "- Airbus A321: Stretched A320." in text
    assert "- Boeing 757:" not in text
    text = rationale_prompt(SAMPLE, get_codec("pixel"), load_template("kvg_rationale"), {})
    assert "Background knowledge" not in text


def test_rationale_prompt_of_one_entity():
    box = Box(10, 10, 100, 100)
    single = replace(SAMPLE, entities=(Entity("Boeing 757", box),), gt_boxes=(box,))
    text = rationale_prompt(single, get_codec("pixel"), load_template("kvg_rationale"))
    assert text.startswith("The image shows 1 aircraft object that look alike.")


def test_rationale_prompt_needs_a_named_target_and_its_box():
    t, codec = load_template("kvg_rationale"), get_codec("pixel")
    with pytest.raises(ValueError, match="named target"):
        rationale_prompt(replace(SAMPLE, target=" "), codec, t)
    with pytest.raises(ValueError, match="target's box"):
        rationale_prompt(replace(SAMPLE, gt_boxes=()), codec, t)


def test_template_variables_for_an_override():
    source = (
        "{{ domain }}|{{ question }}|{{ width }}x{{ height }}|{{ codec_name }}|"
        "{% for e in entities %}{{ e.index }}:{{ e.name }}:{{ e.known }}:{{ e.box }};{% endfor %}|"
        "{{ target.name }}@{{ target.box }}|"
        "{% for k in knowledge %}{{ k.name }}={{ k.description }}/{{ k.attributes | join(',') }}"
        "{% endfor %}"
    )
    text = rationale_prompt(SAMPLE, get_codec("pixel"), PromptTemplate("t", source), KNOWLEDGE)
    assert text == (
        f"aircraft|{SAMPLE.question}|640x480|pixel|"
        "1:Airbus A321:True:[20, 30, 300, 200];2:unknown object 1:False:[330, 40, 620, 210];"
        "3:Boeing 757:True:[40, 250, 330, 460];4:unknown object 2:False:[350, 260, 630, 470];|"
        "Boeing 757@[40, 250, 330, 460]|"
        "Airbus A321=The stretched member of the A320 family./"
        "Boeing 757=A narrow-body twin-engine airliner./long slender fuselage,tall nose gear"
    )


# --- the grounding prompt and codec hints ------------------------------------------------------


def test_grounding_prompt_per_codec(codec):
    text = grounding_prompt(" Boeing 757 ", "aircraft", codec, load_template("grounding"))
    if codec.name == "norm1000":
        assert text == (
            "Find and give the bounding box of <|object_ref_start|>Boeing 757<|object_ref_end|>"
        )
    else:
        assert text == (
            f"Locate the Boeing 757 (aircraft) in the image and give its bounding box as "
            f"{codec_hint(codec)}. Reply with the box only."
        )


def test_codec_hints():
    assert set(CODECS) <= set(CODEC_HINTS)
    assert "bbox_2d" in codec_hint(get_codec("qwen25vl"))
    assert "absolute pixel" in codec_hint(get_codec("qwen25vl"))
    assert "0 to 1000" in codec_hint(get_codec("qwen3vl"))
    assert "<|box_start|>" in codec_hint(get_codec("norm1000"))
    assert "<|box_start|>" not in codec_hint(get_codec("norm1000", tokens=False))
    # pixel frames state their size: qwen25vl's is the processor's resized image
    assert codec_hint(get_codec("pixel"), 640, 480).endswith("in an image of 640 x 480 pixels")
    assert codec_hint(get_codec("qwen25vl", max_pixels=256 * 28 * 28), 640, 480).endswith(
        "in an image of 504 x 364 pixels"
    )
    assert "pixels" not in codec_hint(get_codec("qwen3vl"), 640, 480)
    text = grounding_prompt("Chad", "flag", get_codec("pixel"), load_template("grounding"), 64, 48)
    assert "in an image of 64 x 48 pixels" in text


# --- knowledge files ---------------------------------------------------------------------------


def test_knowledge_from_yaml_with_shorthand(tmp_path):
    path = tmp_path / "kb.yaml"
    path.write_text(
        "Boeing 757:\n"
        "  description: A narrow-body airliner.\n"
        "  attributes: [long fuselage, 2, ' tall gear ']\n"
        "Airbus A321: The stretched A320.\n"
        "ATR 72:\n"
        "  attributes: [turboprop]\n",
        encoding="utf-8",
    )
    kb = load_knowledge(path)
    assert list(kb) == ["Boeing 757", "Airbus A321", "ATR 72"]
    assert kb.get("BOEING  757") == KnowledgeEntry(
        "A narrow-body airliner.", ("long fuselage", "2", "tall gear")
    )
    assert kb["airbus a321"] == KnowledgeEntry("The stretched A320.")
    assert kb.get("atr 72").attributes == ("turboprop",)
    assert "boeing 757" in kb and "Cessna" not in kb and kb.get("Cessna") is None
    assert len(load_knowledge(_write(tmp_path / "empty.yml", ""))) == 0


def test_knowledge_from_jsonl(tmp_path):
    rows = [
        {"entity": "Boeing 757", "description": "A narrow-body airliner.", "attributes": ["long"]},
        {"entity": "Airbus A321"},
    ]
    path = _write(tmp_path / "kb.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    kb = load_knowledge(path)
    assert kb.get("boeing 757") == KnowledgeEntry("A narrow-body airliner.", ("long",))
    assert kb.get("AIRBUS A321") == KnowledgeEntry()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("kb.txt", "x", r"kb\.txt: unknown knowledge file type '\.txt'"),
        ("kb.yaml", "- a\n- b\n", r"kb\.yaml: expected a mapping"),
        ("kb.yaml", "a: [unclosed\n", r"kb\.yaml:\d+: invalid YAML"),
        ("kb.yaml", "Boeing 757: 3\n", r"kb\.yaml: entity 'Boeing 757': expected a description"),
        ("kb.yaml", "B:\n  descr: x\n", r"kb\.yaml: entity 'B': unknown field\(s\) descr"),
        ("kb.yaml", "B:\n  attributes: long\n", r"entity 'B': attributes must be a list"),
        ("kb.yaml", "B:\n  attributes: [[a]]\n", r"entity 'B': each attribute must be"),
        ("kb.yaml", "B:\n  description: [a]\n", r"entity 'B': description must be text"),
        ("kb.yaml", "Boeing 757: a\nBOEING 757: b\n", r"kb\.yaml: entity 'BOEING 757' is given"),
        ("kb.jsonl", '{"entity": "A"}\n{"entity": "B",\n', r"kb\.jsonl, line 2: not JSON"),
        ("kb.jsonl", '\n["A"]\n', r"kb\.jsonl, line 2: expected a JSON object"),
        ("kb.jsonl", '{"description": "x"}\n', r'kb\.jsonl, line 1: needs a non-empty "entity"'),
        (
            "kb.jsonl",
            '{"entity": "A", "desc": "x"}\n',
            r"kb\.jsonl, line 1: entity 'A': unknown field",
        ),
        (
            "kb.jsonl",
            '{"entity": "A"}\n{"entity": "a "}\n',
            r"kb\.jsonl, line 2: entity .a. is given twice \(first on line 1\)",
        ),
    ],
)
def test_knowledge_errors_name_the_file_and_place(tmp_path, name, text, message):
    with pytest.raises(KnowledgeError, match=message):
        load_knowledge(_write(tmp_path / name, text))


def test_missing_knowledge_file_is_named(tmp_path):
    with pytest.raises(KnowledgeError, match=r"nope\.yaml: cannot read"):
        load_knowledge(tmp_path / "nope.yaml")


def test_templates_survive_pickling_for_beam_workers():
    import pickle

    for name in BUILTIN_TEMPLATES:
        template = load_template(name)
        again = pickle.loads(pickle.dumps(template))
        assert (again.name, again.source, again.hash) == (
            template.name,
            template.source,
            template.hash,
        )
    again = pickle.loads(pickle.dumps(load_template("grounding")))
    assert "Boeing 757" in again.render(
        entity="Boeing 757", domain="aircraft", codec_name="norm1000", codec_hint=""
    )
