"""What a run shows besides its shards: live progress, busy time per stage, drop examples."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import replace

import badinput
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image
from samples import make_sample, png_bytes
from test_pipeline import folder_recipe

from groundforge.outputs.previews import make_preview, read_previews, thumbnail
from groundforge.outputs.rejections import read_rejections
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.progress import StageProgress, read_progress, shows_progress
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord, Rejection

RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


@pytest.fixture(scope="module", params=list(RUNNERS))
def bad_run(request, tmp_path_factory):
    """The bad-input corpus run with a progress callback; returns (out, result, updates)."""
    tmp = tmp_path_factory.mktemp(f"insight-{request.param}")
    badinput.make_bad_corpus(tmp / "images")
    updates = []
    out = tmp / "out"
    recipe = parse_recipe(folder_recipe(tmp / "images"), tmp)
    result = run_recipe(recipe, str(out), RUNNERS[request.param], progress=updates.append)
    return out, result, updates


def test_live_progress_ends_at_the_funnel(bad_run):
    _, result, updates = bad_run
    assert updates, "no progress was reported"
    final = {row["stage"]: row for row in updates[-1]}
    assert list(final) == [s.stage for s in result.funnel]
    for stage in result.funnel:
        row = final[stage.stage]
        assert (row["in"], row["kept"], row["dropped"]) == (
            stage.total,
            stage.kept,
            stage.dropped,
        ), stage.stage
    # Counts only grow while the run goes on.
    for before, after in zip(updates, updates[1:], strict=False):
        assert all(a["in"] >= b["in"] for a, b in zip(after, before, strict=True))


def test_busy_time_per_stage_in_the_manifest(bad_run):
    out, result, _ = bad_run
    manifest = json.loads((out / "manifest.json").read_text())
    timing = manifest["timing"]
    assert list(timing["stage_seconds"]) == [s.stage for s in result.funnel]
    assert all(v >= 0 for v in timing["stage_seconds"].values())
    assert timing["stage_seconds"]["image"] > 0  # decoding every image takes time
    assert timing["wall_seconds"] > 0


def test_drop_examples_are_a_stable_bounded_pick(bad_run):
    out, _, _ = bad_run
    rejections = read_rejections(str(out / "rejections.parquet"))
    previews = read_previews(str(out / "rejection_previews.parquet"))
    by_reason = defaultdict(list)
    for r in rejections:
        by_reason[(r.stage, r.reason)].append(r.item_id)
    picked = defaultdict(list)
    for p in previews:
        picked[(p.stage, p.reason)].append(p.item_id)
    assert set(picked) == set(by_reason)
    for key, ids in by_reason.items():
        rank = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
        assert sorted(picked[key]) == sorted(rank[:6]), key
    for p in previews:
        if p.image is None:
            assert (p.width, p.height, p.boxes) == (0, 0, ())
            continue
        image = Image.open(io.BytesIO(p.image))
        assert image.size == (p.width, p.height) and max(image.size) <= 320
    # A decompression bomb is never decoded for a picture, a truncated file is not shown.
    reasons = {(p.stage, p.reason): p for p in previews}
    assert reasons[("image", "too_many_pixels")].image is None
    assert reasons[("image", "not_an_image")].image is None


def test_preview_scales_every_box_onto_the_thumbnail():
    record = ImageRecord(
        "id",
        png_bytes(640, 320),
        640,
        320,
        "flag",
        "Chad",
        candidates={"detector": (Detection(Box(0, 0, 320, 160), 0.9, "flag"),)},
        box=Box(64, 32, 640, 320),
    )
    detail = {"grounder_box": [320, 160, 640, 320], "iou": 0.1, "other": [1, 2, 3, 4]}
    drop = Rejection("id", "consistency", "grounder_disagrees", json.dumps(detail))
    preview = make_preview(drop, record, side=160)
    assert (preview.width, preview.height) == (160, 80)
    marks = {(m.kind, m.label): m.box.to_list() for m in preview.boxes}
    assert marks == {
        ("gt", "Chad"): [16.0, 8.0, 160.0, 80.0],
        ("candidate", "detector"): [0.0, 0.0, 80.0, 40.0],
        ("cause", "grounder_box"): [80.0, 40.0, 160.0, 80.0],
    }


def test_preview_of_a_sample_marks_the_stated_box():
    sample = replace(make_sample(1), image=png_bytes(64, 48), width=64, height=48)
    drop = Rejection(
        sample.sample_id, "rationale", "rationale_wrong_box", '{"box": [32, 24, 64, 48]}'
    )
    preview = make_preview(drop, sample, side=32)
    assert (preview.width, preview.height) == (32, 24)
    kinds = Counter(m.kind for m in preview.boxes)
    assert kinds == {"gt": 1, "cause": 1}
    cause = next(m for m in preview.boxes if m.kind == "cause")
    assert cause.box.to_list() == [16.0, 12.0, 32.0, 24.0]


def test_thumbnail_refuses_what_it_cannot_decode():
    assert thumbnail(None) is None and thumbnail(b"not an image") is None
    jpeg, w, h = thumbnail(png_bytes(100, 50), side=40)
    assert (w, h) == (40, 20) and Image.open(io.BytesIO(jpeg)).format == "JPEG"


def test_progress_files_sum_over_workers(tmp_path):
    a, b = StageProgress(str(tmp_path), "image"), StageProgress(str(tmp_path), "image")
    for reason in (None, "too_small", None):
        a.count(reason)
    b.count("too_small")
    a.flush()
    b.flush()
    (tmp_path / "garbage.json").write_text("{half")
    rows = read_progress(str(tmp_path), ["read", "image"])
    assert rows == [
        {"stage": "read", "in": 0, "kept": 0, "dropped": {}},
        {"stage": "image", "in": 4, "kept": 2, "dropped": {"too_small": 2}},
    ]


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        ([], True),
        (["--direct_running_mode=multi_processing"], True),
        (["--runner=PortableRunner", "--environment_type=LOOPBACK"], True),
        (["--runner=PortableRunner", "--environment_type=DOCKER"], False),
        (["--runner=DataflowRunner"], False),
    ],
)
def test_progress_only_where_workers_share_the_disk(args, shown):
    assert shows_progress(PipelineOptions(args)) is shown


def test_dataset_card_tells_counts_licences_and_use(demo_run):
    import re

    manifest = json.loads((demo_run / "manifest.json").read_text())
    card = (demo_run / "README.md").read_text()
    for split, rows in manifest["splits"].items():
        assert f"| {split} | {rows} |" in card
    for stage in manifest["stages"]:
        assert f"| {stage['stage']} | {stage['in']} | {stage['kept']} |" in card
    licences = manifest["provenance"]["licenses"]
    # Every demo row comes from openclipart flags under one dedication.
    assert sum(licences.values()) == manifest["samples"] and len(licences) == 1
    (licence,) = licences
    assert re.search(rf"\| {re.escape(licence)} \| {manifest['samples']} \|", card)
    for heading in ("## Intended use", "## Load", "## Train", "load_from_disk"):
        assert heading in card
    # Rows and distinct target entities per domain, counted in the pipeline.
    targets = {s.target for s in read_samples(str(demo_run / "shards"))}
    provenance = manifest["provenance"]
    assert provenance["domains"] == {"flag": manifest["samples"]}
    assert provenance["entities"] == {"flag": len(targets)} and len(targets) > 250
    assert f"Domain: `flag` ({manifest['samples']} rows, {len(targets)} entities)" in card
