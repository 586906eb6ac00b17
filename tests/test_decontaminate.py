"""Decontamination: training records that copy a benchmark image are dropped."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_dedup import VERTICAL, H, W, derived, encode, photo, record, shapes, tricolour

from groundforge.filters.decontaminate import (
    BenchmarkIndex,
    CandidateSettings,
    check_contamination,
)
from groundforge.filters.dedup import fingerprint
from groundforge.filters.image import check_image
from groundforge.filters.sameimage import DEFAULT_SAME
from groundforge.pixels import image_bytes


def bench_images() -> dict[str, Image.Image]:
    return {
        "photo": photo(10),
        "shapes": shapes(10),
        "france": tricolour(VERTICAL["france"]),
        "mali": tricolour(VERTICAL["mali"]),
    }


def unrelated_images() -> dict[str, Image.Image]:
    images = {f"photo-{i}": photo(20 + i) for i in range(3)}
    images.update({f"shapes-{i}": shapes(20 + i) for i in range(3)})
    # Same layout and luminance as the French flag; only the colours differ.
    images["ireland"] = tricolour(VERTICAL["ireland"])
    return images


def write_kvg_parquet(path, rows) -> None:
    """A KVG-Bench-shaped parquet: ``rows`` are (question_id, image bytes or None, image path)."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "question_id": pa.array([qid for qid, _, _ in rows], pa.int64()),
            "category": pa.array(["aircraft"] * len(rows)),
            "question": pa.array([f"Find {qid}" for qid, _, _ in rows]),
            "answer": pa.array(["<|box_start|>(1,2),(30,40)<|box_end|>"] * len(rows)),
            "image": pa.array(
                [{"bytes": data, "path": name} for _, data, name in rows], image_type
            ),
        }
    )
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark parquet (two questions share the photo, as in KVG-Bench) and its index."""
    path = tmp_path_factory.mktemp("bench") / "test.parquet"
    jpegs = {name: encode(im, "JPEG", 92) for name, im in bench_images().items()}
    rows = [
        (1001, jpegs["photo"], "photo.jpg"),
        (1002, jpegs["shapes"], "shapes.jpg"),
        (1003, jpegs["photo"], "photo.jpg"),
        (1004, jpegs["france"], "france.jpg"),
        (1005, jpegs["mali"], "mali.jpg"),
    ]
    write_kvg_parquet(path, rows)
    return path, BenchmarkIndex.from_parquet(path)


QIDS = {"photo": "1001", "shapes": "1002", "france": "1004", "mali": "1005"}


def test_from_parquet_indexes_each_image_once_under_its_first_question(bench):
    _, index = bench
    assert index.ids == ("1001", "1002", "1004", "1005")
    assert len(index) == 4 and index.embeddings is None
    assert index.thumbnails.shape == (4, 48) and index.phashes.dtype == np.uint64


def test_copies_of_benchmark_images_are_contaminated(bench):
    _, index = bench
    for name, image in bench_images().items():
        copies = {"exact.png": encode(image), **derived(image)}
        for variant, data in copies.items():
            verdict = check_contamination(record(f"train/{name}/{variant}", data), index)
            assert (verdict.keep, verdict.reason) == (False, "contaminated"), (name, variant)
            assert verdict.metrics["benchmark_id"] == QIDS[name]
            assert verdict.metrics["kind"] == "perceptual"
            assert 0 <= verdict.metrics["distance"] <= 6


def test_unrelated_images_are_kept(bench):
    _, index = bench
    for name, image in unrelated_images().items():
        verdict = check_contamination(record(f"train/{name}.png", encode(image)), index)
        assert verdict.keep, (name, verdict.metrics)
        nearest = verdict.metrics["block_difference"]
        assert nearest is None or nearest > DEFAULT_SAME.max_block_difference


def test_the_pixels_keep_a_flag_that_only_shares_the_layout(bench):
    _, index = bench
    ireland = record("train/ireland.png", encode(tricolour(VERTICAL["ireland"])))
    # pHash is colour-blind: France is a candidate at distance 0, and its pixels rule it out.
    found = index.candidates(*fingerprint(image_bytes(ireland)), None, CandidateSettings())
    assert (index.ids.index("1004"), "perceptual", 0.0) in found
    verdict = check_contamination(ireland, index)
    assert verdict.keep and verdict.metrics["candidates"] == len(found)
    assert verdict.metrics["block_difference"] > DEFAULT_SAME.max_block_difference


def test_rows_without_ids_or_bytes(tmp_path):
    photo_bytes, shapes_bytes = encode(photo(10)), encode(shapes(10))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "shapes.png").write_bytes(shapes_bytes)
    path = tmp_path / "bench.parquet"
    write_kvg_parquet(path, [(7, photo_bytes, None), (8, None, "files/shapes.png")])

    index = BenchmarkIndex.from_parquet(path, id_column=None)
    assert index.ids == ("0", "1")
    verdict = check_contamination(record("t.jpg", encode(shapes(10), "JPEG", 70)), index)
    assert verdict.metrics["benchmark_id"] == "1"

    write_kvg_parquet(path, [(7, None, "files/missing.png")])
    with pytest.raises(ValueError, match="missing.png not found"):
        BenchmarkIndex.from_parquet(path)
    with pytest.raises(ValueError, match="no column 'picture'"):
        BenchmarkIndex.from_parquet(path, image_column="picture")


def test_from_folder_uses_relative_paths(tmp_path):
    (tmp_path / "birds" / "rare").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "birds" / "rare" / "shapes.JPG").write_bytes(encode(shapes(10), "JPEG"))
    (tmp_path / "photo.png").write_bytes(encode(photo(10)))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".cache" / "france.png").write_bytes(encode(tricolour(VERTICAL["france"])))

    index = BenchmarkIndex.from_folder(tmp_path)
    assert index.ids == ("birds/rare/shapes.JPG", "photo.png")
    copy = record("t.jpg", encode(shapes(10).resize((200, 133)), "JPEG", 80))
    assert check_contamination(copy, index).metrics["benchmark_id"] == "birds/rare/shapes.JPG"
    hidden = record("f.png", encode(tricolour(VERTICAL["france"])))
    assert check_contamination(hidden, index).keep

    (tmp_path / "broken.png").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="'broken.png' is unusable: not_an_image"):
        BenchmarkIndex.from_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        BenchmarkIndex.from_folder(tmp_path / "empty")


def one_hot(images: list[bytes]) -> np.ndarray:
    """A stand-in embedder: the i-th distinct benchmark image gets the i-th basis vector."""
    return np.eye(len(images), 8, dtype=np.float32)


def test_embeddings_propose_and_the_pixels_decide():
    images = [encode(im) for im in bench_images().values()]
    index = BenchmarkIndex.from_images(["q0", "q1", "q2", "q3"], images, embed=one_hot)
    assert index.embeddings.shape == (4, 8)
    other = encode(photo(99))  # looks like no benchmark image
    phash, thumbnail = fingerprint(other)

    def kinds(vector):
        return [
            (index.ids[i], kind, round(d, 12))
            for i, kind, d in index.candidates(phash, thumbnail, vector, CandidateSettings())
            if kind == "embedding"
        ]

    assert kinds(np.eye(8)[2]) == [("q2", "embedding", 0.0)]
    assert kinds([0.0, 0.95, math.sqrt(1 - 0.95**2), 0, 0, 0, 0, 0]) == [
        ("q1", "embedding", round(1.0 - 0.95, 12))
    ]
    below = 0.95 - 1e-12
    assert kinds([0.0, below, 0, 0, 0, 0, 0, math.sqrt(1 - below**2)]) == []
    # A near embedding of another picture proposes, and is not enough.
    verdict = check_contamination(record("t.png", other, embedding=tuple(np.eye(8)[2])), index)
    assert verdict.keep and verdict.metrics["candidates"] >= 1
    # A copy whose embedding is its benchmark image's is dropped naming it.
    copy = encode(Image.open(io.BytesIO(images[2])), "JPEG", 80)
    dropped = check_contamination(record("t.jpg", copy, embedding=tuple(np.eye(8)[2])), index)
    assert dropped.metrics["benchmark_id"] == "q2" and not dropped.keep
    with pytest.raises(ValueError, match="one embedder"):
        check_contamination(record("t.png", other, embedding=(1.0, 0.0, 0.0)), index)


def test_the_index_pickles_and_matches_the_same(bench):
    _, index = bench
    images = [encode(im) for im in bench_images().values()]
    with_embeddings = BenchmarkIndex.from_images(["a", "b", "c", "d"], images, embed=one_hot)
    copy_of_d = encode(Image.open(io.BytesIO(images[3])), "JPEG", 75)
    probe = record("t.jpg", copy_of_d, embedding=tuple(np.eye(8)[3]))
    first = check_contamination(probe, with_embeddings)  # builds the faiss index
    restored = pickle.loads(pickle.dumps(with_embeddings))
    assert check_contamination(probe, restored) == first
    assert first.metrics["benchmark_id"] == "d"
    copy = record("t.jpg", encode(bench_images()["mali"], "JPEG", 70))
    assert (
        check_contamination(copy, pickle.loads(pickle.dumps(index))).metrics["benchmark_id"]
        == QIDS["mali"]
    )


def test_bad_benchmarks_are_refused():
    with pytest.raises(ValueError, match="2 ids for 1 images"):
        BenchmarkIndex.from_images(["a", "b"], [encode(photo(1))])
    with pytest.raises(ValueError, match="L2-normalised"):
        BenchmarkIndex.from_images(
            ["a"], [encode(photo(1))], embed=lambda ims: np.full((len(ims), 4), 0.9)
        )
    with pytest.raises(ValueError, match="no benchmark images"):
        BenchmarkIndex.from_images([], [])


def test_benchmark_images_are_normalised_like_training_images():
    # Shapes on a transparent ground: the image check composites them on white, so a training
    # record carries white where the benchmark file has transparent black.
    sprite = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    sprite.paste(shapes(3).crop((40, 30, 200, 130)), (40, 30))
    buf = io.BytesIO()
    sprite.save(buf, "PNG")
    index = BenchmarkIndex.from_images(["sprite"], [buf.getvalue()])
    training = check_image(record("t.png", buf.getvalue())).value
    verdict = check_contamination(training, index)
    assert verdict.metrics == {
        "benchmark_id": "sprite",
        "kind": "perceptual",
        "distance": 0.0,
        "block_difference": 0.0,
    }


def test_hamming_threshold_is_inclusive():
    data = encode(photo(5))
    phash, thumbnail = fingerprint(data)
    thumbs = np.frombuffer(thumbnail * 2, dtype=np.uint8)
    index = BenchmarkIndex(["six", "seven"], [phash ^ 0b111111, phash ^ (0b1111111 << 20)], thumbs)
    # Built from arrays, the index has no looks: its candidates are taken as they are.
    probe = record("t.png", data)
    assert check_contamination(probe, index).metrics == {
        "benchmark_id": "six",
        "kind": "perceptual",
        "distance": 6.0,
        "block_difference": None,
    }
    only_hashes = CandidateSettings(max_hamming=5, layout_cosine=1.1)
    assert check_contamination(probe, index, only_hashes).metrics == {
        "candidates": 0,
        "block_difference": None,
    }


def test_a_zero_benchmark_embedding_is_allowed_and_matches_nothing():
    images = [encode(photo(1)), encode(photo(2))]
    index = BenchmarkIndex.from_images(
        ["q0", "q1"], images, embed=lambda ims: np.array([[0.0, 0.0], [0.0, 1.0]])
    )
    probe = record("t.png", encode(shapes(30)), embedding=(1.0, 0.0))
    phash, thumbnail = fingerprint(image_bytes(probe))
    found = index.candidates(phash, thumbnail, (1.0, 0.0), CandidateSettings(min_cosine=0.0))
    assert [index.ids[i] for i, kind, _ in found if kind == "embedding"] == ["q1"]


def test_a_benchmark_copy_that_lost_its_frames_is_caught_in_a_merged_index():
    # Wyoming's bordered flag in the second of two benchmarks (indexed under two views: without
    # its frames and whole); the training copy is cropped into its red border.
    from test_dedup import FLAGS

    from groundforge.filters.decontaminate import merge_indexes

    data = (FLAGS / "america" / "united_states" / "usa_wyoming.png").read_bytes()
    original = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = original.size
    first = BenchmarkIndex.from_images(["p", "s"], [encode(photo(10)), encode(shapes(10))])
    second = BenchmarkIndex.from_images(["w"], [data])
    assert len(second.phashes) == 2 and second.owners.tolist() == [0, 0]
    index = merge_indexes([("one", first), ("two", second)])
    assert index.owners.tolist() == [0, 1, 2, 2]
    copy = record("train/wyoming.png", encode(original.crop((0, 0, w - 15, h - 15))))
    verdict = check_contamination(copy, index)
    assert verdict.reason == "contaminated" and verdict.metrics["benchmark_id"] == "two:w"
