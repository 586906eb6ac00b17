"""Scenes, dedup and decontamination inside the pipeline, on small folders of real flags."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from groundforge.examples import demo_recipe_path
from groundforge.filters.image import check_image
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.schemas.records import ImageRecord, sha256_hex

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = [
    "africa/chad.png",
    "europe/romania.png",
    "europe/andorra.png",
    "africa/mali.png",
    "africa/guinea.png",
    "europe/italy/italy.png",
    "europe/france/france.png",
    "europe/belgium/belgium.png",
]


def copy_flags(folder: Path, names=NAMES) -> Path:
    for name in names:
        target = folder / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FLAGS / name, target)
    return folder


def recipe(folder: Path, **sections) -> dict:
    return {
        "name": "scenes",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(folder)},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        "scenes": {"cell_size": 96, "max_side": 640},
        **sections,
    }


def rejections(out: Path) -> list[dict]:
    return pq.read_table(out / "rejections.parquet").to_pylist()


def as_jpeg(path: Path) -> bytes:
    """A re-encoded copy of the image as the pipeline sees it (transparency on white)."""
    data = path.read_bytes()
    upright = check_image(ImageRecord(sha256_hex(data), data, 0, 0, "flag")).value
    buf = io.BytesIO()
    Image.open(io.BytesIO(upright.image)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_benchmark_images_are_kept_out(tmp_path):
    images = copy_flags(tmp_path / "images")
    bench = {
        "question_id": ["q-7", "q-9"],
        "category": ["flag", "flag"],
        "question": ["Find Chad", "Find Mali"],
        "answer": ["<|box_start|>(0,0),(999,999)<|box_end|>"] * 2,
        "image": [
            {"bytes": (images / "chad.png").read_bytes(), "path": None},
            {"bytes": as_jpeg(images / "mali.png"), "path": None},  # a re-encoded copy
        ],
    }
    pq.write_table(pa.table(bench), tmp_path / "bench.parquet")
    out = tmp_path / "out"
    result = run_recipe(
        parse_recipe(recipe(images, decontaminate={"benchmarks": ["bench.parquet"]}), tmp_path),
        str(out),
    )
    stage = {s.stage: s for s in result.funnel}["decontaminate"]
    assert (stage.total, stage.dropped) == (len(NAMES), {"contaminated": 2})
    dropped = {
        Path(r["source_id"]).name: json.loads(r["detail"])["benchmark_id"]
        for r in rejections(out)
        if r["reason"] == "contaminated"
    }
    assert dropped == {"chad.png": "bench.parquet:q-7", "mali.png": "bench.parquet:q-9"}
    names = {e.name for s in read_samples(str(out / "shards")) for e in s.entities}
    assert "Chad" not in names and "Mali" not in names and "Romania" in names


def test_a_pool_of_one_entity_makes_no_scene(tmp_path):
    images = tmp_path / "images"
    copy_flags(images / "flag", NAMES[:3])
    copy_flags(images / "lonely", ["africa/mali.png"])
    data = recipe(images)
    data["source"]["entity_from"] = "parent"
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(data, tmp_path), str(out))
    pool = {s.stage: s for s in result.funnel}["scene_pool"]
    # Two entities ("Flag" with three images, "Lonely" with one): scenes can be made.
    assert pool.dropped == {}
    data["source"]["exclude"] = ["lonely/*"]
    result = run_recipe(parse_recipe(data, tmp_path), str(out))
    pool = {s.stage: s for s in result.funnel}["scene_pool"]
    assert (pool.total, pool.dropped) == (3, {"scene_pool_too_small": 3})
    assert result.manifest["samples"] == 0


def test_held_out_domains_and_text_similarity(tmp_path):
    images = copy_flags(tmp_path / "images")
    data = recipe(
        images,
        split={"val_domains": ["flag"]},
        scenes={"cell_size": 96, "max_side": 640, "similarity": "text", "queries_per_scene": 3},
    )
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(data, tmp_path), str(out))
    samples = list(read_samples(str(out / "shards")))
    assert result.manifest["splits"] == {"sft": 0, "val": len(samples)}
    assert "embed" not in [s.stage for s in result.funnel]  # text similarity needs no images
    assert all(s.split == "val" and s.distractor_similarity is not None for s in samples)
    # The queries of a scene share its image and ask for different members (two scenes of the
    # same flags on a fixed layout can share an image too, so this is a lower bound).
    by_image: dict[bytes, set[str]] = {}
    for s in samples:
        by_image.setdefault(s.image, set()).add(s.target)
        assert s.target in {e.name for e in s.entities}
    assert all(len(by_image[s.image]) >= min(3, len(s.entities)) for s in samples)
