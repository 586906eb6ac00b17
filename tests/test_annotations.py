"""Annotation sources (COCO, CrowdHuman .odgt), the instances check, and a run on an odgt recipe."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from groundforge.filters.image import check_image
from groundforge.filters.instances import check_instances, fit_instances
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.kvg import make_source
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import RecipeError, load_recipe, parse_recipe
from groundforge.schemas.box import Box
from groundforge.schemas.records import ImageRecord, Instance, SourceItem
from groundforge.sources.annotations import CocoSource, OdgtSource
from groundforge.sources.read import read_item


def image_bytes(width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A noise image: different seeds give images the dedup stage tells apart."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def all_items(source) -> list[SourceItem]:
    return [item for part in source.partitions() for item in source.items(part)]


def by_id(items: list[SourceItem]) -> dict[str, SourceItem]:
    return {i.item_id: i for i in items}


def decoded(item: SourceItem) -> ImageRecord:
    """The record after the read and image stages, as the pipeline hands it on."""
    read = read_item(item)
    assert read.keep, read
    checked = check_image(read.value)
    assert checked.keep, checked
    return checked.value


# ---------------------------------------------------------------- COCO


def ann(ann_id, image_id, category_id, bbox, iscrowd=0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def write_coco(root: Path, images: list, annotations: list) -> tuple[Path, Path]:
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        if (
            isinstance(image, dict)
            and image.get("file_name")
            and "missing" not in image["file_name"]
        ):
            fmt = "PNG" if image["file_name"].endswith(".png") else "JPEG"
            data = image_bytes(image.get("width", 64), image.get("height", 48), fmt)
            (folder / image["file_name"]).write_bytes(data)
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "licenses": [{"id": 4, "name": "CC BY 2.0", "url": "https://example.org/by"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path, folder


def simple_coco(root: Path) -> tuple[Path, Path]:
    images = [
        {"id": 1, "file_name": "street.jpg", "width": 64, "height": 48, "license": 4},
        {"id": 2, "file_name": "park.png", "width": 64, "height": 48},
    ]
    annotations = [
        ann(10, 1, 1, [2, 3, 10, 20]),
        ann(11, 1, 1, [30, 4, 8, 16]),
        ann(12, 1, 1, [40, 0, 20, 30], iscrowd=1),
        ann(13, 1, 18, [5, 30, 12, 10]),
        ann(14, 2, 18, [1, 1, 20, 20]),
    ]
    return write_coco(root, images, annotations)


def test_coco_instances_ignore_regions_and_category_filter(tmp_path: Path) -> None:
    path, folder = simple_coco(tmp_path)
    people = by_id(all_items(CocoSource(str(path), str(folder), "person", ("person",))))
    street = people["1"]
    assert street.location == str(folder / "street.jpg")
    assert street.entity == "person" and street.domain == "person" and street.source == "coco"
    assert street.license == "CC BY 2.0"
    assert street.instances == (
        Instance(Box(2, 3, 12, 23), "person"),
        Instance(Box(30, 4, 38, 20), "person"),
        Instance(Box(40, 0, 60, 30), "person", ignore=True),
    )
    # the iscrowd region is an instance, never a truth
    assert street.boxes == (Box(2, 3, 12, 23), Box(30, 4, 38, 20))
    assert street.dropped_instances == {}
    # an image with none of the wanted categories is still an item, with nothing on it
    assert people["2"].instances == () and people["2"].boxes == ()

    everything = by_id(all_items(CocoSource(str(path), str(folder), "animal")))
    assert [i.label for i in everything["1"].instances] == ["person", "person", "person", "dog"]
    assert everything["1"].entity == ""  # people and a dog: no single entity
    assert everything["2"].entity == "dog" and everything["2"].license == ""


def test_coco_bad_annotations_each_have_a_reason(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "missing.jpg", "width": 64, "height": 48},
        {"id": 3},  # no file_name
        {"id": 1, "file_name": "again.jpg"},  # id already used
        "not an object",
    ]
    annotations = [
        ann(1, 1, 1, [50, 40, 30, 30]),  # partly outside: clipped to the JSON size
        ann(2, 1, 1, [70, 50, 5, 5]),  # wholly outside
        ann(3, 1, 1, [1, 1, 0, 5]),  # zero width
        ann(4, 1, 1, [1, 1, 5, -2]),  # negative height
        ann(5, 1, 1, [1, 1, "5", 5]),  # not numbers
        ann(6, 1, 7, [1, 1, 5, 5]),  # unknown category
        {"id": 7, "image_id": 1, "category_id": 1},  # no bbox
        ann(8, 2, 1, [1, 1, 5, 5]),
        ann(9, 99, 1, [1, 1, 5, 5]),  # an image that is not listed
        ann(10, 99, 1, [2, 2, 5, 5]),
        {"id": 11, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no image_id
        ["not", "an", "object"],
        ann(12, 99, 18, [1, 1, 5, 5]),  # another category: not read at all
    ]
    path, folder = write_coco(tmp_path, images, annotations)
    src = CocoSource(str(path), str(folder), "person", ("person",), images_per_partition=3)
    items = by_id(all_items(src))
    assert sorted(items) == [
        "1",
        "2",
        "annotations without image_id",
        "image_id 99",
        "images[2]",
        "images[3]",
        "images[4]",
    ]
    a = items["1"]
    assert a.instances == (Instance(Box(50, 40, 64, 48), "person"),)
    assert a.dropped_instances == {
        "degenerate": 2,
        "malformed": 1,
        "missing_box": 1,
        "outside_image": 1,
        "unknown_category": 1,
    }

    verdicts = {k: read_item(item) for k, item in items.items()}
    assert verdicts["1"].keep
    assert verdicts["2"].reason == "not_found"
    reasons = {k: v.reason for k, v in verdicts.items() if k not in ("1", "2")}
    assert set(reasons.values()) == {"bad_annotation"}
    errors = {k: verdicts[k].metrics["error"] for k in reasons}
    assert "2 annotations name image id 99" in errors["image_id 99"]
    assert "2 annotations have no usable `image_id`" in errors["annotations without image_id"]
    assert "needs an `id` and a `file_name`" in errors["images[2]"]
    assert "already used by images[0]" in errors["images[3]"]
    assert "needs an `id`" in errors["images[4]"]
    assert all(str(path) in e for e in errors.values())

    # Every person annotation is an instance, a counted drop, or inside a rejected item.
    instances = sum(len(i.instances) for i in items.values())
    counted = sum(sum(i.dropped_instances.values()) for i in items.values())
    in_rejected = 2 + 2  # image id 99, and the two without an image id
    assert instances + counted + in_rejected == len(annotations) - 1


@pytest.mark.parametrize(
    ("text", "categories", "message"),
    [
        ("{not json", None, "not a JSON file"),
        (json.dumps({"annotations": []}), None, "no `images` list"),
        (json.dumps({"images": [], "categories": [{"id": 1}]}), None, r"categories\[0\]"),
        (
            json.dumps({"images": [], "categories": [{"id": 1, "name": "person"}]}),
            ("cat",),
            r"no categories \['cat'\]; its categories are \['person'\]",
        ),
    ],
)
def test_coco_file_errors_name_the_file(tmp_path: Path, text, categories, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    src = CocoSource(str(path), str(tmp_path), "person", categories)
    with pytest.raises(ValueError, match=message) as err:
        src.partitions()
    assert str(path) in str(err.value)


def test_missing_files_fail_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="annotation file"):
        OdgtSource(str(tmp_path / "none.odgt"), str(tmp_path), "person").partitions()
    (tmp_path / "a.odgt").write_text("")
    with pytest.raises(FileNotFoundError, match="image folder"):
        OdgtSource(str(tmp_path / "a.odgt"), str(tmp_path / "imgs"), "person").partitions()


# ---------------------------------------------------------------- odgt


def person(fbox, vbox, hbox, ignore=0, head_ignore=0, tag="person") -> dict:
    return {
        "tag": tag,
        "fbox": fbox,
        "vbox": vbox,
        "hbox": hbox,
        "extra": {"ignore": ignore, "occ": 1},
        "head_attr": {"ignore": head_ignore, "occ": 0, "unsure": 0},
    }


def write_odgt(root: Path, lines: list, sizes: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    folder = root / "Images"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (image_id, (w, h)) in enumerate(sizes.items()):
        (folder / f"{image_id}.jpg").write_bytes(image_bytes(w, h, seed=seed))
    path = root / "annotation.odgt"
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path, folder


CROWD = {
    "ID": "273271,c9db000d5146c15",
    "gtboxes": [
        person([10, 10, 20, 40], [12, 20, 15, 25], [14, 10, 8, 8]),
        person([40, 5, 20, 40], [40, 5, 10, 20], [45, 5, 8, 8], head_ignore=1),
        person([60, 10, 10, 30], [60, 10, 10, 30], [62, 10, 5, 5], ignore=1),
        {"tag": "mask", "fbox": [0, 50, 30, 10], "vbox": [0, 50, 30, 10], "extra": {"ignore": 1}},
        person([5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 2, 2], tag="car"),
    ],
}


@pytest.mark.parametrize(
    ("box", "truths"),
    [
        ("full", [Box(10, 10, 30, 50), Box(40, 5, 60, 45)]),
        ("visible", [Box(12, 20, 27, 45), Box(40, 5, 50, 25)]),
        ("head", [Box(14, 10, 22, 18)]),
    ],
)
def test_odgt_box_choice_keeps_the_other_boxes(tmp_path: Path, box, truths) -> None:
    path, folder = write_odgt(tmp_path, [CROWD], {CROWD["ID"]: (80, 64)})
    (item,) = all_items(OdgtSource(str(path), str(folder), "person", box=box))
    assert item.item_id == CROWD["ID"]
    assert item.location == str(folder / f"{CROWD['ID']}.jpg")
    assert item.boxes == tuple(truths)
    assert item.entity == "person" and item.dropped_instances == {}
    first = item.instances[0]
    assert first.full == Box(10, 10, 30, 50) and first.visible == Box(12, 20, 27, 45)
    assert first.box == {"full": first.full, "visible": first.visible}.get(box, Box(14, 10, 22, 18))
    # the car is not read; the mask region and the ignored person are ignore instances
    assert [(i.label, i.ignore) for i in item.instances] == [
        ("person", False),
        ("person", box == "head"),  # its head is marked ignore, the person is not
        ("person", True),
        ("mask", True),
    ]
    assert item.instances[3].box == Box(0, 50, 30, 60)  # a region is its fbox, whatever `box`


def test_odgt_tag_filter(tmp_path: Path) -> None:
    path, folder = write_odgt(tmp_path, [CROWD], {CROWD["ID"]: (80, 64)})
    (item,) = all_items(OdgtSource(str(path), str(folder), "vehicle", tag="car"))
    assert item.boxes == (Box(5, 5, 10, 10),) and item.entity == "car"
    assert [i.label for i in item.instances] == ["mask", "car"]  # in file order


def test_odgt_bad_lines_and_boxes_each_have_a_reason(tmp_path: Path) -> None:
    lines = [
        {"ID": "good", "gtboxes": [person([1, 1, 0, 9], [1, 1, 4, 4], [1, 1, 2, 2])]},
        "{broken json",
        "",
        "[1, 2, 3]",
        {"gtboxes": []},
        {"ID": "nolist", "gtboxes": {"tag": "person"}},
        {
            "ID": "boxes",
            "gtboxes": [
                person([1, 1, -4, 9], [1, 1, 4, 4], [1, 1, 2, 2]),
                person([1, 1, 4], [1, 1, 4, 4], [1, 1, 2, 2]),
                person([1, 1, float("nan"), 4], [1, 1, 4, 4], [1, 1, 2, 2]),
                {"tag": "person", "vbox": [1, 1, 4, 4]},
                "not an object",
                person([2, 2, 10, 20], [2, 2, 0, 0], [3, 2, 4, 4]),
            ],
        },
    ]
    path, folder = write_odgt(tmp_path, lines, {"good": (40, 40), "boxes": (40, 40)})
    src = OdgtSource(str(path), str(folder), "person", lines_per_partition=2)
    items = all_items(src)
    # the blank line is no item; every other line is one
    assert [i.item_id for i in items] == ["good", "line 2", "line 4", "line 5", "nolist", "boxes"]
    good, *bad, boxes = items
    assert good.instances == () and good.dropped_instances == {"degenerate": 1}
    assert boxes.dropped_instances == {"degenerate": 1, "malformed": 3, "missing_box": 1}
    # an empty visible box is no box: the person stays, without it
    assert boxes.instances == (Instance(Box(2, 2, 12, 22), "person", Box(2, 2, 12, 22), None),)

    verdicts = [read_item(i) for i in bad]
    assert [v.reason for v in verdicts] == ["bad_annotation"] * 4
    errors = [v.metrics["error"] for v in verdicts]
    assert f"{path} line 2: not JSON" in errors[0]
    assert "line 4: a list, not an object" in errors[1]
    assert "line 5: no ID" in errors[2]
    assert "line 6: gtboxes is missing or not a list" in errors[3]
    assert bad[3].location == str(folder / "nolist.jpg")

    # the good line's only person had no area: the image has no truth left
    assert check_instances(decoded(good)).reason == "no_instances"


def test_partitions_cover_every_item_once(tmp_path: Path) -> None:
    lines = [{"ID": f"img{n:02d}", "gtboxes": []} for n in range(11)]
    lines.insert(4, "")
    path, folder = write_odgt(tmp_path, lines, {})
    whole = all_items(OdgtSource(str(path), str(folder), "person", lines_per_partition=100))
    for step in (1, 2, 3, 5, 12):
        src = OdgtSource(str(path), str(folder), "person", lines_per_partition=step)
        parts = src.partitions()
        assert len(parts) == -(-12 // step)
        assert all_items(src) == whole
    assert [i.item_id for i in whole] == [f"img{n:02d}" for n in range(11)]

    images = [{"id": n, "file_name": f"{n}.jpg"} for n in range(7)]
    annotations = [ann(100, 42, 1, [1, 1, 2, 2])]
    coco, folder = write_coco(tmp_path / "coco", images, annotations)
    whole = all_items(CocoSource(str(coco), str(folder), "person"))
    assert [i.item_id for i in whole] == [str(n) for n in range(7)] + ["image_id 42"]
    for step in (1, 3, 8):
        src = CocoSource(str(coco), str(folder), "person", images_per_partition=step)
        assert src.partitions() == [(s, min(s + step, 8)) for s in range(0, 8, step)]
        assert all_items(src) == whole


def test_sources_pickle_without_their_parsed_state(tmp_path: Path) -> None:
    path, folder = simple_coco(tmp_path)
    coco = CocoSource(str(path), str(folder), "person")
    parts = coco.partitions()
    assert coco._index is not None
    copy = pickle.loads(pickle.dumps(coco))
    assert copy._index is None and copy == coco
    assert [i for p in parts for i in copy.items(p)] == all_items(coco)

    odgt_path, images = write_odgt(tmp_path / "odgt", [CROWD], {CROWD["ID"]: (80, 64)})
    odgt = OdgtSource(str(odgt_path), str(images), "person", box="visible")
    assert pickle.loads(pickle.dumps(odgt)) == odgt
    assert all_items(pickle.loads(pickle.dumps(odgt))) == all_items(odgt)


# ---------------------------------------------------------------- read, image and instances


def test_instances_survive_read_and_image_stages(tmp_path: Path) -> None:
    crowd = {
        "ID": "edge",
        "gtboxes": [
            person([-10, 5, 30, 50], [0, 5, 20, 30], [5, 5, 6, 6]),  # crosses the left edge
            person([60, 50, 40, 40], [60, 50, 40, 40], [62, 50, 5, 5]),  # crosses two edges
            person([90, 90, 10, 10], [90, 90, 10, 10], [92, 90, 3, 3]),  # wholly outside
            {"tag": "mask", "fbox": [0, 0, 8, 8], "vbox": [0, 0, 8, 8]},
        ],
    }
    path, folder = write_odgt(tmp_path, [crowd], {"edge": (80, 64)})
    (item,) = all_items(OdgtSource(str(path), str(folder), "person"))

    read = read_item(item)
    assert read.keep and read.value.instances == item.instances
    record = check_image(read.value).value
    assert (record.width, record.height) == (80, 64) and record.instances == item.instances

    verdict = check_instances(record)
    assert verdict.keep
    fitted = verdict.value
    assert fitted.boxes == (Box(0, 5, 20, 55), Box(60, 50, 80, 64))
    first, second, region = fitted.instances
    assert first.full == Box(-10, 5, 20, 55)  # the full extent keeps what lies past the edge
    assert second.visible == Box(60, 50, 80, 64)
    assert region.ignore and region.box == Box(0, 0, 8, 8)
    assert fitted.dropped_instances == {"outside_image": 1}
    assert verdict.metrics == {
        "instances": 3,
        "truths": 2,
        "ignored": 1,
        "clipped": 2,
        "dropped_instances": {"outside_image": 1},
    }


def test_check_instances_drops_records_without_truths() -> None:
    record = ImageRecord(
        "id",
        b"",
        40,
        30,
        "person",
        instances=(Instance(Box(0, 0, 9, 9), "mask", ignore=True), Instance(Box(50, 0, 60, 9))),
        dropped_instances={"degenerate": 2},
    )
    verdict = check_instances(record)
    assert verdict.reason == "no_instances"
    assert verdict.metrics["dropped_instances"] == {"degenerate": 2, "outside_image": 1}
    assert verdict.metrics["ignored"] == 1 and verdict.metrics["truths"] == 0
    with pytest.raises(ValueError, match="decoded record"):
        check_instances(ImageRecord("id", b"", 0, 0, "person"))


def test_fit_instances_leaves_inside_boxes_alone() -> None:
    inside = Instance(Box(1, 1, 5, 5), "person", Box(0, 0, 6, 6), Box(1, 1, 3, 3))
    assert fit_instances([inside], 10, 10) == ((inside,), 0, 0)


# ---------------------------------------------------------------- recipes and a whole run


def test_recipe_source_kinds(tmp_path: Path) -> None:
    path, folder = simple_coco(tmp_path)
    coco = parse_recipe(
        {
            "name": "c",
            "domain": "person",
            "source": {
                "kind": "coco",
                "annotations": "instances.json",
                "images": "images",
                "categories": ["person"],
            },
        },
        tmp_path,
    )
    assert coco.source.annotations == str(path.resolve())
    source = make_source(coco)
    assert isinstance(source, CocoSource)
    assert source.categories == ("person",) and source.images == str(folder.resolve())

    odgt = parse_recipe(
        {
            "name": "o",
            "domain": "person",
            "source": {"kind": "odgt", "annotations": "a.odgt", "images": "Images"},
        },
        tmp_path,
    )
    source = make_source(odgt)
    assert isinstance(source, OdgtSource)
    assert (source.box, source.tag) == ("full", "person")
    assert source.annotations == str(tmp_path / "a.odgt")


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"kind": "odgt", "annotations": "a", "images": "b", "box": "torso"}, "source.odgt.box"),
        ({"kind": "odgt", "annotations": "a", "images": "b", "tag": ""}, "source.odgt.tag"),
        ({"kind": "odgt", "images": "b"}, "source.odgt.annotations"),
        ({"kind": "coco", "annotations": "a"}, "source.coco.images"),
        ({"kind": "coco", "annotations": "a", "images": "b", "categories": []}, "categories"),
        ({"kind": "coco", "annotations": "a", "images": "b", "path": "c"}, "source.coco.path"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path: Path, source, field) -> None:
    path = tmp_path / "crowd.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "domain": "person", "source": source}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_odgt_recipe_runs_and_every_drop_has_a_reason(tmp_path: Path) -> None:
    lines = [
        {"ID": "crowd", "gtboxes": CROWD["gtboxes"]},
        {"ID": "alone", "gtboxes": [person([10, 8, 40, 44], [10, 8, 40, 44], [20, 8, 9, 9])]},
        {"ID": "nobody", "gtboxes": [person([10, 8, 0, 44], [10, 8, 0, 44], [20, 8, 9, 9])]},
        {"ID": "lost", "gtboxes": [person([10, 8, 40, 44], [10, 8, 40, 44], [20, 8, 9, 9])]},
        "not json at all",
    ]
    path, _ = write_odgt(
        tmp_path, lines, {"crowd": (80, 64), "alone": (64, 60), "nobody": (64, 60)}
    )
    recipe = parse_recipe(
        {
            "name": "crowd",
            "domain": "person",
            "source": {"kind": "odgt", "annotations": path.name, "images": "Images"},
        },
        tmp_path,
    )
    out = tmp_path / "out"
    result = run_recipe(recipe, str(out))

    funnel = {s.stage: s for s in result.funnel}
    assert list(funnel)[:4] == ["read", "image", "reference", "instances"]
    assert funnel["read"].total == 5
    for s in result.funnel:
        assert s.balanced, s
    rejections = pq.read_table(out / "rejections.parquet").to_pylist()
    reasons = Counter((r["stage"], r["reason"]) for r in rejections)
    assert reasons == {
        ("read", "not_found"): 1,
        ("read", "bad_annotation"): 1,
        ("instances", "no_instances"): 1,
        # a crowd is many known boxes: the single-entity path cannot take it
        ("box", "multiple_known_boxes"): 1,
    }
    details = {(r["stage"], r["reason"]): json.loads(r["detail"]) for r in rejections}
    assert details[("instances", "no_instances")]["dropped_instances"] == {"degenerate": 1}
    assert "not JSON" in details[("read", "bad_annotation")]["error"]
    assert result.manifest["samples"] == 1
    dropped = sum(s.dropped_total for s in result.funnel)
    assert funnel["read"].total == dropped + result.manifest["samples"]


@pytest.mark.parametrize("dedup", [True, False])
def test_an_image_listed_twice_gives_one_sample_and_a_duplicate_reference(
    tmp_path: Path, dedup: bool
) -> None:
    # COCO: two images[] entries name one file (with different boxes); odgt: one ID on two
    # lines. Neither may end the run, and neither may give two samples of one picture.
    coco_dir, odgt_dir = tmp_path / "coco", tmp_path / "odgt"
    images = [
        {"id": 1, "file_name": "street.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "street.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "park.jpg", "width": 64, "height": 48},
    ]
    anns = [ann(10, 1, 1, [2, 3, 10, 20]), ann(11, 2, 1, [30, 4, 8, 16])]
    anns.append(ann(12, 3, 1, [5, 5, 20, 20]))
    write_coco(coco_dir, images, anns)
    (coco_dir / "images" / "park.jpg").write_bytes(image_bytes(64, 48, seed=7))
    alone = {"gtboxes": [person([10, 8, 40, 44], [10, 8, 40, 44], [20, 8, 9, 9])]}
    other = {"gtboxes": [person([4, 4, 30, 30], [4, 4, 30, 30], [8, 4, 9, 9])]}
    write_odgt(odgt_dir, [{"ID": "a", **alone}, {"ID": "a", **other}], {"a": (64, 60)})
    sources = {
        coco_dir: {"kind": "coco", "annotations": "instances.json", "images": "images"},
        odgt_dir: {"kind": "odgt", "annotations": "annotation.odgt", "images": "Images"},
    }
    for root, source in sources.items():
        recipe = {
            "name": "twice",
            "domain": "person",
            "source": source,
            "detect": {"label": "person"},
            "dedup": {"enabled": dedup},
        }
        out = root / "out"
        result = run_recipe(parse_recipe(recipe, root), str(out))
        for s in result.funnel:
            assert s.balanced, s
        rows = pq.read_table(out / "rejections.parquet").to_pylist()
        repeated = [r for r in rows if r["reason"] == "duplicate_reference"]
        assert len(repeated) == 1 and repeated[0]["stage"] == "reference", rows
        assert Path(repeated[0]["source_id"]).name in {"street.jpg", "a.jpg"}
        locations = [
            loc for s in read_samples(str(out / "shards")) for loc in s.provenance.locations
        ]
        assert len(locations) == len(set(locations)) == (2 if root == coco_dir else 1)


def test_dropped_annotations_are_counted_in_the_manifest_and_kept_on_the_sample(
    tmp_path: Path,
) -> None:
    # street.jpg is 64x48 but the file says 128x96: the box at x=100 lies in the declared
    # image only, and disappears at the real size; it must be counted, and the size flagged.
    images = [
        {"id": 1, "file_name": "street.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "park.jpg", "width": 128, "height": 96},
    ]
    anns = [
        ann(10, 1, 1, [2, 3, 10, 20]),
        ann(11, 1, 1, [0, 0, 0, 5]),  # degenerate
        ann(12, 1, 7, [5, 5, 5, 5]),  # unknown category
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, "x", 2, 2]},  # malformed
        ann(14, 2, 1, [5, 5, 20, 20]),
        ann(15, 2, 1, [100, 70, 20, 20]),  # outside the real 64x48 image
    ]
    write_coco(tmp_path, images, anns)
    (tmp_path / "images" / "park.jpg").write_bytes(image_bytes(64, 48, seed=3))
    recipe = {
        "name": "counted",
        "domain": "person",
        "source": {"kind": "coco", "annotations": "instances.json", "images": "images"},
        "detect": {"label": "person", "min_box_side": 0},
    }
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(recipe, tmp_path), str(out))
    assert result.manifest["instances"] == {
        "dropped": {"degenerate": 1, "malformed": 1, "outside_image": 1, "unknown_category": 1},
        "size_mismatch": 1,
    }
    samples = {Path(s.provenance.locations[0]).name: s for s in read_samples(str(out / "shards"))}
    assert samples["street.jpg"].dropped_instances == {
        "degenerate": 1,
        "malformed": 1,
        "unknown_category": 1,
    }
    assert samples["park.jpg"].dropped_instances == {"outside_image": 1}
    assert len(samples["park.jpg"].gt_boxes) == 1
