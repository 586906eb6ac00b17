"""Run-wide dedup on real Beam runners: the same kept set and rejections whatever the runner."""

from __future__ import annotations

import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image
from test_dedup import encode, photo, shapes

from groundforge.filters.dedup import DedupSettings, find_duplicates, pixel_check, signature_of
from groundforge.filters.sameimage import look_of
from groundforge.pipelines.dedup import JoinFindings, dedup_check
from groundforge.pipelines.metrics import read_funnel
from groundforge.pipelines.stage import apply_check
from groundforge.pixels import PixelStore, load_pixels
from groundforge.schemas.records import ImageRecord, record_key, sha256_hex

RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}
# Small chunks, so that the crowd of blank images goes through the chunk-pair step.
SETTINGS = DedupSettings(chunk_size=4)


def unit(rng: np.random.Generator, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def make_records() -> list[ImageRecord]:
    """Thirty-six records: distinct pictures, byte copies (one under another entity), JPEG
    re-encodes, a look-alike found only by its embedding, ten blank images of different
    sizes (one hash, one thumbnail) and one record with a broken embedding."""
    rng = np.random.default_rng(5)
    made = []

    def add(location, data, entity="", embedding=None):
        vector = tuple(unit(rng).tolist()) if embedding is None else tuple(embedding)
        width, height = Image.open(io.BytesIO(data)).size
        made.append(
            ImageRecord(
                sha256_hex(data),
                data,
                width,
                height,
                "test",
                entity,
                location=location,
                embedding=vector,
            )
        )

    pictures = {f"photo-{i}": encode(photo(i)) for i in range(6)}
    pictures.update({f"shapes-{i}": encode(shapes(i)) for i in range(6)})
    for name, data in pictures.items():
        add(f"a/{name}.png", data)
    for name in ("photo-0", "shapes-1", "shapes-4"):
        add(f"c/{name}.png", pictures[name], entity="other")
    for name in ("photo-1", "photo-2", "shapes-0", "shapes-2", "shapes-3"):
        add(f"b/{name}.jpg", encode(Image.open(io.BytesIO(pictures[name])), "JPEG", 80))
    # A different picture whose embedding is a near-copy of photo-3's.
    twin = np.array(made[3].embedding) + 0.05 * unit(rng)
    add("d/photo-3-lookalike.png", encode(photo(40)), embedding=twin / np.linalg.norm(twin))
    for i in range(10):
        add(f"e/blank-{i}.png", encode(Image.new("RGB", (60 + i, 40 + i), (255, 255, 255))))
    add("f/broken.png", encode(photo(41)), embedding=(3.0, 4.0))
    for i in range(4):
        add(f"g/photo-{50 + i}.png", encode(photo(50 + i)))
    return made


def run_dedup(records, args: list[str], out: Path) -> dict:
    p = beam.Pipeline(options=PipelineOptions(args))
    stage = apply_check(
        p | beam.Create(records) | JoinFindings(SETTINGS, scope="all"), "dedup", dedup_check
    )
    _ = (
        stage.kept
        | "kept keys" >> beam.Map(record_key)
        | "write kept" >> beam.io.WriteToText(str(out / "kept"))
    )
    _ = (
        stage.rejected
        | "as json" >> beam.Map(lambda r: json.dumps([r.item_id, r.source_id, r.reason, r.detail]))
        | "write rejected" >> beam.io.WriteToText(str(out / "rejected"))
    )
    result = p.run()
    result.wait_until_finish()

    def lines(prefix):
        return sorted(line for f in out.glob(f"{prefix}-*") for line in f.read_text().splitlines())

    [funnel] = read_funnel(result, ["dedup"])
    return {
        "kept": lines("kept"),
        "rejected": [json.loads(line) for line in lines("rejected")],
        "funnel": funnel,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The pipeline parks pixels before dedup: the kept twin of a near-copy is loaded from there.
    store = PixelStore(str(tmp_path_factory.mktemp("pixels")))
    records = [store.parked(r) for r in make_records()]
    return records, {
        name: run_dedup(records, args, tmp_path_factory.mktemp(name))
        for name, args in RUNNERS.items()
    }


def test_every_runner_keeps_the_same_records_as_the_rule(runs):
    records, results = runs
    signed = [r for r in records if r.location != "f/broken.png"]
    looks = {record_key(r): look_of(load_pixels(r.image_ref)) for r in signed}
    verify = pixel_check(looks.__getitem__)
    expected = find_duplicates([signature_of(r) for r in signed], SETTINGS, verify)
    reference = results["in_process"]
    assert reference["kept"] == sorted(
        record_key(r) for r in signed if record_key(r) not in expected
    )
    by_key = {
        source: (reason, json.loads(detail)) for _, source, reason, detail in reference["rejected"]
    }
    assert by_key.pop("f/broken.png")[0] == "error"
    for detail in (d for _, d in by_key.values()):
        detail.pop("block_difference", None)
    assert by_key == {
        key: (
            f"duplicate_{d.kind}",
            {"kept_id": d.kept_id, "kept_key": d.kept_key, "distance": d.distance},
        )
        for key, d in expected.items()
    }
    # What was planted is what was found.
    kinds = {key: d.kind for key, d in expected.items()}
    assert {k for k, v in kinds.items() if v == "exact"} == {
        "c/photo-0.png",
        "c/shapes-1.png",
        "c/shapes-4.png",
    }
    assert {f"b/{n}.jpg" for n in ("photo-1", "photo-2", "shapes-0", "shapes-2", "shapes-3")} <= {
        k for k, v in kinds.items() if v == "perceptual"
    }
    # An embedding only proposes: a different picture with a near-copy embedding is kept.
    assert "d/photo-3-lookalike.png" not in expected
    assert "d/photo-3-lookalike.png" in reference["kept"]
    # Ten blank images share every band: found only through the chunk pairs (chunk_size 4).
    assert {f"e/blank-{i}.png" for i in range(1, 10)} <= set(expected)
    assert expected["e/blank-9.png"].kept_key == "e/blank-0.png"
    for name, result in results.items():
        assert result["kept"] == reference["kept"], name
        assert result["rejected"] == reference["rejected"], name


def test_the_funnel_balances_on_every_runner(runs):
    records, results = runs
    for name, result in results.items():
        funnel = result["funnel"]
        assert funnel.total == len(records), name
        assert funnel.total == funnel.kept + sum(funnel.dropped.values()), name
        assert funnel.kept == len(result["kept"]), name
        assert sum(funnel.dropped.values()) == len(result["rejected"]), name
        assert funnel.dropped["error"] == 1
        assert set(funnel.dropped) == {
            "error",
            "duplicate_exact",
            "duplicate_perceptual",
        }
