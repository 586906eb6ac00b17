import json
import random

import apache_beam as beam
import datasets
import pytest
from samples import make_sample

from groundforge.outputs.files import count_rows, file_sha256
from groundforge.outputs.shards import (
    WriteShards,
    finalize_shards,
    read_samples,
    shard_count,
    shard_index,
)


def write(samples, out, fmt="arrow", rows_per_shard=4, splits=("sft", "val", "grpo")):
    with beam.Pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(out), fmt, rows_per_shard)
    return finalize_shards(str(out), list(splits), fmt)


def test_shard_arithmetic():
    assert shard_count(0, 10) == 1
    assert shard_count(10, 10) == 1
    assert shard_count(11, 10) == 2
    ids = [f"id{i}" for i in range(100)]
    assert [shard_index(i, 7) for i in ids] == [shard_index(i, 7) for i in ids]
    assert set(shard_index(i, 7) for i in ids) == set(range(7))


def test_load_from_disk_with_empty_split_and_checksums(tmp_path):
    samples = [make_sample(i, "sft" if i % 4 else "val") for i in range(10)]
    shards = write(samples, tmp_path)
    by_split = {}
    for s in shards:
        by_split.setdefault(s.split, []).append(s)
        assert file_sha256(s.path) == (s.sha256, s.bytes)
        assert count_rows(s.path, "arrow") == s.rows
    assert sum(s.rows for s in by_split["sft"]) == 7
    assert sum(s.rows for s in by_split["val"]) == 3
    assert [s.rows for s in by_split["grpo"]] == [0]
    assert len(by_split["sft"]) == 2  # 7 rows at 4 per shard
    ds = datasets.load_from_disk(str(tmp_path))
    assert isinstance(ds, datasets.DatasetDict)
    assert sorted(ds) == ["grpo", "sft", "val"]
    assert len(ds["grpo"]) == 0
    sft_ids = sorted(s.sample_id for s in samples if s.split == "sft")
    assert sorted(ds["sft"]["sample_id"]) == sft_ids
    row = ds["val"][0]
    assert row["image"].size == (8, 6)
    assert row["gt_boxes"] == [[1.0, 1.0, float(5 + int(row["target"].split()[1]) % 3), 4.0]]
    assert json.loads((tmp_path / "dataset_dict.json").read_text()) == {
        "splits": ["grpo", "sft", "val"]
    }


def test_shards_are_byte_identical_whatever_the_input_order(tmp_path):
    samples = [make_sample(i, "sft") for i in range(23)]
    a = write(samples, tmp_path / "a")
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    b = write(shuffled, tmp_path / "b")
    assert [(s.split, s.rows, s.sha256) for s in a] == [(s.split, s.rows, s.sha256) for s in b]
    assert sum(s.rows for s in a) == 23


def test_missing_indices_get_zero_row_shards(tmp_path):
    # Only shard 1 of 3 received a sample.
    (tmp_path / "sft").mkdir()
    from groundforge.outputs.files import write_table
    from groundforge.schemas.arrow import sample_schema, sample_to_row

    write_table(
        str(tmp_path / "sft" / "data-00001-of-00003.arrow"),
        [sample_to_row(make_sample(1))],
        sample_schema(),
        "arrow",
    )
    shards = finalize_shards(str(tmp_path), ["sft"])
    assert [(s.path.rsplit("/", 1)[-1], s.rows) for s in shards] == [
        ("data-00000-of-00003.arrow", 0),
        ("data-00001-of-00003.arrow", 1),
        ("data-00002-of-00003.arrow", 0),
    ]
    assert len(datasets.load_from_disk(str(tmp_path))["sft"]) == 1


def test_parquet_format_loads_with_load_dataset(tmp_path):
    samples = [make_sample(i, "sft" if i % 3 else "val") for i in range(9)]
    write(samples, tmp_path, fmt="parquet", splits=("sft", "val"))
    ds = datasets.load_dataset(
        "parquet",
        data_files={
            "sft": str(tmp_path / "sft" / "*.parquet"),
            "val": str(tmp_path / "val" / "*.parquet"),
        },
    )
    assert len(ds["sft"]) == 6 and len(ds["val"]) == 3
    assert ds["val"][0]["image"].mode == "RGB"
    back = sorted(read_samples(str(tmp_path), fmt="parquet"), key=lambda s: s.sample_id)
    assert back == sorted(samples, key=lambda s: s.sample_id)


def test_mixed_shard_counts_are_refused(tmp_path):
    from groundforge.outputs.files import write_table
    from groundforge.schemas.arrow import sample_schema

    for name in ("data-00000-of-00002.arrow", "data-00000-of-00003.arrow"):
        write_table(str(tmp_path / "sft" / name), [], sample_schema(), "arrow")
    with pytest.raises(RuntimeError, match="mixes shard counts"):
        finalize_shards(str(tmp_path), ["sft"])
