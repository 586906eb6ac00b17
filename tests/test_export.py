"""Exports to LLaMA-Factory (sharegpt JSON + images) and verl (parquet + reward), re-read."""

from __future__ import annotations

import dataclasses
import io
import json

import apache_beam as beam
import datasets
import pytest
from click.testing import CliRunner
from PIL import Image
from samples import make_sample, png_bytes

from groundforge.cli import main
from groundforge.outputs.export import (
    IMAGE_TOKEN,
    REASONING_INSTRUCTION,
    dataset_info_entry,
    export_image,
    export_llamafactory,
    export_verl,
    sharegpt_record,
    think_text,
)
from groundforge.outputs.shards import WriteShards, finalize_shards, read_samples
from groundforge.outputs.verl_reward import compute_score, default_spec
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec, smart_resize
from groundforge.schemas.records import stable_id

SMALL_QWEN = {"max_pixels": 256 * 28 * 28}


def write(samples, out, splits=("sft", "val", "grpo")):
    with beam.Pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(out), "arrow", 4)
    finalize_shards(str(out), list(splits), "arrow")
    return out


def big_sample() -> object:
    """A 1000 x 800 JPEG with a box near a corner: downscaled by the qwen25vl frame."""
    buf = io.BytesIO()
    Image.new("RGB", (1000, 800), (20, 120, 200)).save(buf, "JPEG")
    box = Box(612.3, 401.7, 903.9, 755.2)
    return dataclasses.replace(
        make_sample(100, "sft"),
        sample_id=stable_id("export-test", "big"),
        image=buf.getvalue(),
        width=1000,
        height=800,
        target="Chad",
        question="Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>",
        entities=(),
        gt_boxes=(box,),
        rationale="The blue, yellow and red stripes of Chad.",
    )


def detect_sample() -> object:
    boxes = (Box(1, 1, 30, 30), Box(40, 5, 70, 35), Box(10, 40, 60, 58))
    return dataclasses.replace(
        make_sample(200, "grpo"),
        sample_id=stable_id("export-test", "detect"),
        image=png_bytes(80, 60),
        width=80,
        height=60,
        task="detect",
        domain="person",
        target="",
        question="Detect every person.",
        gt_boxes=boxes,
        rationale=None,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    samples = [make_sample(i, "sft" if i % 3 else "val") for i in range(9)]
    # Same image as sample 1, another question: one image file for both.
    samples.append(
        dataclasses.replace(
            samples[1], sample_id=stable_id("export-test", "dup"), question="where, again?"
        )
    )
    samples += [big_sample(), detect_sample()]
    return write(samples, tmp_path_factory.mktemp("export") / "shards")


SPLITS = ("grpo", "sft", "val")
SHAREGPT_ENTRY = {
    "file_name": "kvg_val.json",
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
    },
}


def load_records(paths):
    """Every split's records, in the order of ``paths`` (split -> file)."""
    return [record for path in paths.values() for record in json.loads(path.read_text())]


def user_and_answer(record):
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


# -- LLaMA-Factory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "params"), [("qwen25vl", SMALL_QWEN), ("norm1000", {}), ("pixel", {})]
)
def test_llamafactory_records_images_and_boxes(shards, tmp_path, codec, params):
    dest = tmp_path / "lf"
    paths = export_llamafactory(shards, dest, codec=codec, codec_params=params)
    assert paths == {split: dest / f"groundforge_{split}.json" for split in SPLITS}
    records = load_records(paths)
    samples = [s for split in SPLITS for s in read_samples(str(shards), split)]
    assert len(records) == len(samples) == 12
    box_codec = get_codec(codec, **params)
    for record, sample in zip(records, samples, strict=True):
        tokens = sum(m["content"].count(IMAGE_TOKEN) for m in record["messages"])
        assert tokens == len(record["images"]) == 1
        image_file = dest / record["images"][0]
        assert image_file.is_file() and image_file.suffix == ".png"
        image = Image.open(image_file)
        image.load()
        if codec == "qwen25vl":
            h, w = smart_resize(sample.height, sample.width, max_pixels=SMALL_QWEN["max_pixels"])
            assert image.size == (w, h)
            assert box_codec.frame(w, h) == (w, h)  # the processor will not resize it again
        else:
            assert image.size == (sample.width, sample.height)
        user, answer = user_and_answer(record)
        assert user.startswith(IMAGE_TOKEN + sample.question)
        # The box parses back, in the written image, to the gt box within one unit.
        w, h = image.size
        gts = [b.scale(w / sample.width, h / sample.height) for b in sample.gt_boxes]
        parsed = box_codec.parse(answer, w, h)
        assert len(parsed) == len(gts)
        ux, uy = box_codec.unit(w, h)
        for got, gt in zip(parsed, gts, strict=True):
            gt = gt.clip(w, h)
            assert abs(got.x1 - gt.x1) <= ux and abs(got.x2 - gt.x2) <= ux
            assert abs(got.y1 - gt.y1) <= uy and abs(got.y2 - gt.y2) <= uy
        think = think_text(sample.rationale)
        if think is None:
            assert "<think>" not in answer and REASONING_INSTRUCTION not in user
            assert answer == box_codec.render_many(gts, w, h) or answer == box_codec.render(
                gts[0], w, h, sample.target
            )
        else:
            assert user.endswith(REASONING_INSTRUCTION)
            box = box_codec.render(gts[0], w, h, sample.target)
            assert answer == f"<think>{think}</think><answer>{box}</answer>"
    # One file per distinct image (the duplicate shares one).
    files = sorted(p.name for p in (dest / "images").iterdir())
    assert len(files) == len({r["images"][0] for r in records}) == 11


def test_llamafactory_answer_examples(shards, tmp_path):
    records = load_records(export_llamafactory(shards, tmp_path, codec_params=SMALL_QWEN))
    by_question = {user_and_answer(r)[0]: user_and_answer(r)[1] for r in records}
    chad = (
        "<image>Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>"
        + REASONING_INSTRUCTION
    )
    # 1000 x 800 -> 476 x 392: x * 0.476, y * 0.49.
    assert by_question[chad] == (
        "<think>The blue, yellow and red stripes of Chad.</think>"
        '<answer>[{"bbox_2d": [291, 197, 430, 370], "label": "Chad"}]</answer>'
    )
    # make_sample(0): rationale stored as a whole think/answer text; 8 x 6 -> 84 x 56.
    assert by_question["<image>where is entity 0?" + REASONING_INSTRUCTION] == (
        '<think>t</think><answer>[{"bbox_2d": [10, 9, 52, 37], "label": "entity 0"}]</answer>'
    )
    assert by_question["<image>where is entity 1?"] == (
        '[{"bbox_2d": [10, 9, 63, 37], "label": "entity 1"}]'
    )
    # 80 x 60 -> 84 x 56 (x * 1.05, y * 0.933); halves round to even as Python's round does.
    assert by_question["<image>Detect every person."] == (
        '[{"bbox_2d": [1, 1, 32, 28]}, {"bbox_2d": [42, 5, 74, 33]}, {"bbox_2d": [10, 37, 63, 54]}]'
    )


def test_llamafactory_one_dataset_per_split(shards, tmp_path):
    dest = tmp_path / "lf"
    paths = export_llamafactory(shards, dest, codec="norm1000", dataset_name="kvg")
    assert sorted(p.name for p in dest.glob("*.json")) == [
        "dataset_info.json", "kvg_grpo.json", "kvg_sft.json", "kvg_val.json"
    ]  # fmt: skip
    info = json.loads((dest / "dataset_info.json").read_text())
    assert set(info) == {"kvg_grpo", "kvg_sft", "kvg_val"}
    assert info["kvg_val"] == SHAREGPT_ENTRY
    for split in SPLITS:
        assert {f"kvg_{split}": info[f"kvg_{split}"]} == dataset_info_entry(f"kvg_{split}")
        assert info[f"kvg_{split}"]["file_name"] == paths[split].name
    codec = get_codec("norm1000")
    exported = {}
    for split in SPLITS:
        records = json.loads(paths[split].read_text())
        samples = list(read_samples(str(shards), split))
        # Each file holds exactly its split's rows: 8 sft, 3 val (samples 0, 3, 6), 1 grpo.
        assert len(records) == len(samples) == {"sft": 8, "val": 3, "grpo": 1}[split]
        for sample, record in zip(samples, records, strict=True):
            assert sample.split == split
            image = export_image(sample, codec)
            assert record == sharegpt_record(sample, codec, f"{image.sha256}.png", image)
            exported[sample.sample_id] = record
    # No val sample's record is in a training file.
    val_ids = [s.sample_id for s in read_samples(str(shards), "val")]
    training = load_records({s: paths[s] for s in SPLITS if s != "val"})
    assert val_ids and not [i for i in val_ids if exported[i] in training]


def test_llamafactory_split_filter_and_dataset_info_merge(shards, tmp_path):
    dest = tmp_path / "lf"
    dest.mkdir()
    other = {"other": {"file_name": "other.json", "formatting": "alpaca"}}
    (dest / "dataset_info.json").write_text(json.dumps(other))
    paths = export_llamafactory(shards, dest, codec="norm1000", splits=["val"], dataset_name="kvg")
    assert paths == {"val": dest / "kvg_val.json"}
    assert sorted(p.name for p in dest.glob("*.json")) == ["dataset_info.json", "kvg_val.json"]
    assert len(json.loads(paths["val"].read_text())) == 3
    export_llamafactory(shards, dest, codec="norm1000", splits=["sft", "grpo"], dataset_name="kvg")
    info = json.loads((dest / "dataset_info.json").read_text())
    assert set(info) == {"other", "kvg_val", "kvg_sft", "kvg_grpo"}
    assert info["other"] == other["other"] and info["kvg_val"] == SHAREGPT_ENTRY
    assert len(json.loads((dest / "kvg_sft.json").read_text())) == 8


def test_llamafactory_skips_empty_splits(tmp_path):
    shards = write([make_sample(i, "sft") for i in range(2)], tmp_path / "shards")
    paths = export_llamafactory(shards, tmp_path / "lf", codec="norm1000", splits=["sft", "val"])
    assert list(paths) == ["sft"]
    assert sorted(p.name for p in (tmp_path / "lf").glob("*.json")) == [
        "dataset_info.json", "groundforge_sft.json"
    ]  # fmt: skip
    assert set(json.loads((tmp_path / "lf" / "dataset_info.json").read_text())) == {
        "groundforge_sft"
    }


def test_llamafactory_command_line(shards, tmp_path):
    dest = tmp_path / "lf"
    args = ["export", "llamafactory", str(shards), "--to", str(dest), "--codec", "norm1000"]
    result = CliRunner().invoke(main, [*args, "--name", "kvg"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "  dataset: kvg_grpo,kvg_sft\n" in result.output
    assert "  eval_dataset: kvg_val\n" in result.output
    assert sorted(json.loads((dest / "dataset_info.json").read_text())) == [
        "kvg_grpo", "kvg_sft", "kvg_val"
    ]  # fmt: skip
    only = tmp_path / "only"
    result = CliRunner().invoke(main, [*args[:4], str(only), *args[5:], "--split", "sft"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "eval_dataset" not in result.output and "  dataset: groundforge_sft\n" in result.output
    assert sorted(p.name for p in only.glob("*.json")) == [
        "dataset_info.json", "groundforge_sft.json"
    ]  # fmt: skip
    help_text = CliRunner().invoke(main, ["export", "llamafactory", "--help"]).output
    assert "NAME_<split>.json" in help_text and "eval_dataset" in help_text


def test_llamafactory_refuses_a_broken_dataset_info(shards, tmp_path):
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_info.json"):
        export_llamafactory(shards, tmp_path, codec="norm1000")


# -- verl -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_dir(shards, tmp_path_factory):
    return export_verl(
        shards, tmp_path_factory.mktemp("verl"), codec="qwen25vl", codec_params=SMALL_QWEN
    )


def load_split(verl_dir, split, tmp_path):
    return datasets.load_dataset(
        "parquet",
        data_files={split: str(verl_dir / f"{split}.parquet")},
        cache_dir=str(tmp_path / "hf-cache"),
    )[split]


def test_verl_rows_carry_what_the_reward_needs(shards, verl_dir, tmp_path):
    assert sorted(p.name for p in verl_dir.iterdir()) == [
        "grpo.parquet",
        "sft.parquet",
        "val.parquet",
    ]
    by_id = {s.sample_id: s for s in read_samples(str(shards))}
    total = 0
    for split in ("grpo", "sft", "val"):
        rows = load_split(verl_dir, split, tmp_path)
        assert set(rows.column_names) == {
            "data_source",
            "prompt",
            "images",
            "ability",
            "reward_model",
            "extra_info",
        }
        for index, row in enumerate(rows):
            total += 1
            info = row["extra_info"]
            sample = by_id[info["sample_id"]]
            assert info["split"] == split == sample.split
            assert info["index"] == index
            assert info["task"] == sample.task and info["target"] == sample.target
            assert row["data_source"] == f"groundforge/{sample.domain}"
            assert row["ability"] == ("grounding" if sample.task == "kvg" else "detection")
            (message,) = row["prompt"]
            assert message["role"] == "user"
            assert message["content"] == f"<image>{sample.question}{REASONING_INSTRUCTION}"
            (image,) = row["images"]
            assert isinstance(image, Image.Image)
            assert image.size == (info["width"], info["height"])
            h, w = smart_resize(sample.height, sample.width, max_pixels=SMALL_QWEN["max_pixels"])
            assert (info["width"], info["height"]) == (w, h)
            sx, sy = w / sample.width, h / sample.height
            expected = [b.scale(sx, sy).to_list() for b in sample.gt_boxes]
            assert info["boxes"] == expected
            assert row["reward_model"]["style"] == "rule"
            truth = json.loads(row["reward_model"]["ground_truth"])
            assert truth["codec"] == "qwen25vl" and truth["codec_params"] == SMALL_QWEN
            assert (truth["width"], truth["height"], truth["task"]) == (w, h, sample.task)
            codec = get_codec("qwen25vl", **SMALL_QWEN)
            assert truth["boxes"] == [codec.to_frame(Box(*b), w, h) for b in info["boxes"]]

            # The reward: 1 for the ground truth, 0 for garbage.
            answer = codec.render_many([Box(*b) for b in info["boxes"]], w, h)
            solution = f"<think>looking</think><answer>{answer}</answer>"
            gt_text = row["reward_model"]["ground_truth"]
            assert compute_score(row["data_source"], solution, gt_text, info) == 1.0
            assert compute_score(row["data_source"], "no box here", gt_text, info) == 0.0
            assert compute_score(row["data_source"], "", gt_text) == 0.0
    assert total == 12


def test_reward_of_a_shifted_box_is_its_iou(verl_dir, tmp_path):
    rows = load_split(verl_dir, "sft", tmp_path)
    row = next(r for r in rows if r["extra_info"]["target"] == "Chad")
    truth = json.loads(row["reward_model"]["ground_truth"])
    x1, y1, x2, y2 = truth["boxes"][0]
    shift = (x2 - x1) // 2
    moved = [x1 - shift, y1, x2 - shift, y2]  # inside the image: nothing clipped
    expected = Box(*truth["boxes"][0]).iou(Box(*moved))  # IoU is the same in any axis scaling
    assert 0.3 < expected < 0.4
    gt = row["reward_model"]["ground_truth"]
    text = f'<think>x</think><answer>[{{"bbox_2d": {moved}, "label": "Chad"}}]</answer>'
    assert compute_score("groundforge/flag", text, gt) == pytest.approx(expected, abs=1e-9)
    # The last box of the answer counts.
    both = f"<answer>{truth['boxes'][0]} then {moved}</answer>"
    assert compute_score("groundforge/flag", both, gt) == pytest.approx(expected, abs=1e-9)
    # The ground truth already parsed works too, and the optional terms.
    assert compute_score("groundforge/flag", text, truth) == pytest.approx(expected, abs=1e-9)
    assert compute_score("groundforge/flag", text, gt, iou_threshold=0.5) == 0.0
    assert compute_score("groundforge/flag", text, gt, format_weight=0.5) == pytest.approx(
        expected + 0.5
    )
    # Like the trainer's rewards: no <answer> block is no answer, whatever boxes the text holds.
    bare = json.dumps(moved)
    assert compute_score("groundforge/flag", bare, gt, format_weight=0.5) == 0.0
    right = json.dumps(truth["boxes"][0])
    assert compute_score("groundforge/flag", right, gt) == 0.0
    assert compute_score("groundforge/flag", f"<answer>{right}</answer>", gt) == 1.0
    # The threshold is strict, as the docstring and DeepPerception's "IoU if IoU > tau" say.
    assert compute_score("groundforge/flag", text, gt, iou_threshold=expected) == 0.0
    assert compute_score(
        "groundforge/flag", text, gt, iou_threshold=expected - 1e-6
    ) == pytest.approx(expected, abs=1e-9)
    # Inverted corners are no box (IoU 0), as on the benchmark.
    x1, y1, x2, y2 = truth["boxes"][0]
    inverted = f"<answer>[{x2}, {y2}, {x1}, {y1}]</answer>"
    assert compute_score("groundforge/flag", inverted, gt) == 0.0
    # A preset scores as the trainer's: DeepPerception pays 1 + 0.5 + 0.5 for the right box.
    good = f"<think>the flag</think><answer>{right}</answer>"
    assert compute_score("groundforge/flag", good, gt, rewards="deepperception") == 2.0
    with pytest.raises(ValueError, match="no preset"):
        compute_score("groundforge/flag", good, gt, rewards="best")


def test_reward_for_detection_is_weighted_precision_recall(verl_dir, tmp_path):
    (row,) = load_split(verl_dir, "grpo", tmp_path)
    assert row["ability"] == "detection"
    gt = row["reward_model"]["ground_truth"]
    boxes = json.loads(gt)["boxes"]
    assert len(boxes) == 3
    render = json.dumps
    assert compute_score("d", f"<answer>{render(boxes)}</answer>", gt) == 1.0
    two = f"<answer>{render(boxes[:2])}</answer>"
    assert compute_score("d", two, gt) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    far = [[70, 50, 79, 59]]
    two_and_far = f"<answer>{render(boxes[:2] + far)}</answer>"
    assert compute_score("d", two_and_far, gt) == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)
    assert compute_score("d", render(boxes), gt) == 0.0  # no <answer> block
    assert compute_score("d", "nothing", gt) == 0.0
    # Boxes outside the image are wrong predictions, not dropped: P = 2 / 52.
    outside = [[100 + i, 100, 110 + i, 110] for i in range(50)]
    flood = f"<answer>{render(boxes[:2] + outside)}</answer>"
    assert compute_score("d", flood, gt) == pytest.approx(0.5 * 2 / 52 + 0.5 * 2 / 3)
    # The DIP-R1 format term reads the think/look/answer layout.
    reply = f"<think>three</think><look>{render(boxes[:1])}</look><answer>{render(boxes)}</answer>"
    assert compute_score("d", reply, gt, format_weight=1.0) == 2.0


def test_default_spec():
    assert default_spec("detect", 0.5, 0.3, 0.7) == {
        "weighted_precision_recall": {"weight": 1.0, "iou": 0.7},
        "think_look_answer_format": 0.5,
    }
    assert default_spec("kvg", 0.5, 0.3, 0.7) == {
        "iou_thresholded": {"weight": 1.0, "tau": 0.3},
        "think_answer_format": 0.5,
    }


def test_verl_skips_empty_splits(tmp_path):
    shards = write([make_sample(i, "sft") for i in range(3)], tmp_path / "shards")
    out = export_verl(shards, tmp_path / "verl", codec="norm1000")
    assert sorted(p.name for p in out.iterdir()) == ["sft.parquet"]
    rows = load_split(out, "sft", tmp_path)
    assert len(rows) == 3
    truth = json.loads(rows[0]["reward_model"]["ground_truth"])
    assert truth["codec"] == "norm1000" and (truth["width"], truth["height"]) == (8, 6)


def test_llamafactory_think_boxes_share_the_answers_frame():
    from groundforge.filters.rationale import with_rationale

    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (20, 120, 200)).save(buf, "PNG")
    sample = dataclasses.replace(
        big_sample(),
        image=buf.getvalue(),
        width=1600,
        height=1200,
        gt_boxes=(Box(400, 300, 1200, 900),),
    )
    # The teacher wrote its boxes in qwen25vl at 1003520 (1148 x 840)...
    teacher = get_codec("qwen25vl", max_pixels=1003520)
    sample = with_rationale(
        sample, 'Chad is [{"bbox_2d": [287, 210, 861, 630]}], not [0, 0, 736, 499].', teacher
    )
    # ...the export writes them, like the answer, in 401408's 728 x 532.
    codec = get_codec("qwen25vl", max_pixels=401408)
    exported = export_image(sample, codec)
    record = sharegpt_record(sample, codec, "x.png", exported)
    assert (exported.width, exported.height) == (728, 532)
    assert record["messages"][1]["content"] == (
        '<think>Chad is [{"bbox_2d": [182, 133, 546, 399]}], not [{"bbox_2d": [0, 0, 467, 316]}].'
        '</think><answer>[{"bbox_2d": [182, 133, 546, 399], "label": "Chad"}]</answer>'
    )
