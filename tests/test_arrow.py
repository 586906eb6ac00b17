from dataclasses import replace

import pyarrow as pa
from samples import make_sample

from groundforge.schemas.arrow import (
    REJECTION_SCHEMA,
    hf_features_dict,
    image_record_schema,
    image_record_to_row,
    rejection_to_row,
    row_to_image_record,
    row_to_rejection,
    row_to_sample,
    sample_schema,
    sample_to_row,
)
from groundforge.schemas.box import Box
from groundforge.schemas.records import (
    Detection,
    ImageRecord,
    Instance,
    Rejection,
    UncertainRegion,
)


def roundtrip(rows, schema):
    return pa.Table.from_pylist(rows, schema=schema).to_pylist()


def test_sample_roundtrip_through_arrow():
    samples = [make_sample(i) for i in range(4)]
    samples[1] = replace(
        samples[1],
        task="detect",
        candidates={"detector": (Detection(Box(1, 1, 3, 3), 0.5, "person"),)},
        teacher_box=Box(1, 1, 4, 4),
        uncertain_regions=(UncertainRegion(Box(2, 2, 5, 5), "missed"),),
        ignore_regions=(Box(0, 0, 1, 1), Box(6, 4, 8, 6)),
    )
    back = [
        row_to_sample(r) for r in roundtrip([sample_to_row(s) for s in samples], sample_schema())
    ]
    assert back == samples


def test_image_record_roundtrip_through_arrow():
    rec = ImageRecord(
        image_id="abc",
        image=b"\x89PNG",
        width=4,
        height=3,
        domain="flag",
        entity="Chad",
        boxes=(Box(0, 0, 2, 2),),
        source="image_folder",
        location="/a.png",
        candidates={
            "detector": (Detection(Box(1, 1, 3, 3), 0.5, "flag"),),
            "foreground": (Detection(Box(0, 0, 4, 3)),),
        },
        box=Box(0, 0, 2, 2),
        box_source="known",
        box_ious={"detector": 0.25},
    )
    row = roundtrip([image_record_to_row(rec)], image_record_schema())[0]
    assert row_to_image_record(row) == rec


def test_image_record_with_instances_roundtrip_through_arrow():
    rec = ImageRecord(
        image_id="crowd",
        image=b"\xff\xd8",
        width=80,
        height=64,
        domain="person",
        entity="person",
        boxes=(Box(0, 5, 20, 55),),
        source="odgt",
        location="/Images/crowd.jpg",
        instances=(
            Instance(Box(0, 5, 20, 55), "person", Box(-10, 5, 20, 55), Box(2, 10, 18, 40)),
            Instance(Box(14, 10, 22, 18), "person", visible=Box(14, 10, 22, 16)),
            Instance(Box(0, 0, 8, 8), "mask", ignore=True),
        ),
        dropped_instances={"outside_image": 1, "degenerate": 2},
    )
    row = roundtrip([image_record_to_row(rec)], image_record_schema())[0]
    assert row["dropped_instances"] == [
        {"reason": "degenerate", "count": 2},
        {"reason": "outside_image", "count": 1},
    ]
    assert row_to_image_record(row) == rec


def test_rejection_roundtrip():
    r = Rejection("id", "image", "truncated", '{"a": 1}', "/p.png")
    assert row_to_rejection(roundtrip([rejection_to_row(r)], REJECTION_SCHEMA)[0]) == r


def test_hf_features_decode_image_and_keep_box_lists():
    features = hf_features_dict(sample_schema())
    assert features["image"] == {"_type": "Image"}
    assert features["gt_boxes"]["_type"] == "List"
    assert features["gt_boxes"]["feature"]["feature"]["dtype"] == "float64"
    assert hf_features_dict(image_record_schema())["image"] == {"_type": "Image"}


def test_rationale_boxes_roundtrip_and_older_shards_read_without_them(tmp_path):
    from groundforge.outputs.files import write_table
    from groundforge.outputs.shards import read_samples
    from groundforge.schemas.records import Entity

    sample = replace(
        make_sample(0),
        rationale="the left one ⟦box 0⟧, not ⟦box 1 2⟧",
        rationale_boxes=(
            Entity("Chad", Box(0.5, 1, 3, 4.25)),
            Entity("", Box(1, 1, 2, 2)),
            Entity("", Box(3, 3, 4, 4)),
        ),
    )
    row = sample_to_row(sample)
    assert row["rationale_boxes"][0] == {"name": "Chad", "box": [0.5, 1.0, 3.0, 4.25]}
    assert row_to_sample(roundtrip([row], sample_schema())[0]) == sample
    # A shard written before the column existed reads with no rationale boxes.
    old_schema = pa.schema([f for f in sample_schema() if f.name != "rationale_boxes"])
    old_row = {k: v for k, v in sample_to_row(make_sample(0)).items() if k != "rationale_boxes"}
    write_table(str(tmp_path / "sft" / "data-00000-of-00001.arrow"), [old_row], old_schema, "arrow")
    (back,) = read_samples(str(tmp_path), "sft")
    assert back == make_sample(0) and back.rationale_boxes == ()
