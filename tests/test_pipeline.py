"""The KVG pipeline end to end: the demo on three runners, bad input, the detector, HF sources."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import badinput
import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from groundforge.examples import demo_recipe_path
from groundforge.filters.image import check_image, open_rgb
from groundforge.outputs.files import file_sha256
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.kvg import DetectorFailure, attach_detections
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import load_recipe, parse_recipe
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord, sha256_hex

RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.fixture(scope="module")
def demo_runs(demo_run, tmp_path_factory) -> dict[str, Path]:
    recipe = load_recipe(demo_recipe_path())
    runs = {"in_process": demo_run}
    for name, args in RUNNERS.items():
        if name in runs:
            continue
        out = tmp_path_factory.mktemp(f"demo-{name}")
        run_recipe(recipe, str(out), args)
        runs[name] = out
    return runs


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def rejections_of(out: Path) -> list[dict]:
    return pq.read_table(out / "rejections.parquet").to_pylist()


def test_demo_output_loads_with_datasets(demo_runs):
    out = demo_runs["in_process"]
    for name in ("shards", "manifest.json", "rejections.parquet", "README.md"):
        assert (out / name).exists(), name
    ds = datasets.load_from_disk(str(out / "shards"))
    assert isinstance(ds, datasets.DatasetDict)
    assert sorted(ds) == ["sft", "val"]
    assert len(ds["sft"]) > 200 and len(ds["val"]) > 10
    layouts, ks, by_mode = Counter(), Counter(), {"hard": [], "easy": []}
    names = {}
    for split in ds:
        names[split] = set()
        for row in ds[split]:
            image = row["image"]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert image.size == (row["width"], row["height"])
            [[x1, y1, x2, y2]] = row["gt_boxes"]
            assert 0 <= x1 < x2 <= row["width"] and 0 <= y1 < y2 <= row["height"]
            assert row["task"] == "kvg" and row["target"] in row["question"]
            assert row["split"] == split
            entities = [e["name"] for e in row["entities"]]
            assert 2 <= len(entities) <= 6 and len(set(entities)) == len(entities)
            assert {"name": row["target"], "box": [x1, y1, x2, y2]} in row["entities"]
            names[split] |= set(entities)
            layouts[row["provenance"]["layout"]] += 1
            ks[len(entities)] += 1
            by_mode[row["distractors"]].append(row["distractor_similarity"])
            assert len(row["provenance"]["source_image_ids"]) == len(entities)
    # Entities never cross splits, not even as distractors: val measures unseen entities.
    assert not names["sft"] & names["val"]
    assert set(layouts) == {"horizontal", "vertical", "grid", "random"}
    assert set(ks) == {2, 3, 4, 5, 6}
    # Hard distractors are the target's look-alikes: measurably more similar than random ones.
    hard, easy = (sum(v) / len(v) for v in (by_mode["hard"], by_mode["easy"]))
    assert hard > easy + 0.2, (hard, easy)


def test_demo_manifest_checksums_and_counts(demo_runs):
    out = demo_runs["in_process"]
    manifest = manifest_of(out)
    for shard in manifest["shards"]:
        assert file_sha256(str(out / shard["path"])) == (shard["sha256"], shard["bytes"])
    stages = manifest["stages"]
    names = [s["stage"] for s in stages]
    assert names == [
        "read",
        "image",
        "reference",
        "embed",
        "dedup",
        "box",
        "box_bounds",
        "scene_pool",
        "compose",
        "output",
    ]
    for s in stages:
        assert s["in"] == s["kept"] + sum(s["dropped"].values()), s
    # One image in, one image out, up to the scenes; every image is the target of one scene.
    for before, after in zip(stages[:-2], stages[1:-1], strict=True):
        assert after["in"] == before["kept"]
    # Two queries per scene, every scene having at least two flags.
    assert stages[-1]["in"] == 2 * stages[-2]["kept"]
    rows = sum(s["rows"] for s in manifest["shards"])
    assert rows == stages[-1]["kept"] == manifest["samples"]
    assert rows >= 300
    assert manifest["splits"] == {
        split: sum(s["rows"] for s in manifest["shards"] if s["split"] == split)
        for split in ("sft", "val")
    }
    rejections = rejections_of(out)
    dropped = sum(sum(s["dropped"].values()) for s in stages)
    assert len(rejections) == dropped == manifest["rejections"]["rows"]
    # Every input image is either in a scene or rejected.
    assert stages[0]["in"] == stages[-2]["kept"] + dropped
    # The bundled folder holds 40 broken links saved as text, and one flag larger than the guard.
    by_reason = Counter((r["stage"], r["reason"]) for r in rejections)
    assert by_reason[("image", "not_an_image")] == 40
    assert by_reason[("image", "too_many_pixels")] == 1
    # The same flag under two names, kept once: the first in path order names the kept twin.
    dups = {
        Path(r["source_id"]).name: json.loads(r["detail"])
        for r in rejections
        if r["stage"] == "dedup"
    }
    assert by_reason[("dedup", "duplicate_perceptual")] == len(dups) == 4
    assert {name: Path(d["kept_key"]).name for name, d in dups.items()} == {
        "guineabissau.png": "guinea_bissau.png",
        "france_corsica.png": "corsica_patricia_fidi_01.png",
        "france_haute_normandie.png": "france_basse_normandie.png",
        "padania_ani_ani_01.png": "flag_of_padania_federico_01.png",
    }
    # Roussillon's stripes run across, Provence's down: one pHash, two pictures, both kept.
    assert "france_roussillon.png" not in dups
    assert manifest["recipe"]["name"] == "openclipart-flags"
    assert manifest["versions"]["apache-beam"].startswith("2.")


def test_runners_give_identical_shards(demo_runs):
    def content(out):
        return sorted(
            (s.sample_id, s.split, s.gt_boxes, [e.box for e in s.entities])
            for s in read_samples(str(out / "shards"))
        )

    def rejected(out):
        return sorted(
            (r["item_id"], r["stage"], r["reason"], r["detail"]) for r in rejections_of(out)
        )

    def checksums(out):
        return [(s["path"], s["sha256"]) for s in manifest_of(out)["shards"]]

    reference = demo_runs["in_process"]
    assert len(content(reference)) > 250
    for name in ("multi_processing", "portable"):
        assert content(demo_runs[name]) == content(reference), name
        assert checksums(demo_runs[name]) == checksums(reference), name
        assert rejected(demo_runs[name]) == rejected(reference), name
        assert manifest_of(demo_runs[name])["stages"] == manifest_of(reference)["stages"]
    assert manifest_of(demo_runs["portable"])["runner"]["runner"] == "PortableRunner"


def folder_recipe(path: Path, **overrides) -> dict:
    recipe = {
        "name": "test",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(path), "entity_from": "stem"},
        "boxes": {"method": "foreground", "min_area_fraction": 0.0},
        "images": {"min_side": 8},
    }
    for key, value in overrides.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def test_bad_input_is_normalised_or_rejected_with_its_reason(tmp_path):
    images = tmp_path / "images"
    expected = badinput.make_bad_corpus(images)
    unreadable = badinput.make_unreadable_paths(images)
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(folder_recipe(images), tmp_path), str(out))

    for s in result.funnel:
        assert s.balanced, s
    assert result.funnel[0].total == len(expected) + len(unreadable)
    rejected = {Path(r["source_id"]).name: (r["stage"], r["reason"]) for r in rejections_of(out)}
    for path in unreadable.values():
        assert rejected[path.name] == ("read", "unreadable")
    samples = {Path(s.provenance.locations[0]).name: s for s in read_samples(str(out / "shards"))}
    for name, outcome in expected.items():
        if outcome == badinput.KEEP:
            assert name not in rejected or rejected[name][0] != "image", name
        else:
            assert rejected[name] == ("image", outcome), name
    assert set(samples) | set(rejected) == set(expected) | {p.name for p in unreadable.values()}
    upright = samples["exif_rotated.jpg"]
    assert (upright.width, upright.height) == badinput.KEPT_SIZES["exif_rotated.jpg"]
    image = Image.open(io.BytesIO(upright.image))
    assert image.size == badinput.KEPT_SIZES["exif_rotated.jpg"] and image.mode == "RGB"


def test_detector_pipeline_with_tiny_model(tmp_path, tiny_detector_dir):
    images = tmp_path / "images"
    flags = demo_recipe_path().parent / "data" / "flags" / "africa"
    names = ["chad.png", "mali.png", "niger.png", "kenya.png", "ghana.png", "togo.png"]
    images.mkdir()
    for name in names:
        shutil.copy(flags / name, images / name)
    detector = {
        "model": str(tiny_detector_dir),
        "labels": {"flag": ["flag"]},
        "shortest_edge": 240,
        "longest_edge": 320,
        "batch_size": 4,
    }

    strict = folder_recipe(images, boxes={"method": "detector", "detector": detector})
    result = run_recipe(parse_recipe(strict, tmp_path), str(tmp_path / "strict"))
    funnel = {s.stage: s for s in result.funnel}
    assert list(funnel) == [
        "read",
        "image",
        "reference",
        "dedup",
        "detect",
        "box",
        "box_bounds",
        "sample",
        "output",
    ]
    assert funnel["detect"].total == funnel["detect"].kept == len(names)
    assert all(s.balanced for s in result.funnel)
    # A random detector is confident everywhere: one box per flag is never unique.
    assert funnel["box"].dropped == {"multiple_detector_boxes": len(names)}

    agree = folder_recipe(
        images,
        boxes={
            "method": "foreground",
            "agree_with": "detector",
            "agreement_iou": 0.0,
            "confident_score": 0.0,
            "detector": detector,
        },
    )
    out = tmp_path / "agree"
    result = run_recipe(parse_recipe(agree, tmp_path), str(out))
    assert [s.stage for s in result.funnel][5:7] == ["box", "agreement"]
    samples = list(read_samples(str(out / "shards")))
    assert len(samples) == len(names)
    for s in samples:
        assert s.box_source == "foreground"
        assert s.detector_iou is not None and 0.0 <= s.detector_iou <= 1.0


def test_detector_failures_become_reasons():
    from apache_beam.ml.inference.base import PredictionResult

    record = ImageRecord("id", b"", 10, 10, "flag", "Chad")
    assert attach_detections(PredictionResult(record, None)).reason == "detector_failed"
    failed = attach_detections(PredictionResult(record, DetectorFailure("RuntimeError: oom")))
    assert (failed.reason, failed.metrics) == ("detector_error", {"error": "RuntimeError: oom"})
    det = Detection(Box(1, 1, 5, 5), 0.9, "flag")
    kept = attach_detections(PredictionResult(record, (det,)))
    assert kept.value.candidates == {"detector": (det,)}


def test_hf_dataset_source_with_known_boxes(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    rows = {"image": [], "label": [], "bbox": []}
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        image = Image.new("RGB", (64, 48), "white")
        image.paste(color, (10 + i, 5, 40, 30))
        rows["image"].append({"bytes": badinput.encode(image, "PNG"), "path": None})
        rows["label"].append(i)
        rows["bbox"].append([10 + i, 5, 30 - i, 25])  # xywh
    features = Features(
        {
            "image": HFImage(),
            "label": ClassLabel(names=["Boeing 757", "Airbus A320", "Boeing 737"]),
            "bbox": Sequence(Value("float32"), length=4),
        }
    )
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    recipe = {
        "name": "hf",
        "domain": "aircraft",
        "source": {
            "kind": "hf_dataset",
            "path": "ds",
            "entity_column": "label",
            "box_column": "bbox",
            "box_format": "xywh",
        },
    }
    out = tmp_path / "out"
    run_recipe(parse_recipe(recipe, tmp_path), str(out))
    samples = sorted(read_samples(str(out / "shards")), key=lambda s: s.target)
    assert [s.target for s in samples] == ["Airbus A320", "Boeing 737", "Boeing 757"]
    assert [s.box_source for s in samples] == ["known"] * 3
    assert samples[2].gt_boxes == (Box(10, 5, 40, 30),)
    assert samples[0].gt_boxes == (Box(11, 5, 40, 30),)
    assert all(s.domain == "aircraft" for s in samples)


def test_rerun_replaces_previous_output(tmp_path):
    images = tmp_path / "images"
    badinput.make_bad_corpus(images)
    recipe = folder_recipe(images, output={"rows_per_shard": 1})
    out = tmp_path / "out"
    run_recipe(parse_recipe(recipe, tmp_path), str(out))
    first = sorted(p.name for p in (out / "shards" / "sft").glob("data-*"))
    assert len(first) > 1
    recipe = folder_recipe(images, output={"rows_per_shard": 1000})
    run_recipe(parse_recipe(recipe, tmp_path), str(out))
    assert sorted(p.name for p in (out / "shards" / "sft").glob("data-*")) == [
        "data-00000-of-00001.arrow"
    ]


def test_every_rejection_has_an_id_of_its_own(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    flags = demo_recipe_path().parent / "data" / "flags" / "africa"
    for name in ("chad.png", "mali.png", "kenya.png", "ghana.png"):
        shutil.copy(flags / name, images / name)
    # Exact copies of Chad under other names, and two broken files with the same bytes.
    shutil.copy(flags / "chad.png", images / "copy_of_chad.png")
    shutil.copy(flags / "chad.png", images / "zz_chad.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "broken_too.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    run_recipe(parse_recipe(folder_recipe(images), tmp_path), str(out))

    rows = rejections_of(out)
    by_path = {Path(r["source_id"]).name: r for r in rows}
    assert sorted(by_path) == ["broken.png", "broken_too.png", "copy_of_chad.png", "zz_chad.png"]
    ids = [r["item_id"] for r in rows]
    assert len(set(ids)) == len(ids) == 4
    samples = list(read_samples(str(out / "shards")))
    kept = {i for s in samples for i in s.provenance.source_image_ids}
    assert len(samples) == 4 and not kept & set(ids)
    # The digest of the bytes is its own column: a copy's names its kept twin's image id.
    chad = next(s for s in samples if s.target == "Chad")
    for name in ("copy_of_chad.png", "zz_chad.png"):
        row = by_path[name]
        assert (row["reason"], row["sha256"]) == (
            "duplicate_exact",
            chad.provenance.source_image_ids[0],
        )
        assert row["source_id"] == str(images / name)
        assert json.loads(row["detail"])["kept_key"] == chad.provenance.locations[0]
    assert by_path["zz_chad.png"]["entity"] == "Zz Chad"
    assert by_path["broken.png"]["sha256"] == by_path["broken_too.png"]["sha256"] != ""
    assert by_path["broken.png"]["entity"] == "Broken"


def test_an_entity_whose_every_image_is_a_copy_becomes_an_alias(tmp_path):
    images = tmp_path / "images"
    flags = demo_recipe_path().parent / "data" / "flags" / "africa"
    # As the image check normalises it (transparency on white), then copied.
    raw = (flags / "chad.png").read_bytes()
    chad = open_rgb(check_image(ImageRecord(sha256_hex(raw), raw, 0, 0, "flag")).value.image)

    def put(entity: str, name: str, data: bytes) -> None:
        (images / entity).mkdir(parents=True, exist_ok=True)
        (images / entity / name).write_bytes(data)

    for entity in ("mali", "kenya", "ghana"):
        put(entity, f"{entity}.png", (flags / f"{entity}.png").read_bytes())
    put("chad", "chad.png", (flags / "chad.png").read_bytes())
    # "tchad": one picture, Chad's, under another name, re-encoded and resized; "kenya" keeps
    # its own picture beside a copy of Ghana's, so it is no alias.
    buf = io.BytesIO()
    chad.resize((chad.width * 3 // 4, chad.height * 3 // 4)).save(buf, "JPEG", quality=80)
    put("tchad", "tchad.jpg", buf.getvalue())
    put("tchad", "tchad_exact.png", (flags / "chad.png").read_bytes())
    put("kenya", "zz_ghana_copy.png", (flags / "ghana.png").read_bytes())
    out = tmp_path / "out"
    recipe = folder_recipe(images, source={"entity_from": "parent"})
    run_recipe(parse_recipe(recipe, tmp_path), str(out))

    rows = {Path(r["source_id"]).name: r for r in rejections_of(out)}
    assert {n: rows[n]["reason"] for n in rows} == {
        "tchad.jpg": "duplicate_perceptual",
        "tchad_exact.png": "duplicate_exact",
        "zz_ghana_copy.png": "duplicate_exact",
    }
    assert json.loads(rows["tchad.jpg"]["detail"])["kept_entity"] == "Chad"
    manifest = manifest_of(out)
    assert manifest["aliases"] == {"Chad": ["Tchad"]}
    card = (out / "README.md").read_text()
    assert "| Chad | Tchad |" in card
    report = (out / "report.html").read_text()
    assert '<td class="aliases">Tchad</td>' in report
    targets = {s.target for s in read_samples(str(out / "shards"))}
    assert "Tchad" not in targets and {"Chad", "Kenya", "Ghana", "Mali"} <= targets
