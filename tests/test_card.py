"""The dataset card's metadata: `datasets.load_dataset` on a run's shards folder (or the run
folder) finds every split, with its rows; licence and tasks for the Hub."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import datasets
import yaml
from test_scene_pipeline import copy_flags, recipe

from groundforge.outputs import card as card_module
from groundforge.outputs.card import front_matter
from groundforge.outputs.shards import detect_format, read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe


def parse(text: str) -> dict:
    """The YAML front matter of a card."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def metadata(card: Path) -> dict:
    return parse(card.read_text())


def loaded_ids(path: Path, cache: Path) -> dict[str, list[str]]:
    ds = datasets.load_dataset(str(path), cache_dir=str(cache))
    return {split: sorted(ds[split]["sample_id"]) for split in ds}


def shard_ids(run: Path) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    shards = str(run / "shards")
    for s in read_samples(shards, fmt=detect_format(shards)):
        ids.setdefault(s.split, []).append(s.sample_id)
    return {split: sorted(v) for split, v in ids.items()}


def test_load_dataset_finds_every_split_of_the_demo(demo_run, tmp_path):
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert manifest["splits"]["sft"] > 200 and manifest["splits"]["val"] > 10
    expected = shard_ids(demo_run)
    assert {split: len(ids) for split, ids in expected.items()} == manifest["splits"]
    # Without the card's configs only val would load: `sft` is no split name datasets knows.
    assert loaded_ids(demo_run / "shards", tmp_path / "a") == expected
    assert loaded_ids(demo_run, tmp_path / "b") == expected
    meta = metadata(demo_run / "README.md")
    assert meta["pretty_name"] == "openclipart-flags"
    # "public-domain (openclipart, ...)" is no licence id the Hub knows.
    assert meta["license"] == "other"
    assert meta["task_categories"] == ["object-detection", "visual-question-answering"]
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "sft", "path": "shards/sft/*.arrow"},
                {"split": "val", "path": "shards/val/*.arrow"},
            ],
        }
    ]
    inner = metadata(demo_run / "shards" / "README.md")
    assert [f["path"] for f in inner["configs"][0]["data_files"]] == ["sft/*.arrow", "val/*.arrow"]
    assert {k: v for k, v in inner.items() if k != "configs"} == {
        k: v for k, v in meta.items() if k != "configs"
    }
    # The full card still reads as before below its metadata.
    assert "\n# openclipart-flags\n" in (demo_run / "README.md").read_text()


def test_parquet_shards_load_with_a_known_licence(tmp_path):
    folder = copy_flags(tmp_path / "flags")
    spec = recipe(folder, split={"val_fraction": 0.3}, output={"format": "parquet"})
    spec["source"]["license"] = "CC0 1.0"
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(spec, tmp_path), str(out))
    assert set(result.manifest["splits"]) == {"sft", "val"}
    assert all(result.manifest["splits"].values())
    assert metadata(out / "shards" / "README.md")["license"] == "cc0-1.0"
    expected = shard_ids(out)
    assert {s: len(v) for s, v in expected.items()} == result.manifest["splits"]
    assert loaded_ids(out / "shards", tmp_path / "cache") == expected


def manifest(splits: dict[str, int], licences: dict[str, int], fmt: str = "arrow") -> dict:
    return {
        "recipe": {"name": "n: with a colon", "source": {"license": ""}},
        "format": fmt,
        "splits": splits,
        "provenance": {"licenses": licences, "sources": {}},
    }


def test_front_matter_lists_splits_with_rows_and_every_licence():
    text = front_matter(manifest({"grpo": 0, "sft": 5, "val": 2}, {"CC-BY-4.0": 4, "mit": 3}), "")
    meta = parse(text)
    assert meta["pretty_name"] == "n: with a colon"
    assert meta["license"] == ["cc-by-4.0", "mit"]
    # datasets refuses a split with no rows, so an empty grpo split is left out.
    assert meta["configs"][0]["data_files"] == [
        {"split": "sft", "path": "sft/*.arrow"},
        {"split": "val", "path": "val/*.arrow"},
    ]
    nothing = parse(front_matter(manifest({"sft": 0}, {}), "shards"))
    assert nothing["license"] == "unknown" and "configs" not in nothing


def test_doctests():
    assert doctest.testmod(card_module).failed == 0
