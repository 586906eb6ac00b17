"""Shards to TRL datasets: resize to one pixel budget, boxes in the model's frame, both views."""

from __future__ import annotations

import doctest
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from groundforge.examples import demo_recipe_path
from groundforge.outputs.files import write_table
from groundforge.outputs.shards import finalize_shards, shard_name
from groundforge.schemas.arrow import sample_schema, sample_to_row
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import get_codec, smart_resize
from groundforge.schemas.records import Entity, KVGSample, Provenance, stable_id
from groundforge.trainer import config as config_module
from groundforge.trainer import data as data_module
from groundforge.trainer.data import (
    REASONING_INSTRUCTION,
    TrainDataError,
    answer_format_of,
    build_grpo_dataset,
    build_sft_dataset,
    codec_name_for,
    frame_size,
    knowledge_level,
    load_knowledge_levels,
    make_codec,
    open_shards,
    rationale_count,
    render_answer,
    resize_row,
    select_split,
    sft_example,
)

FLAGS = demo_recipe_path().parent / "data" / "flags"
PAIRS = [
    ("africa/chad.png", "europe/romania.png"),
    ("europe/andorra.png", "africa/mali.png"),
    ("europe/italy/italy.png", "europe/france/france.png"),
]
# Canvas sizes with awkward aspect ratios, none a multiple of 28.
CANVASES = [(530, 270), (301, 419), (777, 555)]
BUDGET = 28 * 28 * 16  # the tiny test VLM's maximum


def _flag(name: str, width: int, height: int) -> Image.Image:
    image = Image.open(FLAGS / name)
    image = image.convert("RGBA")
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image)
    return canvas.resize((width, height))


def _entity(name: str) -> str:
    return Path(name).stem.title()


def flag_samples(grpo: int = 2) -> list[KVGSample]:
    """Two-flag scenes (left and right) at odd sizes, one sample per flag; every other sample has
    a rationale; the last ``grpo`` samples are in the grpo split, and one scene goes to val."""
    samples = []
    for index, ((left, right), (width, height)) in enumerate(zip(PAIRS, CANVASES, strict=True)):
        half = width // 2
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        boxes = {}
        for name, x in ((left, 4), (right, half + 4)):
            flag = _flag(name, half - 8, height // 2)
            canvas.paste(flag, (x, height // 4))
            boxes[_entity(name)] = Box(x, height // 4, x + flag.width, height // 4 + flag.height)
        buffer = io.BytesIO()
        canvas.save(buffer, "PNG")
        entities = tuple(Entity(name, box) for name, box in boxes.items())
        for target, box in boxes.items():
            rationale = None
            if len(samples) % 2 == 0:
                rationale = f"Two flags; the one with the colours of {target} is the target."
            question = (
                f"Find and give the bounding box of <|object_ref_start|>{target}<|object_ref_end|>"
            )
            samples.append(
                KVGSample(
                    sample_id=stable_id("trainer-test", index, target),
                    image=buffer.getvalue(),
                    width=width,
                    height=height,
                    domain="flag",
                    task="kvg",
                    question=question,
                    target=target,
                    entities=entities,
                    gt_boxes=(box,),
                    split="val" if index == 2 else "sft",
                    provenance=Provenance(layout="horizontal"),
                    rationale=rationale,
                )
            )
    train = [s for s in samples if s.split == "sft"]
    for sample in train[len(train) - grpo :] if grpo else []:
        samples[samples.index(sample)] = replace(sample, split="grpo")
    return samples


def write_shards(folder: Path, samples: list[KVGSample], fmt: str = "arrow") -> Path:
    """Shards as the pipeline lays them out (``folder/shards/<split>/...``); returns ``folder``."""
    shards = folder / "shards"
    splits = ("sft", "grpo", "val")
    for split in splits:
        rows = [sample_to_row(s) for s in samples if s.split == split]
        if rows:
            path = shards / split / shard_name(0, 1, fmt)
            write_table(str(path), rows, sample_schema(), fmt)
    finalize_shards(str(shards), list(splits), fmt)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), flag_samples())


@pytest.fixture(scope="module")
def first_row(run_dir):
    return open_shards(run_dir)["sft"][0]


def test_doctests():
    assert doctest.testmod(data_module).failed == 0
    assert doctest.testmod(config_module).failed == 0


# -- frames ------------------------------------------------------------------------------------


def test_codecs_follow_the_model_family():
    assert codec_name_for("qwen2_vl") == "norm1000"
    assert codec_name_for("qwen2_5_vl") == "qwen25vl"
    assert codec_name_for("qwen3_vl") == "qwen3vl"
    with pytest.raises(TrainDataError, match="set `codec`"):
        codec_name_for("llava")


@pytest.mark.parametrize("width, height", [*CANVASES, (2240, 1792), (100, 900), (29, 29)])
def test_qwen25vl_frame_is_a_fixed_point_of_the_processor(width, height):
    from transformers import Qwen2VLImageProcessorPil

    codec = make_codec("qwen25vl", max_pixels=BUDGET, min_pixels=28 * 28 * 4)
    w, h = frame_size(width, height, codec, None)
    assert (h, w) == smart_resize(height, width, 28, 28 * 28 * 4, BUDGET)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= BUDGET
    # The processor given the same budget leaves the resized image as it is.
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": BUDGET}
    )
    grid = processor(images=Image.new("RGB", (w, h)), return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, h // 14, w // 14]]


def test_other_codecs_scale_down_to_the_budget_keeping_the_aspect():
    codec = get_codec("norm1000")
    assert frame_size(777, 555, codec, None) == (777, 555)
    assert frame_size(120, 100, codec, BUDGET) == (120, 100)  # never scaled up
    w, h = frame_size(2000, 1000, codec, BUDGET)
    assert w * h <= BUDGET and abs(w / h - 2) < 0.02


@pytest.mark.parametrize(
    "codec",
    [
        make_codec("qwen25vl", max_pixels=BUDGET),
        make_codec("qwen25vl", max_pixels=401_408),
        get_codec("norm1000"),
        get_codec("qwen3vl"),
    ],
    ids=lambda c: f"{c.name}-{getattr(c, 'max_pixels', '')}",
)
def test_resized_boxes_render_like_the_original(first_row, codec):
    row = dict(first_row)
    resized = resize_row(row, codec, BUDGET)
    sx, sy = resized["width"] / row["width"], resized["height"] / row["height"]
    assert resized["image"].size == (resized["width"], resized["height"])
    assert resized["image"].mode == "RGB"
    # Every box is scaled by the image's own factors.
    for before, after in zip(row["entities"], resized["entities"], strict=True):
        x1, y1, x2, y2 = before["box"]
        assert after["box"] == pytest.approx([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
    # The codec renders the resized box exactly as it renders the original one: for qwen25vl
    # both are pixels of the processor's frame, for relative codecs the frame does not move.
    original = Box.from_list(row["gt_boxes"][0])
    expected = codec.render(original, row["width"], row["height"], label=row["target"])
    assert render_answer(resized, codec) == expected
    assert render_answer(resized, codec, label=False) == codec.render(
        original, row["width"], row["height"]
    )
    if codec.name == "qwen25vl":
        x1, y1, x2, y2 = json.loads(render_answer(resized, codec, label=False))[0]["bbox_2d"]
        box = resized["gt_boxes"][0]
        assert [x1, y1, x2, y2] == [round(v) for v in box]
    # Reading the answer back in the original image lands within one frame step of the box.
    back = codec.parse_last(expected, row["width"], row["height"])
    ux, uy = codec.unit(row["width"], row["height"])
    assert abs(back.x1 - original.x1) <= ux and abs(back.y2 - original.y2) <= uy


def test_a_row_whose_image_disagrees_with_its_size_is_refused(first_row):
    row = {**first_row, "width": first_row["width"] + 1}
    with pytest.raises(TrainDataError, match="image is"):
        resize_row(row, get_codec("norm1000"), None)


# -- views -------------------------------------------------------------------------------------


def test_sft_view_messages(run_dir):
    codec = make_codec("qwen25vl", max_pixels=BUDGET)
    shards = open_shards(run_dir)
    dataset = build_sft_dataset(run_dir, codec, split="sft", system="Be precise.")
    assert dataset.column_names == ["messages", "images"]
    assert len(dataset) == len(shards["sft"])
    for example, row in zip(dataset, shards["sft"], strict=True):
        resized = resize_row(row, codec, None)
        system, user, assistant = example["messages"]
        assert system == {"role": "system", "content": [{"type": "text", "text": "Be precise."}]}
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"][0] == {"type": "image", "text": None}
        box = render_answer(resized, codec)
        (image,) = example["images"]
        assert image.size == (resized["width"], resized["height"])
        if row["rationale"]:
            assert user["content"][1]["text"] == row["question"] + REASONING_INSTRUCTION
            answer = f"<think>{row['rationale']}</think><answer>{box}</answer>"
        else:
            assert user["content"][1]["text"] == row["question"]
            answer = box
        assert assistant["content"] == [{"type": "text", "text": answer}]
    assert any(row["rationale"] for row in shards["sft"])
    assert not all(row["rationale"] for row in shards["sft"])


def test_sft_view_prompt_completion_and_limit(run_dir):
    codec = get_codec("norm1000")
    dataset = build_sft_dataset(run_dir, codec, BUDGET, limit=1, completion_only=True)
    assert dataset.column_names == ["prompt", "completion", "images"]
    assert len(dataset) == 1
    (example,) = dataset
    assert [m["role"] for m in example["prompt"]] == ["user"]
    assert [m["role"] for m in example["completion"]] == ["assistant"]
    assert "<|box_start|>" in example["completion"][0]["content"][0]["text"]
    width, height = example["images"][0].size
    assert width * height <= BUDGET


def test_grpo_view_columns_and_knowledge_levels(run_dir, tmp_path):
    knowledge = tmp_path / "knowledge.json"
    targets = open_shards(run_dir)["grpo"]["target"]
    known = targets[0]
    knowledge.write_text(
        json.dumps({"entities": {f"  {known.upper()} ": {"level": 3, "accuracy": 0.2}}})
    )
    codec = make_codec("qwen25vl", max_pixels=BUDGET)
    dataset = build_grpo_dataset(run_dir, codec, knowledge_map=knowledge)
    assert dataset.column_names == [
        "prompt",
        "image",
        "sample_id",
        "task",
        "gt_boxes",
        "width",
        "height",
        "target",
        "knowledge_level",
    ]
    rows = {r["sample_id"]: r for r in open_shards(run_dir)["grpo"]}
    assert sorted(dataset["sample_id"]) == sorted(rows)
    for example in dataset:
        row = rows[example["sample_id"]]
        resized = resize_row(row, codec, None)
        (user,) = example["prompt"]
        assert user["content"][0]["type"] == "image"
        assert user["content"][1]["text"] == row["question"] + REASONING_INSTRUCTION
        assert example["image"].size == (resized["width"], resized["height"])
        assert (example["width"], example["height"]) == (resized["width"], resized["height"])
        assert example["gt_boxes"] == resized["gt_boxes"]  # float64 all the way
        assert example["task"] == "kvg" and example["target"] == row["target"]
        assert example["knowledge_level"] == (3 if row["target"] == known else None)


def test_grpo_asks_for_the_answer_format_sft_taught(run_dir, tmp_path):
    codec = make_codec("qwen25vl", max_pixels=BUDGET)
    shards = open_shards(run_dir)
    # Half the flag samples have a rationale: SFT taught the instruction, so GRPO asks for it.
    assert rationale_count(shards["grpo"]) == 1 and len(shards["grpo"]) == 2
    assert answer_format_of(shards["grpo"]) == "reasoning"
    # A corpus without rationales (the demo's): SFT taught the bare box after the bare question.
    bare = write_shards(tmp_path / "bare", [replace(s, rationale=None) for s in flag_samples()])
    assert rationale_count(open_shards(bare)["sft"]) == 0
    for folder, suffix in ((run_dir, REASONING_INSTRUCTION), (bare, "")):
        examples = build_grpo_dataset(folder, codec)
        rows = open_shards(folder)["grpo"]
        assert len(examples) == len(rows) == 2
        for example, row in zip(examples, rows, strict=True):
            assert example["prompt"][-1]["content"][1]["text"] == row["question"] + suffix
    sft = build_sft_dataset(bare, codec, completion_only=True)
    assert all(e["prompt"][-1]["content"][1]["text"].endswith("<|object_ref_end|>") for e in sft)
    assert all(e["completion"][0]["content"][0]["text"].startswith("[{") for e in sft)
    # The format can also be given; an unknown one is refused.
    (forced,) = build_grpo_dataset(run_dir, codec, answer_format="bare", limit=1)
    assert forced["prompt"][-1]["content"][1]["text"].endswith("<|object_ref_end|>")
    with pytest.raises(TrainDataError, match="answer format 'json'"):
        build_grpo_dataset(run_dir, codec, answer_format="json")


def test_knowledge_map_errors_name_the_file(tmp_path):
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"entities": {"Chad": {"level": "high"}}}))
    with pytest.raises(TrainDataError, match=r"map\.json: entities\.Chad\.level"):
        load_knowledge_levels(bad)
    bad.write_text("[]")
    with pytest.raises(TrainDataError, match="map.json"):
        load_knowledge_levels(bad)
    assert knowledge_level(None, "Chad") is None


def test_grpo_falls_back_to_sft_when_its_split_is_empty(tmp_path):
    folder = write_shards(tmp_path, flag_samples(grpo=0))
    shards = open_shards(folder)
    assert len(shards["grpo"]) == 0
    dataset = build_grpo_dataset(folder, get_codec("qwen3vl"), BUDGET)
    assert sorted(dataset["sample_id"]) == sorted(shards["sft"]["sample_id"])
    with pytest.raises(TrainDataError, match="'grpo' of the shards is empty"):
        build_grpo_dataset(folder, get_codec("qwen3vl"), BUDGET, fallback=None)
    with pytest.raises(TrainDataError, match="no split 'test'"):
        select_split(shards, "test")
    assert len(select_split(shards, "sft", limit=2)) == 2


def test_shards_open_from_the_run_its_shards_folder_or_parquet(tmp_path, run_dir):
    by_run = open_shards(run_dir)
    assert sorted(open_shards(run_dir / "shards")) == sorted(by_run) == ["grpo", "sft", "val"]
    parquet = write_shards(tmp_path / "pq", flag_samples(), fmt="parquet")
    assert not (parquet / "shards" / "dataset_dict.json").exists()
    by_parquet = open_shards(parquet)
    for split in ("sft", "grpo", "val"):
        assert sorted(by_parquet[split]["sample_id"]) == sorted(by_run[split]["sample_id"])
    assert isinstance(by_parquet["sft"][0]["image"], Image.Image)
    # A split of 0-row shards opens empty, and GRPO falls back to sft.
    empty = open_shards(write_shards(tmp_path / "pq0", flag_samples(grpo=0), fmt="parquet"))
    assert len(empty["grpo"]) == 0 and empty["grpo"].features == by_parquet["grpo"].features
    assert len(select_split(empty, "grpo", fallback="sft")) == len(empty["sft"])
    with pytest.raises(TrainDataError, match="no shards"):
        open_shards(tmp_path / "nowhere")


def test_the_cache_stays_out_of_the_shards(run_dir, tmp_path):
    before = sorted(p.name for p in (run_dir / "shards" / "sft").iterdir())
    build_sft_dataset(run_dir, get_codec("norm1000"), BUDGET, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (run_dir / "shards" / "sft").iterdir()) == before
    assert list((tmp_path / "cache").glob("*.arrow"))


# -- --set overrides ----------------------------------------------------------------------------


def test_set_values_are_read_as_the_field_type(tmp_path):
    from groundforge.cli import _overrides
    from groundforge.trainer.config import TrainConfigError, load_train_config

    settings = (
        "sft.save_strategy=no",  # a Literal of strings: YAML alone reads it as false
        "grpo.split=off",  # a plain string
        "sft.split=2024",
        "sft.lr_scheduler_type=constant",
        "freeze_vision=no",  # booleans keep YAML's yes/no/on/off
        "sft.gradient_checkpointing=off",
        "grpo.use_vllm=true",
        "sft.max_steps=2",
        "sft.learning_rate=3.0e-6",
        "lora={r: 8}",
        "lora.target_modules=[q_proj, v_proj]",
        "attn_implementation=null",
    )
    overrides = _overrides(settings)
    assert overrides["sft.save_strategy"] == "no" and overrides["freeze_vision"] is False
    cfg = load_train_config(None, overrides)
    assert cfg.sft.save_strategy == "no" and cfg.grpo.split == "off" and cfg.sft.split == "2024"
    assert cfg.sft.lr_scheduler_type == "constant"
    assert cfg.freeze_vision is False and cfg.sft.gradient_checkpointing is False
    assert cfg.grpo.use_vllm is True
    assert cfg.sft.max_steps == 2 and isinstance(cfg.sft.max_steps, int)
    assert cfg.sft.learning_rate == 3e-6
    assert cfg.lora is not None and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.attn_implementation is None
    # A value the field's type cannot take is still refused, naming the field.
    with pytest.raises(TrainConfigError, match="sft.save_strategy"):
        load_train_config(None, _overrides(("sft.save_strategy=sometimes",)))
    with pytest.raises(TrainConfigError, match="sft.max_steps"):
        load_train_config(None, _overrides(("sft.max_steps=no",)))


# -- training log -------------------------------------------------------------------------------


def test_each_run_starts_its_own_log(tmp_path):
    from transformers import TrainerControl, TrainerState

    from groundforge.trainer.callbacks import LOG_FILE, TrainLogCallback, read_log

    def run(steps, start=0):
        """A run's callback events: train begin at ``start``, then one log per step."""
        callback = TrainLogCallback(tmp_path / LOG_FILE)
        state = TrainerState(global_step=start)
        callback.on_train_begin(None, state, TrainerControl())
        for step in steps:
            state.global_step = step
            callback.on_log(None, state, TrainerControl(), logs={"loss": float(step)})

    run([1, 2, 3])
    run([1, 2])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_log(tmp_path / "train_log.1.jsonl")] == [1, 2, 3]
    run([1])
    assert [r["step"] for r in read_log(tmp_path / "train_log.2.jsonl")] == [1, 2]
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    # A run killed after step 4, resumed from its step-2 checkpoint: the log goes on from there.
    run([1, 2, 3, 4])
    with (tmp_path / LOG_FILE).open("a") as log:
        log.write('{"step": 5, "metr')  # the half-written line of a killed run
    run([3, 4], start=2)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert [r["metrics"]["loss"] for r in read_log(tmp_path)] == [1.0, 2.0, 3.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train_log.1.jsonl", "train_log.2.jsonl", "train_log.3.jsonl", LOG_FILE
    ]  # fmt: skip


# -- rationale boxes in the student's frame -----------------------------------------------------


def _teacher_sample(teacher, think: str, answer: str) -> KVGSample:
    """A 1600 x 1200 sample whose rationale went through the pipeline's rationale check."""
    from groundforge.filters.rationale import RationaleRules
    from groundforge.pipelines.kvg import attach_rationale

    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(buf, "PNG")
    target = Box(400, 300, 1200, 900)
    sample = KVGSample(
        sample_id=stable_id("frames", teacher.name),
        image=buf.getvalue(),
        width=1600,
        height=1200,
        domain="flag",
        task="kvg",
        question="Find and give the bounding box of <|object_ref_start|>Chad<|object_ref_end|>",
        target="Chad",
        entities=(Entity("Chad", target),),
        gt_boxes=(target,),
        split="sft",
        provenance=Provenance(),
    )
    text = f"<think>{think}</think><answer>{answer}</answer>"
    kept = attach_rationale((sample, (text,)), teacher, RationaleRules(), "teacher-m")
    assert kept.keep, kept.reason
    return kept.value


@pytest.mark.parametrize(
    ("teacher", "first", "second", "answer"),
    [
        (
            get_codec("qwen25vl", max_pixels=1003520),
            '[{"bbox_2d": [0, 0, 736, 499]}]',
            "[574, 420, 1148, 840]",
            '[{"bbox_2d": [287, 210, 861, 630]}]',
        ),
        (
            get_codec("norm1000"),
            "<|box_start|>(0,0),(641,594)<|box_end|>",
            "<|box_start|>(500,500),(1000,1000)<|box_end|>",
            "<|box_start|>(250,250),(750,750)<|box_end|>",
        ),
    ],
    ids=["qwen25vl@1003520", "norm1000"],
)
def test_sft_target_writes_every_box_in_the_students_frame(
    tmp_path, teacher, first, second, answer
):
    think = f"Chad's flag is not the striped one at {first}; the blue-yellow-red one at {second}."
    sample = _teacher_sample(teacher, think, answer)
    student = make_codec("qwen25vl", max_pixels=401408)  # 1600 x 1200 trains at 728 x 532
    dataset = build_sft_dataset(write_shards(tmp_path, [sample]), student, split="sft")
    (example,) = list(dataset)
    assert example["images"][0].size == (728, 532)
    assert example["messages"][1]["content"] == [
        {
            "type": "text",
            "text": "<think>Chad's flag is not the striped one at "
            '[{"bbox_2d": [0, 0, 467, 316]}]; the blue-yellow-red one at '
            '[{"bbox_2d": [364, 266, 728, 532]}].</think>'
            '<answer>[{"bbox_2d": [182, 133, 546, 399], "label": "Chad"}]</answer>',
        }
    ]


def test_a_rationale_of_an_older_shard_trains_as_written():
    sample = _teacher_sample(
        get_codec("pixel"),
        "Chad's flag is the blue, yellow and red one in the middle of the picture.",
        "[400, 300, 1200, 900]",
    )
    # A row of a shard written before rationales kept their boxes apart: no such column.
    row = sample_to_row(replace(sample, rationale="Chad's flag is at [1, 2, 3, 4], I read."))
    del row["rationale_boxes"]
    row["image"] = Image.open(io.BytesIO(sample.image))
    codec = make_codec("qwen25vl", max_pixels=401408)
    example = sft_example(resize_row(row, codec, None), codec)
    text = example["messages"][1]["content"][0]["text"]
    assert text.startswith("<think>Chad's flag is at [1, 2, 3, 4], I read.</think><answer>")
