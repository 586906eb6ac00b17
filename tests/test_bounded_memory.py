"""What keeps a run's memory independent of its size: parked pixels, batched shard writes,
rejections written in parts and merged by streaming."""

from __future__ import annotations

import io
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image

import groundforge.pipelines.stage as stage_module
from groundforge.outputs.files import write_table
from groundforge.outputs.rejections import (
    iter_rejections,
    merge_rejections,
    part_name,
)
from groundforge.pipelines.kvg import WORK_DIR
from groundforge.pipelines.run import run_recipe
from groundforge.pixels import PixelStore, image_bytes, with_pixels
from groundforge.recipe import parse_recipe
from groundforge.schemas.arrow import REJECTION_SCHEMA, rejection_to_row
from groundforge.schemas.records import ImageRecord, KVGSample, Rejection


def _png(colour, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def test_park_is_content_addressed_and_loads_back(tmp_path):
    store = PixelStore(str(tmp_path / "pixels"))
    data = _png((10, 20, 30))
    record = ImageRecord("src-id", data, 40, 30, "flag", location="a.png")
    parked = store.parked(record)
    assert parked.image == b"" and parked.image_ref.startswith(str(tmp_path / "pixels"))
    assert image_bytes(parked) == data and with_pixels(parked).image == data
    # The same pixels under another record share one file; parking twice changes nothing.
    other = store.parked(ImageRecord("other", data, 40, 30, "flag", location="b.png"))
    assert other.image_ref == parked.image_ref
    assert store.parked(parked) is parked
    assert len([p for p in (tmp_path / "pixels").rglob("*") if p.is_file()]) == 1
    assert image_bytes(ImageRecord("x", b"", 0, 0, "flag")) == b""


def test_write_table_streams_rows_in_batches(tmp_path):
    schema = pa.schema([("i", pa.int64()), ("blob", pa.binary())])
    made = []

    def rows():
        for i in range(150):
            made.append(i)
            yield {"i": i, "blob": bytes([i % 256]) * 10}

    path = str(tmp_path / "t.arrow")
    assert write_table(path, rows(), schema, "arrow", batch_rows=64) == 150
    with open(path, "rb") as fh:
        batches = list(ipc.open_stream(fh))
    assert [b.num_rows for b in batches] == [64, 64, 22]
    path = str(tmp_path / "t.parquet")
    assert write_table(path, iter([]), schema, "parquet") == 0
    assert pq.read_table(path).num_rows == 0


def _rejections(n: int) -> list[Rejection]:
    reasons = [("image", "not_an_image"), ("dedup", "duplicate_exact"), ("box", "no_box")]
    return [Rejection(f"id{i:04d}", *reasons[i % 3], "{}", f"loc{i}") for i in range(n)]


def _write_parts(folder: Path, rejections: list[Rejection], buckets: int) -> None:
    groups: dict = {}
    for r in rejections:
        bucket = sum(r.item_id.encode()) % buckets
        groups.setdefault((r.stage, r.reason, bucket), []).append(r)
    folder.mkdir(parents=True, exist_ok=True)
    for (stage, reason, bucket), group in groups.items():
        rows = [rejection_to_row(r) for r in sorted(group, key=lambda r: r.item_id)]
        write_table(
            str(folder / part_name(stage, reason, bucket)), rows, REJECTION_SCHEMA, "parquet"
        )


def test_merged_rejections_are_complete_grouped_and_deterministic(tmp_path):
    rejections = _rejections(300)
    shuffled = rejections[:]
    random.Random(3).shuffle(shuffled)
    outputs = []
    for name, rows in (("a", rejections), ("b", shuffled)):
        parts = tmp_path / name / "parts"
        _write_parts(parts, rows, buckets=4)
        path = str(tmp_path / name / "rejections.parquet")
        merge_rejections(str(parts), path)
        assert not parts.exists()
        outputs.append(Path(path).read_bytes())
        merged = list(iter_rejections(path))
        assert sorted(merged, key=lambda r: r.item_id) == rejections
        keys = [(r.stage, r.reason) for r in merged]
        assert keys == sorted(keys)  # grouped by stage, then reason
    assert outputs[0] == outputs[1]


def test_merge_of_no_parts_is_an_empty_table(tmp_path):
    path = str(tmp_path / "rejections.parquet")
    merge_rejections(str(tmp_path / "nothing"), path)
    assert pq.read_table(path).num_rows == 0


@pytest.fixture()
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    rng = random.Random(0)
    for i in range(12):
        image = Image.new("RGB", (64, 48), (250, 250, 250))
        colour = tuple(rng.randrange(200) for _ in range(3))
        image.paste(Image.new("RGB", (30 + i, 20 + i % 5), colour), (8 + i, 10))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=95)
        (root / f"thing_{i // 2}__{i}.jpg").write_bytes(out.getvalue())
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_no_stage_after_the_image_check_holds_pixels(photo_folder, tmp_path, monkeypatch):
    """Records and samples cross every shuffle as references: a stage after the image check
    never receives image bytes, and the shards still hold every image."""
    seen: dict[str, list[int]] = {}
    process = stage_module.CheckStage.process

    def spy(self, item, **side_inputs):
        if self.stage == "compose":  # (scene id, {"plan": ..., "members": [(slot, record)]})
            held = [record for _, record in item[1]["members"]]
        else:
            held = [stage_module.unwrap(item)]
        for record in held:
            if isinstance(record, ImageRecord | KVGSample):
                seen.setdefault(self.stage, []).append(len(record.image))
        yield from process(self, item, **side_inputs)

    monkeypatch.setattr(stage_module.CheckStage, "process", spy)
    recipe = parse_recipe(
        {
            "name": "parked",
            "domain": "thing",
            "source": {
                "kind": "image_folder",
                "path": str(photo_folder),
                "strip_pattern": r"__\d+$",
            },
            "boxes": {"method": "foreground", "foreground_tolerance": 24},
            "scenes": {"scenes_per_image": 1},
        },
        tmp_path,
    )
    out = tmp_path / "run"
    result = run_recipe(recipe, str(out))
    assert {"image", "dedup", "scene_pool", "compose", "output"} <= set(seen)
    assert all(n > 0 for n in seen["image"])  # the check itself decodes the source bytes
    for stage in seen.keys() - {"read", "image"}:
        assert seen[stage] and set(seen[stage]) == {0}, stage
    assert not (out / WORK_DIR).exists()
    ds = datasets.load_from_disk(str(out / "shards"))
    rows = [row for split in ds for row in ds[split]]
    assert len(rows) == result.manifest["samples"] == 12
    assert all(row["image"].size == (row["width"], row["height"]) for row in rows)
    reasons = {r.reason for r in iter_rejections(str(out / "rejections.parquet"))}
    assert reasons == {"not_an_image"}


def test_stale_work_of_an_interrupted_run_never_mixes_in(photo_folder, tmp_path):
    recipe = parse_recipe(
        {
            "name": "stale",
            "domain": "thing",
            "source": {"kind": "image_folder", "path": str(photo_folder)},
            "boxes": {"method": "foreground", "foreground_tolerance": 24},
        },
        tmp_path,
    )
    out = tmp_path / "run"
    # What a killed run leaves behind: a rejection part for a reason this run has no drop of.
    stale = out / WORK_DIR / "rejections"
    _write_parts(stale, [Rejection("ghost", "box", "no_box", "{}", "gone.jpg")], buckets=1)
    run_recipe(recipe, str(out))
    ids = {r.item_id for r in iter_rejections(str(out / "rejections.parquet"))}
    assert "ghost" not in ids and len(ids) == 1
