"""Seen / unseen categories of `groundforge eval`: the categories file, KVG-Bench's split, and
the split a run derives from its own manifest (a real small run with a held-out domain)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from click.testing import CliRunner
from kvgbench import DEFAULT_CASES, write_kvg_bench
from PIL import Image
from seededserver import SeededServer

from groundforge.cli import main
from groundforge.examples import EXAMPLES_DIR
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.trainer.categories import (
    CategoriesError,
    SeenUnseen,
    explain,
    load_categories,
    run_split,
)
from groundforge.trainer.evaluate import load_kvg_bench, run_eval

# -- the categories file ----------------------------------------------------------------------


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_json_files_read_the_same(tmp_path):
    yaml_file = write(
        tmp_path,
        "c.yaml",
        "seen: [aircraft, ' flag ']\nunseen: [dog]\nmap:\n  airliner: aircraft\n",
    )
    json_file = write(
        tmp_path,
        "c.json",
        json.dumps(
            {"seen": ["aircraft", "flag"], "unseen": ["dog"], "map": {"airliner": "aircraft"}}
        ),
    )
    for path in (yaml_file, json_file):
        split = load_categories(path)
        assert (split.seen, split.unseen) == (("aircraft", "flag"), ("dog",))
        assert split.mapping == {"airliner": "aircraft"}
        assert str(path) in split.source
    # an entity's mapping wins over its domain's; an unmapped item keeps its own category
    split = SeenUnseen(("a",), ("b",), "test", {"Chad": "b", "flag": "a"})
    assert split.category_of("flag", "Chad") == "b"
    assert split.category_of("flag", "Mali") == "a"
    assert split.category_of("dog", "Beagle") == "dog"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("seen: [bird]\nunsen: [dog]\n", "unsen"),
        ("seen: bird\n", "seen"),
        ("seen: [bird, '']\n", "seen.1"),
        ("seen: [bird]\nmap: [a, b]\n", "map"),
        ("seen: [bird]\nunseen: [dog, bird]\n", "bird"),
        ("seen: [bird, bird]\n", "seen"),
        ("seen: []\nunseen: []\n", "seen and unseen"),
        ("- bird\n- dog\n", "mapping"),
        ("seen: [bird\n", "not valid YAML"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path, text, field):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(CategoriesError) as err:
        load_categories(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CategoriesError, match="absent.yaml"):
        load_categories(tmp_path / "absent.yaml")


def test_explain_says_why_a_row_is_empty():
    split = SeenUnseen(("aircraft",), ("dog",), "test")
    assert explain(split, ["aircraft", "dog"]) == []
    notes = explain(split, ["aircraft", "flag"])
    assert notes[0].startswith("the unseen row is empty: no evaluated category is among dog")
    assert "--categories" in notes[0]
    assert notes[1] == "in neither seen nor unseen (counted in all only): flag"
    (note,) = explain(SeenUnseen((), (), "unknown"), ["flag"])
    assert "seen and unseen rows are empty" in note and "--categories" in note


def test_the_bundled_example_file_reads():
    split = load_categories(EXAMPLES_DIR / "categories.yaml")
    assert "flag" in split.seen and "dog" in split.unseen
    assert not set(split.seen) & set(split.unseen)


# -- a real run with a held-out domain ----------------------------------------------------------

BIRDS = ["Snowy Owl", "Robin", "Sparrow", "Blue Jay", "Kestrel", "Heron"]
DOGS = ["Beagle", "Poodle"]


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    """Two domains from a saved HF dataset with known boxes: every dog held out
    (``val_domains``) and half the bird entities held out (``val_fraction``)."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    root = tmp_path_factory.mktemp("heldout")
    rows = {"image": [], "entity": [], "domain": [], "bbox": []}
    for i, (name, domain) in enumerate([(b, "bird") for b in BIRDS] + [(d, "dog") for d in DOGS]):
        image = Image.new("RGB", (64, 48), "white")
        image.paste((30 * i % 256, 200 - 20 * i, 40 + 25 * i), (8 + i, 6, 40 + i, 30))
        path = root / f"{i}.png"
        image.save(path)
        rows["image"].append({"bytes": path.read_bytes(), "path": None})
        rows["entity"].append(name)
        rows["domain"].append(domain)
        rows["bbox"].append([8 + i, 6, 40 + i, 30])
    features = Features(
        {
            "image": HFImage(),
            "entity": Value("string"),
            "domain": Value("string"),
            "bbox": Sequence(Value("float32"), length=4),
        }
    )
    Dataset.from_dict(rows, features=features).save_to_disk(str(root / "ds"))
    recipe = {
        "name": "two-domains",
        "domain": "animal",
        "source": {
            "kind": "hf_dataset",
            "path": "ds",
            "entity_column": "entity",
            "domain_column": "domain",
            "box_column": "bbox",
        },
        "dedup": {"enabled": False},
        "split": {"val_fraction": 0.5, "val_domains": ["dog"], "seed": "categories-test"},
    }
    out = root / "run"
    run_recipe(parse_recipe(recipe, root), str(out))
    return out


def val_domains_of(run) -> Counter:
    return Counter(s.domain for s in read_samples(str(run / "shards"), "val"))


def right_for(domains: dict[str, str]):
    """A served model that answers every bird's box and nothing else: the question names the
    entity and the domains map says whose it is."""

    def answer(body):
        entity = re.search(r"object_ref_start\|>(.*?)<\|object_ref_end", json.dumps(body))[1]
        return "(0,0),(1000,1000)" if domains[entity] == "bird" else "no idea"

    return answer


def test_the_run_marks_its_held_out_domain_unseen(held_out_run):
    counts = val_domains_of(held_out_run)
    assert counts["dog"] == len(DOGS) and 0 < counts["bird"] < len(BIRDS)  # a real mix
    split = run_split(held_out_run / "shards", "val", counts)
    assert (split.seen, split.unseen) == (("bird",), ("dog",))
    assert str(held_out_run / "manifest.json") in split.source
    assert "val_domains (dog)" in split.source
    # a training split is seen throughout
    training = run_split(held_out_run / "shards", "sft", ["bird"])
    assert (training.seen, training.unseen) == (("bird",), ())


def test_run_eval_fills_seen_and_unseen_from_the_run(held_out_run):
    counts = val_domains_of(held_out_run)
    names = {**{b: "bird" for b in BIRDS}, **{d: "dog" for d in DOGS}}
    with SeededServer(right_for(names)) as server:
        report = run_eval(
            shards=held_out_run / "shards", endpoint=server.base_url, served_model="m"
        )
    g = report.metrics["grounding"]
    # a 64 x 48 image: the whole-image answer against the known box, IoU < 0.5 (box 32 x 24)
    assert (g["seen"]["n"], g["unseen"]["n"]) == (counts["bird"], counts["dog"])
    assert g["seen"]["miou"] > 0 and g["unseen"]["miou"] == 0.0
    assert report.metrics["seen_categories"] == ["bird"]
    assert report.metrics["unseen_categories"] == ["dog"]
    assert "manifest.json" in report.metrics["seen_unseen"]["source"]
    assert report.metrics["seen_unseen"]["notes"] == []


def test_a_categories_file_maps_entities_for_a_run(held_out_run, tmp_path):
    val_birds = sorted(
        s.target for s in read_samples(str(held_out_run / "shards"), "val") if s.domain == "bird"
    )
    moved = val_birds[0]
    path = write(
        tmp_path,
        "c.yaml",
        f"seen: [bird]\nunseen: [dog, owl-like]\nmap:\n  {moved}: owl-like\n",
    )
    names = {**{b: "bird" for b in BIRDS}, **{d: "dog" for d in DOGS}}
    with SeededServer(right_for(names)) as server:
        report = run_eval(
            shards=held_out_run / "shards",
            endpoint=server.base_url,
            served_model="m",
            categories=path,
        )
    g = report.metrics["grounding"]
    counts = val_domains_of(held_out_run)
    assert g["categories"]["owl-like"]["n"] == 1
    assert g["seen"]["n"] == counts["bird"] - 1
    assert g["unseen"]["n"] == counts["dog"] + 1
    assert report.metrics["seen_unseen"]["source"] == f"the categories file {path}"
    assert report.metrics["seen_unseen"]["map"] == {moved: "owl-like"}
    by_id = {p.question_id: p.category for p in report.predictions}
    assert Counter(by_id.values()) == Counter(
        {"bird": counts["bird"] - 1, "owl-like": 1, "dog": counts["dog"]}
    )


def test_bare_shards_leave_the_rows_empty_and_say_why(held_out_run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(held_out_run / "shards", bare)  # no manifest.json next to it
    with SeededServer(lambda body: "no idea") as server:
        result = CliRunner().invoke(
            main,
            ["eval", "--shards", str(bare), "--endpoint", server.base_url, "--served-model", "m"],
        )
    assert result.exit_code == 0, result.output
    assert f"seen / unseen: unknown: {bare} has no manifest.json to tell" in result.output
    assert "the seen and unseen rows are empty; give --categories FILE" in result.output


def test_cli_categories_option_and_its_errors(held_out_run, tmp_path):
    good = write(tmp_path, "good.yaml", "seen: [dog]\n")
    bad = write(tmp_path, "bad.yaml", "seen: [dog]\nunseen: dog\n")
    with SeededServer(lambda body: "no idea") as server:
        args = ["eval", "--shards", str(held_out_run), "--endpoint", server.base_url]
        args += ["--served-model", "m"]
        ok = CliRunner().invoke(main, [*args, "--categories", str(good)])
        failed = CliRunner().invoke(main, [*args, "--categories", str(bad)])
        asked = len(server.bodies)
    assert ok.exit_code == 0, ok.output
    assert f"seen / unseen: the categories file {good}" in ok.output
    assert "in neither seen nor unseen (counted in all only): bird" in ok.output
    assert (
        f"the unseen row is empty: no category is marked unseen; list categories under seen / "
        f"unseen in {good}"
    ) in ok.output
    assert failed.exit_code != 0
    assert str(bad) in failed.output and "unseen" in failed.output
    assert asked == sum(val_domains_of(held_out_run).values())  # the bad file asked nothing


# -- KVG-Bench ----------------------------------------------------------------------------------


def test_bench_rows_get_their_entity_and_a_file_can_add_a_domain(tmp_path):
    bench = tmp_path / "bench.parquet"
    write_kvg_bench(bench, DEFAULT_CASES)
    items = load_kvg_bench(bench)
    assert [i.entity for i in items] == [c.entity for c in DEFAULT_CASES]
    with SeededServer(lambda body: "no idea") as server:
        default = run_eval(bench=bench, endpoint=server.base_url, served_model="m")
        own = run_eval(
            bench=bench,
            endpoint=server.base_url,
            served_model="m",
            categories=EXAMPLES_DIR / "categories.yaml",
        )
    flags = sum(c.category == "flag" for c in DEFAULT_CASES)
    assert default.metrics["seen_unseen"]["source"] == "KVG-Bench's published split"
    assert default.metrics["seen_unseen"]["notes"] == [
        "in neither seen nor unseen (counted in all only): flag"
    ]
    g, h = default.metrics["grounding"], own.metrics["grounding"]
    assert h["seen"]["n"] == g["seen"]["n"] + flags
    assert h["unseen"]["n"] == g["unseen"]["n"]
    assert own.metrics["seen_unseen"]["notes"] == []
    assert re.search(r"categories\.yaml$", own.metrics["seen_unseen"]["source"])
