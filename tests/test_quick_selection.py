"""--limit / --sample: the same items whatever the source kind and however it is partitioned."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from groundforge.examples import demo_recipe_path
from groundforge.pipelines.selection import Selection, SelectItems, count_selected
from groundforge.sources.annotations import CocoSource, OdgtSource
from groundforge.sources.hf_dataset import HFDatasetSource
from groundforge.sources.image_folder import ImageFolderSource

FLAGS = demo_recipe_path().parent / "data" / "flags"


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 7 % 256, 90, 40)).save(buf, "PNG")
    return buf.getvalue()


def smallest(ids: list[str], n: int) -> list[str]:
    """The spec, independently of the code: the n ids with the smallest sha256."""
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).digest())[:n]


def _head(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


def below(ids: list[str], fraction: float) -> list[str]:
    """The ids whose sha256, read as a fraction of its first 64 bits, is below ``fraction``."""
    return [i for i in ids if _head(i) < fraction * 2**64]


def check(source, selection: Selection, expected: list[str]) -> None:
    """On a real DirectRunner, ``selection`` of ``source`` gives exactly ``expected``'s ids."""
    p = beam.Pipeline()
    ids = (
        p
        | beam.Create(source.partitions())
        | beam.Reshuffle()
        | SelectItems(source, selection)
        | beam.Map(lambda item: item.item_id)
    )
    assert_that(ids, equal_to(expected))
    p.run().wait_until_finish()


def all_ids(source) -> list[str]:
    return [item.item_id for part in source.partitions() for item in source.items(part)]


def hf_source(tmp_path: Path, rows: int, **kw) -> HFDatasetSource:
    import datasets

    path = tmp_path / "hf"
    if not path.exists():
        ds = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": png(i), "path": None} for i in range(rows)],
                "label": [f"bird {i}" for i in range(rows)],
            }
        ).cast_column("image", datasets.Image(decode=False))
        ds.save_to_disk(str(path))
    return HFDatasetSource(str(path), entity_column="label", domain="bird", **kw)


def coco_source(tmp_path: Path, n: int, **kw) -> CocoSource:
    folder = tmp_path / "coco"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        (folder / f"{i}.png").write_bytes(png(i))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 24, "height": 16})
    doc = {
        "images": images,
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}
            for i in range(1, n + 1)
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    return CocoSource(str(tmp_path / "instances.json"), str(folder), "person", **kw)


def odgt_source(tmp_path: Path, n: int, **kw) -> OdgtSource:
    folder = tmp_path / "Images"
    folder.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        (folder / f"crowd{i}.jpg").write_bytes(png(i))
        box = [2, 2, 10, 8]
        lines.append({"ID": f"crowd{i}", "gtboxes": [{"tag": "person", "fbox": box, "vbox": box}]})
    path = tmp_path / "annotation.odgt"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return OdgtSource(str(path), str(folder), "person", **kw)


def folder_source(tmp_path: Path, n: int, **kw) -> ImageFolderSource:
    """The bundled flags (hundreds of files, whatever ``n``)."""
    return ImageFolderSource(root=str(FLAGS), domain="flag", **kw)


SOURCES = {
    "image_folder": (folder_source, "chunk_size"),
    "hf_dataset": (hf_source, "rows_per_partition"),
    "coco": (coco_source, "images_per_partition"),
    "odgt": (odgt_source, "lines_per_partition"),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_limit_takes_the_same_items_however_the_source_is_partitioned(tmp_path, kind):
    make, size_field = SOURCES[kind]
    sizes = (1, 3, 1000) if kind != "image_folder" else (7, 50, 1000)
    sources = [make(tmp_path, 12, **{size_field: size}) for size in sizes]
    ids = all_ids(sources[0])
    assert len(set(ids)) == len(ids) >= 12
    expected = smallest(ids, 5)
    for source in sources:
        check(source, Selection(limit=5), expected)
        check(source, Selection(sample=0.5), below(ids, 0.5))
        listed = (i for p in source.partitions() for i in source.items(p))
        assert count_selected(listed, Selection(limit=5)) == 5


def test_sample_keeps_about_its_fraction_and_a_larger_one_keeps_more(tmp_path):
    source = folder_source(tmp_path, 0, chunk_size=40)
    ids = all_ids(source)
    tenth = below(ids, 0.1)
    assert 0.05 * len(ids) < len(tenth) < 0.15 * len(ids)
    check(source, Selection(sample=0.1), tenth)
    # A larger fraction keeps every item a smaller one keeps.
    assert set(tenth) < set(below(ids, 0.3))
    check(source, Selection(sample=1.0), ids)


def test_a_limit_above_the_source_size_keeps_everything_and_an_empty_source_gives_nothing(
    tmp_path,
):
    source = coco_source(tmp_path, 4, images_per_partition=2)
    check(source, Selection(limit=100), all_ids(source))
    check(coco_source(tmp_path / "none", 0), Selection(limit=3), [])
    check(coco_source(tmp_path / "none", 0), Selection(sample=0.5), [])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "either --limit or --sample"),
        ({"limit": 2, "sample": 0.5}, "either --limit or --sample"),
        ({"limit": 0}, "at least 1"),
        ({"sample": 0.0}, "(0, 1]"),
        ({"sample": 1.5}, "(0, 1]"),
    ],
)
def test_bad_choices_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Selection(**kwargs)
