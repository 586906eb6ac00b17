"""Sources: image folders (naming, listing, metadata.jsonl), HF datasets, and read_item."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path, PurePath

import pytest
from PIL import Image

from groundforge.schemas.box import Box
from groundforge.schemas.records import SourceItem
from groundforge.sources.hf_dataset import HFDatasetSource, image_size
from groundforge.sources.image_folder import ImageFolderSource, NamingRule
from groundforge.sources.read import read_item

FLAGS = Path(__file__).resolve().parents[1] / "examples" / "data" / "flags"


def png(width: int = 8, height: int = 6, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or png())
    return path


def all_items(source) -> list[SourceItem]:
    return [item for part in source.partitions() for item in source.items(part)]


# ---------------------------------------------------------------- naming rules


@pytest.mark.parametrize(
    ("rule", "path", "expected"),
    [
        (NamingRule(), "africa/burkina_faso.png", "Burkina Faso"),
        (NamingRule(), "africa/chad.png", "Chad"),
        (NamingRule(), "x/guinea-bissau.png", "Guinea-Bissau"),
        (NamingRule(), "x/don't_panic.png", "Don't Panic"),
        (NamingRule(), "x/1st__place_.png", "1st Place"),
        (NamingRule(), "x/USA_flag.png", "Usa Flag"),
        (NamingRule(case="lower"), "x/Sea_Eagle.jpg", "sea eagle"),
        (NamingRule(case="keep"), "x/Sea_Eagle.jpg", "Sea Eagle"),
        (NamingRule(separators="_-"), "x/congo-brazzaville.png", "Congo Brazzaville"),
        (NamingRule(separators=""), "x/burkina_faso.png", "Burkina_faso"),
        (NamingRule(entity_from="parent"), "europe/united_kingdom/scotland.png", "United Kingdom"),
        (NamingRule(entity_from="parent"), "scotland.png", ""),
        (NamingRule(entity_from="none"), "x/chad.png", ""),
        (NamingRule(strip_pattern=r"_\d+$"), "x/aragon_01.png", "Aragon"),
        (
            NamingRule(strip_pattern=r"_\d+$"),
            "x/national_flag_of_canada1.png",
            "National Flag Of Canada1",
        ),
        (NamingRule(rename={"capeverde": "Cape Verde"}), "africa/capeverde.png", "Cape Verde"),
        # rename values are used as written, not re-cased
        (
            NamingRule(rename={"cote_divoire": "Côte d'Ivoire"}),
            "a/cote_divoire.png",
            "Côte d'Ivoire",
        ),
        # rename keys are matched after strip_pattern
        (
            NamingRule(strip_pattern=r"_\d+$", rename={"usa_missisipi": "Mississippi"}),
            "a/usa_missisipi_02.png",
            "Mississippi",
        ),
    ],
)
def test_naming_rule(rule: NamingRule, path: str, expected: str) -> None:
    assert rule.entity(PurePath(path)) == expected


def test_naming_rule_relative_to_root() -> None:
    rule = NamingRule(entity_from="parent")
    assert rule.entity(PurePath("/data/birds/sea_eagle/1.jpg"), "/data/birds") == "Sea Eagle"
    assert rule.entity(PurePath("/data/birds/1.jpg"), "/data/birds") == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entity_from": "folder"}, "entity_from must be one of"),
        ({"case": "upper"}, "case must be one of"),
        ({"strip_pattern": "(unclosed"}, "is not a regex"),
    ],
)
def test_naming_rule_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NamingRule(**kwargs)


# ---------------------------------------------------------------- image folder listing


def test_listing_is_sorted_chunked_and_skips_hidden(tmp_path: Path) -> None:
    for rel in [
        "b/zebra.png",
        "a/Eagle.JPG",
        "a/owl.jpeg",
        "top.webp",
        "b/c/deep.gif",
        ".hidden.png",
        "a/.secret.png",
        ".cache/inside.png",
        "a/notes.txt",
        "a/raw.heic",
    ]:
        write(tmp_path / rel)
    src = ImageFolderSource(root=str(tmp_path), domain="bird", naming=NamingRule(), chunk_size=2)
    expected = ["a/Eagle.JPG", "a/owl.jpeg", "b/c/deep.gif", "b/zebra.png", "top.webp"]
    assert src.list_files() == expected
    assert src.partitions() == [
        ("a/Eagle.JPG", "a/owl.jpeg"),
        ("b/c/deep.gif", "b/zebra.png"),
        ("top.webp",),
    ]
    items = all_items(src)
    assert [i.item_id for i in items] == expected
    assert [i.entity for i in items] == ["Eagle", "Owl", "Deep", "Zebra", "Top"]
    assert items[0] == SourceItem(
        item_id="a/Eagle.JPG",
        location=str(tmp_path / "a" / "Eagle.JPG"),
        domain="bird",
        entity="Eagle",
        source="image_folder",
    )
    # the same listing every time
    assert all_items(src) == items


def test_listing_options(tmp_path: Path) -> None:
    for rel in ["one.png", "sub/two.png", "sub/three.tif"]:
        write(tmp_path / rel)
    flat = ImageFolderSource(str(tmp_path), "x", NamingRule(), recursive=False)
    assert flat.list_files() == ["one.png"]
    only_tif = ImageFolderSource(str(tmp_path), "x", NamingRule(), extensions=("TIF",))
    assert only_tif.list_files() == ["sub/three.tif"]
    excluding = ImageFolderSource(str(tmp_path), "x", NamingRule(), exclude=("sub/t*.png",))
    assert excluding.list_files() == ["one.png", "sub/three.tif"]
    assert ImageFolderSource(str(tmp_path), "x", exclude=["*.png"]).list_files() == [
        "sub/three.tif"
    ]


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "imgs" / "a.png")
    monkeypatch.chdir(tmp_path)
    src = ImageFolderSource("imgs", "x", NamingRule())
    assert src.root == str(tmp_path / "imgs")
    assert [i.location for i in all_items(src)] == [str(tmp_path / "imgs" / "a.png")]


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    write(tmp_path / "real" / "a.png")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)
    src = ImageFolderSource(str(tmp_path), "x", NamingRule())
    assert src.list_files() == ["alias/a.png", "real/a.png"]


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    src = ImageFolderSource(str(tmp_path / "nowhere"), "x", NamingRule())
    with pytest.raises(FileNotFoundError, match="nowhere does not exist; check the source path"):
        src.partitions()
    write(tmp_path / "file.png")
    with pytest.raises(NotADirectoryError, match="file.png is a file"):
        ImageFolderSource(str(tmp_path / "file.png"), "x", NamingRule()).partitions()


def test_odd_entries_are_listed_then_rejected(tmp_path: Path) -> None:
    write(tmp_path / "good.png", png(4, 3))
    (tmp_path / "folder.png").mkdir()
    write(tmp_path / "folder.png" / "inner.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    write(tmp_path / "deleted.png")
    src = ImageFolderSource(str(tmp_path), "x", NamingRule())
    items = {i.item_id: i for i in all_items(src)}
    assert sorted(items) == [
        "dangling.png",
        "deleted.png",
        "folder.png",
        "folder.png/inner.png",
        "good.png",
    ]
    (tmp_path / "deleted.png").unlink()  # gone between listing and reading

    verdicts = {k: read_item(item) for k, item in items.items()}
    assert verdicts["good.png"].keep
    assert verdicts["folder.png/inner.png"].keep

    folder = verdicts["folder.png"]
    assert (folder.keep, folder.reason) == (False, "unreadable")
    assert folder.metrics["location"] == str(tmp_path / "folder.png")
    assert folder.metrics["error"].startswith("IsADirectoryError: [Errno 21] Is a directory")

    dangling = verdicts["dangling.png"]
    assert (dangling.keep, dangling.reason) == (False, "unreadable")
    assert dangling.metrics == {
        "location": str(tmp_path / "dangling.png"),
        "error": f"dangling symlink to {tmp_path / 'gone.png'}",
    }

    deleted = verdicts["deleted.png"]
    assert (deleted.keep, deleted.reason) == (False, "not_found")
    assert deleted.metrics["location"] == str(tmp_path / "deleted.png")
    assert deleted.metrics["error"].startswith("FileNotFoundError: [Errno 2] No such file")


# ---------------------------------------------------------------- metadata.jsonl


def test_metadata_overrides(tmp_path: Path) -> None:
    chad, mali, niger = png(color=(1, 1, 1)), png(color=(2, 2, 2)), png(color=(3, 3, 3))
    write(tmp_path / "africa" / "chad.png", chad)
    write(tmp_path / "africa" / "mali.png", mali)
    write(tmp_path / "africa" / "niger.png", niger)
    lines = [
        {
            "path": "africa/chad.png",
            "entity": "Republic of Chad",
            "url": "https://x/chad",
            "license": None,
            "query": "chad flag",
        },
        {
            "sha256": hashlib.sha256(mali).hexdigest().upper(),
            "author": "A. Person",
            "license": "CC-BY-4.0",
            "domain": "banner",
        },
        # matched by path and by sha256: the path line wins where both set a field
        {"sha256": hashlib.sha256(chad).hexdigest(), "author": "B", "url": "https://y"},
        {"path": "./africa/niger.png", "entity": "Old"},
        {"path": "africa/niger.png", "entity": "Niger Republic"},
        {"path": "africa/absent.png", "entity": "Nobody"},
    ]
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8"
    )
    src = ImageFolderSource(str(tmp_path), "flag", NamingRule(), license="public-domain")
    items = {i.item_id: i for i in all_items(src)}
    assert sorted(items) == ["africa/chad.png", "africa/mali.png", "africa/niger.png"]

    c, m, n = items["africa/chad.png"], items["africa/mali.png"], items["africa/niger.png"]
    assert (c.entity, c.license, c.author, c.url, c.domain) == (
        "Republic of Chad",
        "public-domain",
        "B",
        "https://x/chad",
        "flag",
    )
    assert (m.entity, m.license, m.author, m.url, m.domain) == (
        "Mali",
        "CC-BY-4.0",
        "A. Person",
        "",
        "banner",
    )
    assert (n.entity, n.license, n.author, n.url, n.domain) == (
        "Niger Republic",
        "public-domain",
        "",
        "",
        "flag",
    )
    # files were hashed for the sha256 lines, so their bytes come along and are not read twice
    assert (c.data, m.data, n.data) == (chad, mali, niger)
    record = read_item(m).value
    assert (record.image_id, record.author, record.domain) == (
        hashlib.sha256(mali).hexdigest(),
        "A. Person",
        "banner",
    )


def test_metadata_with_paths_only_does_not_read_files(tmp_path: Path) -> None:
    write(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"path": "a.png", "entity": "Eh"}\n')
    [item] = all_items(ImageFolderSource(str(tmp_path), "x", NamingRule()))
    assert (item.entity, item.data) == ("Eh", None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"metadata.jsonl, line 2: not JSON"),
        ('["a.png"]', r"line 2: expected a JSON object, got list"),
        ('{"entity": "x"}', r"line 2: give the file as \"path\" or \"sha256\""),
        ('{"path": "a.png", "entity": 3}', r"line 2: 'entity' must be a string, got 3"),
        ('{"path": "../a.png"}', r"line 2: path '../a.png' must be relative"),
    ],
)
def test_bad_metadata_fails_on_the_driver(tmp_path: Path, line: str, message: str) -> None:
    write(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"path": "a.png"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        ImageFolderSource(str(tmp_path), "x", NamingRule()).partitions()


# ---------------------------------------------------------------- the bundled flags


def test_bundled_flags() -> None:
    src = ImageFolderSource(root=str(FLAGS), domain="flag", naming=NamingRule(entity_from="stem"))
    direct = sorted(
        os.path.relpath(os.path.join(folder, f), FLAGS).replace(os.sep, "/")
        for folder, _, files in os.walk(FLAGS)
        for f in files
        if f.lower().endswith(".png")
    )
    items = all_items(src)
    assert [i.item_id for i in items] == direct
    assert len(items) == 355
    by_id = {i.item_id: i for i in items}
    assert by_id["africa/chad.png"].entity == "Chad"
    assert by_id["africa/chad.png"].location == str(FLAGS / "africa" / "chad.png")
    # The folder's metadata.jsonl names every file; a written name wins over the naming rule.
    assert by_id["europe/bosnia_and_herzegovina.png"].entity == "Bosnia and Herzegovina"

    renamed = ImageFolderSource(
        str(FLAGS), "flag", NamingRule(rename={"capeverde": "Cabo Verde"}), license="pd"
    )
    cape = next(i for i in all_items(renamed) if i.item_id == "africa/capeverde.png")
    assert (cape.entity, cape.license) == ("Cape Verde", "pd")
    verdicts = [read_item(i) for i in items]
    assert all(v.keep for v in verdicts)
    chad = by_id["africa/chad.png"]
    assert verdicts[direct.index("africa/chad.png")].value.image == Path(chad.location).read_bytes()


# ---------------------------------------------------------------- read_item


def test_read_item_copies_fields(tmp_path: Path) -> None:
    data = png(5, 4)
    path = write(tmp_path / "x.png", data)
    item = SourceItem(
        item_id="x.png",
        location=str(path),
        domain="flag",
        entity="Chad",
        boxes=(Box(0, 0, 2, 2),),
        source="image_folder",
        license="cc0",
        author="me",
        url="https://u",
    )
    verdict = read_item(item)
    assert verdict.keep
    r = verdict.value
    assert (r.image, r.image_id, r.width, r.height) == (
        data,
        hashlib.sha256(data).hexdigest(),
        0,
        0,
    )
    assert (r.domain, r.entity, r.boxes, r.source, r.location, r.license, r.author, r.url) == (
        "flag",
        "Chad",
        (Box(0, 0, 2, 2),),
        "image_folder",
        str(path),
        "cc0",
        "me",
        "https://u",
    )
    # bytes the source already holds win over the location
    held = read_item(SourceItem("y", "/does/not/exist.png", "flag", data=b"abc")).value
    assert (held.image, held.location) == (b"abc", "/does/not/exist.png")


def test_read_item_keeps_compressed_looking_names_raw(tmp_path: Path) -> None:
    path = write(tmp_path / "x.png.gz", b"not gzip at all")
    assert read_item(SourceItem("x", str(path), "d")).value.image == b"not gzip at all"


def test_read_item_drop_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_item(SourceItem("a", "", "d")).reason == "missing_image"
    row = read_item(SourceItem("b", "/data/birds#train/7", "d"))
    assert (row.reason, row.metrics) == ("missing_image", {"location": "/data/birds#train/7"})

    missing = read_item(SourceItem("c", str(tmp_path / "nope.png"), "d"))
    assert missing.reason == "not_found"

    scheme = read_item(SourceItem("d", "nosuchscheme://bucket/a.png", "d"))
    assert scheme.reason == "unreadable"
    assert scheme.metrics["error"].startswith("ValueError: Unable to get filesystem")

    from apache_beam.io.filesystems import FileSystems

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(FileSystems, "open", staticmethod(denied))
    locked = read_item(SourceItem("e", "/srv/locked.png", "d"))
    assert (locked.reason, locked.metrics) == (
        "unreadable",
        {
            "location": "/srv/locked.png",
            "error": "PermissionError: [Errno 13] Permission denied: '/srv/locked.png'",
        },
    )

    class NotFound(Exception):  # what the GCS client raises for a missing object
        pass

    def absent(path, *args, **kwargs):
        raise NotFound(f"{path} not found")

    monkeypatch.setattr(FileSystems, "open", staticmethod(absent))
    assert read_item(SourceItem("f", "gs://b/a.png", "d")).reason == "not_found"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_read_item_permission_denied_on_disk(tmp_path: Path) -> None:
    path = write(tmp_path / "locked.png")
    path.chmod(0)
    try:
        verdict = read_item(SourceItem("x", str(path), "d"))
    finally:
        path.chmod(0o644)
    assert verdict.reason == "unreadable"
    assert verdict.metrics["error"].startswith("PermissionError")


# ---------------------------------------------------------------- HF datasets


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep load_dataset's Arrow cache inside the test's folder."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


IMAGES = [png(8, 6, (i * 40, 0, 0)) for i in range(4)] + [png(20, 10, (0, 0, 9))]
NAMES = ["sparrow", "eagle", "owl"]
LABELS = [2, 0, 1, 2, 1]
XYWH = [[1, 2, 3, 4], [0, 0, 8, 6], [2.5, 1, 1, 1], [0, 0, 1, 1], [10, 5, 5, 5]]


def bird_dataset(none_at: int | None = 3):
    import datasets

    images = [{"bytes": b, "path": None} for b in IMAGES]
    if none_at is not None:
        images[none_at] = None
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": LABELS, "bbox": XYWH, "note": ["n"] * len(IMAGES)}
    )
    return ds.cast_column("image", datasets.Image()).cast_column(
        "label", datasets.ClassLabel(names=NAMES)
    )


def bird_source(path: str, **settings) -> HFDatasetSource:
    """The HF source the bird tests share: ClassLabel entities and xywh boxes."""
    return HFDatasetSource(
        path=path,
        entity_column="label",
        domain="bird",
        box_column="bbox",
        box_format="xywh",
        license="cc0",
        rows_per_partition=2,
        **settings,
    )


def check_birds(src: HFDatasetSource, path: str, split: str = "train") -> None:
    parts = src.partitions()
    assert parts == [(0, 2), (2, 4), (4, 5)]
    items = [item for part in parts for item in src.items(part)]
    assert [i.item_id for i in items] == [f"{split}/{n}" for n in range(5)]
    assert [i.location for i in items] == [f"{path}#{split}/{n}" for n in range(5)]
    assert [i.entity for i in items] == ["owl", "sparrow", "eagle", "owl", "eagle"]
    assert [i.data for i in items] == [IMAGES[0], IMAGES[1], IMAGES[2], None, IMAGES[4]]
    assert [i.boxes for i in items] == [
        (Box(1, 2, 4, 6),),
        (Box(0, 0, 8, 6),),
        (Box(2.5, 1, 3.5, 2),),
        (Box(0, 0, 1, 1),),
        (Box(10, 5, 15, 10),),
    ]
    assert {(i.domain, i.source, i.license) for i in items} == {("bird", "hf_dataset", "cc0")}
    verdicts = [read_item(i) for i in items]
    assert [v.reason for v in verdicts] == [None, None, None, "missing_image", None]
    assert verdicts[0].value.image_id == hashlib.sha256(IMAGES[0]).hexdigest()


def test_hf_saved_to_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "birds")
    bird_dataset().save_to_disk(path)
    src = bird_source(path)
    check_birds(src, path)


def test_hf_dataset_dict_split(tmp_path: Path) -> None:
    import datasets

    path = str(tmp_path / "dd")
    datasets.DatasetDict({"train": bird_dataset(None), "test": bird_dataset()}).save_to_disk(path)
    src = bird_source(path, split="test")
    check_birds(src, path, split="test")
    with pytest.raises(ValueError, match=r"has no split 'val'; its splits are \['test', 'train'\]"):
        HFDatasetSource(path=path, split="val").partitions()


@pytest.mark.parametrize("as_glob", [False, True])
def test_hf_parquet_folder(tmp_path: Path, hf_cache: Path, as_glob: bool) -> None:
    folder = tmp_path / "pq"
    bird_dataset().to_parquet(str(folder / "part-0.parquet"))
    path = str(folder / "*.parquet") if as_glob else str(folder)
    src = bird_source(path)
    check_birds(src, path)
    assert hf_cache.is_dir()


def test_hf_parquet_via_load_dataset_matches(tmp_path: Path, hf_cache: Path) -> None:
    import datasets

    folder = tmp_path / "pq"
    bird_dataset().to_parquet(str(folder / "part-0.parquet"))
    direct = datasets.load_dataset(
        "parquet", data_files={"train": str(folder / "*.parquet")}, split="train"
    )
    src = HFDatasetSource(path=str(folder), entity_column="label", domain="bird")
    items = all_items(src)
    names = direct.features["label"].names
    assert [i.entity for i in items] == [names[x] for x in direct["label"]]


def test_hf_image_paths_are_read(tmp_path: Path, hf_cache: Path) -> None:
    import datasets

    on_disk = write(tmp_path / "files" / "a.png", png(3, 3))
    gone = tmp_path / "files" / "gone.png"
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": str(on_disk)}], "label": ["kite"]}
    ).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "pq" / "a.parquet"))
    write(gone)  # to_parquet measures the file, so it must exist while writing
    ds2 = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": str(gone)}], "label": ["crow"]}
    ).cast_column("image", datasets.Image())
    ds2.to_parquet(str(tmp_path / "pq" / "b.parquet"))
    gone.unlink()

    src = HFDatasetSource(path=str(tmp_path / "pq"), entity_column="label", domain="bird")
    kite, crow = all_items(src)
    assert (kite.entity, kite.data, kite.location) == ("kite", on_disk.read_bytes(), str(on_disk))
    assert (crow.entity, crow.data, crow.location) == ("crow", None, str(gone))
    assert read_item(kite).keep
    assert read_item(crow).reason == "not_found"


def test_hf_norm01_nested_boxes_and_ids(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "img": [png(200, 100), b"not an image"],
            "key": ["img-a", "img-b"],
            "kind": ["raptor", "raptor"],
            "objects": [
                {"bbox": [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], "category": [0, 1]},
                {"bbox": [[0.1, 0.1, 0.2, 0.2]], "category": [0]},
            ],
        }
    )
    path = str(tmp_path / "raw")
    ds.save_to_disk(path)
    src = HFDatasetSource(
        path=path,
        image_column="img",
        domain_column="kind",
        domain="bird",
        id_column="key",
        box_column="objects.bbox",
        box_format="xyxy",
        box_scale="norm01",
    )
    a, b = all_items(src)
    assert (a.item_id, a.domain, a.data) == ("img-a", "raptor", png(200, 100))
    assert a.boxes == (Box(20, 20, 100, 60), Box(0, 0, 200, 100))
    # no size without a readable header: no boxes; the image filter rejects such bytes anyway
    assert (b.item_id, b.boxes, b.data) == ("img-b", (), b"not an image")
    assert image_size(png(7, 5)) == (7, 5)


def test_hf_bad_settings_fail_on_the_driver(tmp_path: Path) -> None:
    path = str(tmp_path / "birds")
    bird_dataset().save_to_disk(path)
    with pytest.raises(
        ValueError,
        match=r"has no column 'species' \(from entity_column\); "
        r"its columns are \['image', 'label', 'bbox', 'note'\]",
    ):
        HFDatasetSource(path=path, entity_column="species").partitions()
    with pytest.raises(ValueError, match=r"row train/0: note = 'n' is neither a box"):
        HFDatasetSource(path=path, box_column="note").partitions()
    with pytest.raises(ValueError, match="column 'label' of dataset .* not images"):
        HFDatasetSource(path=path, image_column="label").partitions()
    with pytest.raises(ValueError, match="box_format must be one of"):
        HFDatasetSource(path=path, box_format="cxcywh")
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder"):
        HFDatasetSource(path=str(tmp_path / "absent")).partitions()


def test_one_malformed_box_rejects_its_row_only(tmp_path: Path) -> None:
    import datasets

    def source(boxes, name):
        ds = datasets.Dataset.from_dict({"image": [png(8, 8)] * len(boxes), "bbox": boxes})
        ds.save_to_disk(str(tmp_path / name))
        return HFDatasetSource(path=str(tmp_path / name), box_column="bbox", domain="x")

    # The first row malformed, one in the middle too: each is its own bad_annotation.
    src = source([[1, 2], [1, 2, 5, 6], [0, 0, 1], [2, 2, 6, 6]], "rows")
    items = all_items(src)
    assert [i.boxes for i in items] == [(), (Box(1, 2, 5, 6),), (), (Box(2, 2, 6, 6),)]
    verdicts = [read_item(i) for i in items]
    assert [v.reason for v in verdicts] == ["bad_annotation", None, "bad_annotation", None]
    assert "row train/0: bbox = [1, 2] is neither a box" in verdicts[0].metrics["error"]
    # No readable box in any of the first rows: a wrong box_column, said before any work.
    with pytest.raises(ValueError, match="neither a box"):
        source([[1, 2]] * 3, "none").partitions()


# ---------------------------------------------------------------- pickling


def test_sources_pickle_and_work_after(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "b_c.png", png(color=(5, 5, 5)))
    (tmp_path / "imgs" / "metadata.jsonl").write_text('{"path": "b_c.png", "author": "Z"}\n')
    folder = ImageFolderSource(str(tmp_path / "imgs"), "x", NamingRule(rename={"b_c": "Bc"}))
    parts = folder.partitions()
    assert folder._metadata is not None
    clone = pickle.loads(pickle.dumps(folder))
    assert clone._metadata is None and clone == folder
    [item] = [i for p in pickle.loads(pickle.dumps(parts)) for i in clone.items(p)]
    assert (item.entity, item.author) == ("Bc", "Z")

    path = str(tmp_path / "birds")
    bird_dataset().save_to_disk(path)
    hf = HFDatasetSource(path=path, entity_column="label", domain="bird", rows_per_partition=2)
    parts = hf.partitions()
    assert hf._dataset is not None
    blob = pickle.dumps(hf)
    assert len(blob) < 2000  # the loaded dataset does not travel
    clone = pickle.loads(blob)
    assert clone._dataset is None and clone == hf
    items = [i for p in parts for i in clone.items(p)]
    assert [i.entity for i in items] == ["owl", "sparrow", "eagle", "owl", "eagle"]
    assert [i.data for i in items] == [IMAGES[0], IMAGES[1], IMAGES[2], None, IMAGES[4]]


def test_bound_items_survive_beams_pickler(tmp_path: Path) -> None:
    from apache_beam.internal import pickler

    write(tmp_path / "imgs" / "kite.png")
    folder = ImageFolderSource(str(tmp_path / "imgs"), "x", NamingRule())
    [part] = folder.partitions()
    assert [i.entity for i in pickler.loads(pickler.dumps(folder.items))(part)] == ["Kite"]

    bird_dataset().save_to_disk(str(tmp_path / "birds"))
    hf = HFDatasetSource(path=str(tmp_path / "birds"), entity_column="label", domain="bird")
    [part] = hf.partitions()
    items = pickler.loads(pickler.dumps(hf.items))
    assert items.__self__._dataset is None
    assert [i.entity for i in items(part)] == ["owl", "sparrow", "eagle", "owl", "eagle"]


def test_a_link_out_of_the_folder_is_refused_unless_allowed(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    write(root / "inside.png", png())
    write(elsewhere / "secret.png", png(color=(1, 2, 3)))
    (root / "out.png").symlink_to(elsewhere / "secret.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "same.png").symlink_to(root / "inside.png")  # stays inside: fine
    (root / "metadata.jsonl").write_text('{"sha256": "00", "author": "A"}\n')
    items = {i.item_id: i for i in all_items(ImageFolderSource(str(root), "x", NamingRule()))}
    assert sorted(items) == ["inside.png", "linked/secret.png", "out.png", "same.png"]
    verdicts = {k: read_item(i) for k, i in items.items()}
    assert {k: v.reason for k, v in verdicts.items()} == {
        "inside.png": None,
        "same.png": None,
        "out.png": "outside_source",
        "linked/secret.png": "outside_source",
    }
    assert items["out.png"].data is None  # never read, not even to hash it
    assert "follow_outside_links" in verdicts["out.png"].metrics["error"]
    allowed = ImageFolderSource(str(root), "x", NamingRule(), follow_outside_links=True)
    assert all(read_item(i).keep for i in all_items(allowed))
