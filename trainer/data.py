"""Shards to TRL datasets: one pixel budget, boxes in the trained model's frame.

Every image is first resized to the pixel budget of the run, its boxes (``gt_boxes`` and the
entities') scaled with it and ``width``/``height`` updated, so that what the model sees and the
boxes it is taught or rewarded with share one frame:

- ``qwen25vl`` (absolute pixels after the processor's resize): the image is resized to exactly
  the :func:`~groundforge.schemas.codecs.smart_resize` frame of the codec's budget, so the
  processor (given the same budget) leaves it alone and the rendered pixels are the ones the
  model reads (an image so elongated that its short side falls under one 28-pixel step at the
  budget is resized once more by the processor; the codec renders in that frame too);
- other codecs (relative frames): an aspect-preserving downscale to at most ``max_pixels``; the
  processor may still round the sides, which relative coordinates do not notice.

Two views come out:

- SFT: ``messages`` (user turn: image part, question [+ reasoning instruction]; assistant turn:
  ``<think>rationale</think><answer>box</answer>``, or the bare box when the sample has no
  rationale; the boxes the rationale quotes are written like the answer's, same codec, same
  frame) and ``images``; with ``completion_only=True`` the same turns as ``prompt`` and
  ``completion``, which makes TRL compute the loss on the answer only;
- GRPO: a conversational ``prompt`` (optional system turn, user turn with image part, question
  and, in the ``reasoning`` answer format, the think/answer instruction), ``image`` and the
  columns the reward functions read: ``sample_id``, ``task``, ``gt_boxes``, ``width``,
  ``height``, ``target``, ``knowledge_level``.

**Answer format** (:func:`answer_format_of`), decided from the data so that GRPO asks for what SFT
taught: ``reasoning`` when any sample of the split has a teacher rationale (SFT taught those
samples the instruction and ``<think>..</think><answer>..</answer>``), ``bare`` when none has
(SFT taught the bare question and the bare box, so GRPO prompts carry no instruction and the
rewards must read the box from the whole reply, see
:func:`groundforge.trainer.rewards.bare_answer_spec`).

Message contents are always lists of ``{"type", "text"}`` parts: Arrow needs one type per column,
and TRL fills image parts (``text`` None) with the row's images.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from groundforge.schemas.box import Box
from groundforge.schemas.codecs import (
    BoxCodec,
    Qwen25VLCodec,
    get_codec,
    render_box_template,
    smart_resize,
)
from groundforge.trainer.evaluate import REASONING_SUFFIX

_LOG = logging.getLogger(__name__)

# The suffix asking for <think> and <answer> (DeepPerception); the evaluation's own, so a model is
# scored on the prompt it was trained with.
REASONING_INSTRUCTION = REASONING_SUFFIX
# DIP-R1's three steps, for ``detect`` rows (the format the think/look/answer reward pays for).
DETECT_INSTRUCTION = (
    "  Output the thinking process in <think> </think>, the regions you inspect closely in "
    "<look> </look> and the final answer (every bounding box) in <answer> </answer> tags."
)


def instruction_for(row: Mapping[str, Any], instruction: str) -> str:
    """The instruction a row's question gets: DIP-R1's for ``detect`` rows, else ``instruction``."""
    return DETECT_INSTRUCTION if row.get("task") == "detect" else instruction


# The box format each Qwen family reads and writes (FIELD-NOTES, "Box frames of the Qwen family").
CODEC_BY_MODEL_TYPE = {
    "qwen2_vl": "norm1000",
    "qwen2_5_vl": "qwen25vl",
    "qwen3_vl": "qwen3vl",
    "qwen3_vl_moe": "qwen3vl",
}

SPLITS_FILE = "dataset_dict.json"
REASONING, BARE = "reasoning", "bare"
ANSWER_FORMATS = (REASONING, BARE)


class TrainDataError(ValueError):
    """Shards that cannot become a training set; the message names the folder or file."""


# -- codecs and frames -------------------------------------------------------------------------


def codec_name_for(model_type: str | None) -> str:
    """The box codec of a model family.

    >>> codec_name_for("qwen2_5_vl")
    'qwen25vl'
    """
    if model_type not in CODEC_BY_MODEL_TYPE:
        raise TrainDataError(
            f"no default box codec for model type {model_type!r}; set `codec` in the training "
            f"config (one of pixel, norm1000, qwen25vl, qwen3vl, norm01)"
        )
    return CODEC_BY_MODEL_TYPE[model_type]


def make_codec(name: str, max_pixels: int | None = None, min_pixels: int | None = None):
    """A codec by name; ``qwen25vl`` takes the pixel budget, since its frame depends on it.

    >>> make_codec("qwen25vl", max_pixels=401408).max_pixels
    401408
    """
    params: dict[str, Any] = {}
    if name == "qwen25vl":
        if max_pixels is not None:
            params["max_pixels"] = max_pixels
        if min_pixels is not None:
            params["min_pixels"] = min_pixels
    return get_codec(name, **params)


def frame_size(width: int, height: int, codec: BoxCodec, max_pixels: int | None) -> tuple[int, int]:
    """``(width, height)`` an image is resized to before training.

    ``qwen25vl`` takes its own budget (``codec.max_pixels``); ``max_pixels`` applies to the
    others, which are only ever scaled down (``None``: kept as they are).

    >>> frame_size(2240, 1792, Qwen25VLCodec(), None)
    (1120, 896)
    >>> frame_size(2000, 1000, get_codec("norm1000"), 200 * 100)
    (200, 100)
    """
    if isinstance(codec, Qwen25VLCodec):
        h, w = smart_resize(height, width, codec.factor, codec.min_pixels, codec.max_pixels)
        return w, h
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _scale(values: Any, sx: float, sy: float) -> list[float]:
    return Box.from_list(list(values)).scale(sx, sy).to_list()


def resize_row(row: Mapping[str, Any], codec: BoxCodec, max_pixels: int | None) -> dict[str, Any]:
    """A copy of a shard row with its image (RGB) resized to :func:`frame_size` and ``gt_boxes``,
    entity and rationale boxes, ``width`` and ``height`` in the new frame."""
    image = row["image"]
    if image.mode != "RGB":
        image = image.convert("RGB")
    # The row's width/height describe its boxes; the decoded image must agree with them.
    if image.size != (row["width"], row["height"]):
        raise TrainDataError(
            f"sample {row.get('sample_id')}: image is {image.size[0]}x{image.size[1]} but the row "
            f"says {row['width']}x{row['height']}"
        )
    width, height = frame_size(row["width"], row["height"], codec, max_pixels)
    sx, sy = width / row["width"], height / row["height"]
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = dict(row)
    out.update(
        image=image,
        width=width,
        height=height,
        gt_boxes=[_scale(b, sx, sy) for b in row["gt_boxes"]],
        entities=[{**e, "box": _scale(e["box"], sx, sy)} for e in row.get("entities") or []],
        rationale_boxes=[
            {**e, "box": _scale(e["box"], sx, sy)} for e in row.get("rationale_boxes") or []
        ],
    )
    return out


def render_answer(row: Mapping[str, Any], codec: BoxCodec, label: bool = True) -> str:
    """The row's ground-truth box(es) as the model writes them, in the row's own frame."""
    boxes = [Box.from_list(list(b)) for b in row["gt_boxes"]]
    if not boxes:
        raise TrainDataError(f"sample {row.get('sample_id')}: no ground-truth box")
    name = row.get("target") if label else None
    # A detect answer is a list even when it holds one box.
    if len(boxes) == 1 and row.get("task") != "detect":
        return codec.render(boxes[0], row["width"], row["height"], label=name)
    return codec.render_many(boxes, row["width"], row["height"], labels=[name] * len(boxes))


def render_rationale(row: Mapping[str, Any], codec: BoxCodec) -> str | None:
    """The row's rationale with the boxes it quotes written by ``codec`` in the row's own frame,
    as its answer is (a rationale of an older shard, stored as written, comes back as it is)."""
    rationale = row.get("rationale")
    if not rationale:
        return rationale
    quoted = row.get("rationale_boxes") or []
    boxes = [Box.from_list(list(e["box"])) for e in quoted]
    labels = [e["name"] or None for e in quoted]
    return render_box_template(rationale, boxes, codec, row["width"], row["height"], labels)


# -- examples ----------------------------------------------------------------------------------


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user_turn(question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "text": None}, _text(question)]}


def _head(system: str | None) -> list[dict[str, Any]]:
    return [] if system is None else [{"role": "system", "content": [_text(system)]}]


def sft_example(
    row: Mapping[str, Any],
    codec: BoxCodec,
    system: str | None = None,
    instruction: str = REASONING_INSTRUCTION,
    label: bool = True,
    completion_only: bool = False,
) -> dict[str, Any]:
    """One SFT example of a resized row (see :func:`resize_row`)."""
    box = render_answer(row, codec, label)
    rationale = render_rationale(row, codec)
    if rationale:
        question = row["question"] + instruction_for(row, instruction)
        # A detect rationale is stored with its tags (<think>..</think><look>..</look>).
        steps = rationale if row.get("task") == "detect" else f"<think>{rationale}</think>"
        answer = f"{steps}<answer>{box}</answer>"
    else:
        question, answer = row["question"], box
    prompt = [*_head(system), _user_turn(question)]
    completion = [{"role": "assistant", "content": [_text(answer)]}]
    if completion_only:
        return {"prompt": prompt, "completion": completion, "images": [row["image"]]}
    return {"messages": prompt + completion, "images": [row["image"]]}


def grpo_example(
    row: Mapping[str, Any],
    system: str | None = None,
    instruction: str = REASONING_INSTRUCTION,
    levels: Mapping[str, int] | None = None,
    answer_format: str = REASONING,
) -> dict[str, Any]:
    """One GRPO example of a resized row: the prompt, the image and the reward columns; the
    ``bare`` answer format asks the bare question, as SFT did without rationales."""
    question = row["question"]
    if answer_format == REASONING:
        question += instruction_for(row, instruction)
    return {
        "prompt": [*_head(system), _user_turn(question)],
        "image": row["image"],
        "sample_id": row["sample_id"],
        "task": row["task"],
        "gt_boxes": [list(b) for b in row["gt_boxes"]],
        "width": row["width"],
        "height": row["height"],
        "target": row["target"],
        "knowledge_level": knowledge_level(levels, row["target"]),
    }


# -- knowledge levels --------------------------------------------------------------------------


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def load_knowledge_levels(path: str | Path) -> dict[str, int]:
    """Entity -> knowledge level from a knowledge map ``{"entities": {name: {"level": int}}}``;
    names are matched ignoring case and surrounding whitespace."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainDataError(f"{path}: cannot read the knowledge map: {exc}") from None
    entities = data.get("entities") if isinstance(data, dict) else None
    if not isinstance(entities, dict):
        raise TrainDataError(f'{path}: expected {{"entities": {{name: {{"level": int}}}}}}')
    levels = {}
    for name, entry in entities.items():
        level = entry.get("level") if isinstance(entry, dict) else None
        if not isinstance(level, int) or isinstance(level, bool):
            raise TrainDataError(f"{path}: entities.{name}.level must be an integer, got {level!r}")
        levels[_key(name)] = level
    return levels


def knowledge_level(levels: Mapping[str, int] | None, entity: str) -> int | None:
    """The entity's level, or None without a map or when the map does not know it.

    >>> knowledge_level({"chad": 2}, " Chad "), knowledge_level({"chad": 2}, "Mali")
    (2, None)
    """
    return None if levels is None else levels.get(_key(entity))


# -- shards ------------------------------------------------------------------------------------


def open_shards(data: Any):
    """The shards as a ``DatasetDict`` of splits.

    ``data`` is a run folder, its ``shards/`` folder (Arrow, opened with ``load_from_disk``, or
    Parquet, opened with ``load_dataset("parquet")``), or an already loaded ``DatasetDict``.
    """
    from datasets import DatasetDict, load_from_disk

    if isinstance(data, DatasetDict):
        return data
    from groundforge.outputs.shards import shards_folder

    root = Path(data)
    folder = Path(shards_folder(root))
    if (folder / SPLITS_FILE).is_file():
        return load_from_disk(str(folder))
    files = {
        split.name: sorted(str(p) for p in split.glob("*.parquet"))
        for split in sorted(folder.iterdir() if folder.is_dir() else [])
        if split.is_dir()
    }
    files = {split: paths for split, paths in files.items() if paths}
    if not files:
        raise TrainDataError(
            f"{root}: no shards (neither {SPLITS_FILE} nor <split>/*.parquet, here or in shards/)"
        )
    return DatasetDict({split: _parquet_split(paths) for split, paths in files.items()})


def _parquet_split(paths: list[str]):
    """One split's Parquet shards as a ``Dataset``.

    0-row shards (Beam writes them when a split has fewer rows than shards) are left out: the
    ``datasets`` Parquet reader fails on them ("BatchSize must be greater than 0").
    """
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, load_dataset

    filled = [p for p in paths if pq.ParquetFile(p).metadata.num_rows > 0]
    if filled:
        return load_dataset("parquet", data_files=filled, split="train")
    features = Features.from_arrow_schema(pq.read_schema(paths[0]))
    return Dataset.from_dict({name: [] for name in features}, features=features)


@functools.cache
def _warn_fallback(split: str, fallback: str) -> None:
    # The CLI and the trainer both select the split; say it once per process.
    _LOG.warning("split %r is empty or missing; training on %r instead", split, fallback)


def select_split(shards, split: str, fallback: str | None = None, limit: int | None = None):
    """One split of the shards, its first ``limit`` rows when given.

    An empty or missing ``split`` falls back to ``fallback`` (with a warning) when that is set.
    """
    name = split
    if (split not in shards or len(shards[split]) == 0) and fallback is not None:
        _warn_fallback(split, fallback)
        name = fallback
    if name not in shards:
        raise TrainDataError(f"no split {name!r} in the shards (have: {', '.join(shards)})")
    dataset = shards[name]
    if len(dataset) == 0:
        raise TrainDataError(f"split {name!r} of the shards is empty")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def rationale_count(dataset) -> int:
    """How many rows of a split carry a non-blank rationale (read in Arrow batches)."""
    import pyarrow.compute as pc

    if "rationale" not in dataset.column_names:
        return 0
    count = 0
    column = dataset.select_columns(["rationale"]).with_format("arrow")
    for batch in column.iter(batch_size=4096):
        text = batch.column("rationale")
        filled = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
        count += int(pc.sum(filled.cast("int64")).as_py() or 0)
    return count


def answer_format_of(dataset) -> str:
    """``reasoning`` when any row of the split has a rationale, else ``bare`` (module docstring).

    >>> from datasets import Dataset
    >>> answer_format_of(Dataset.from_dict({"rationale": [None, "  "]}))
    'bare'
    >>> answer_format_of(Dataset.from_dict({"rationale": [None, "the left flag"]}))
    'reasoning'
    """
    return REASONING if rationale_count(dataset) else BARE


def grpo_split(data: Any, split: str = "grpo", fallback: str | None = "sft"):
    """The split GRPO trains on (``split``, else ``fallback`` when it is empty), whole."""
    return select_split(open_shards(data), split, fallback=fallback)


def _map(dataset, fn, features, cache_dir: str | Path | None, name: str):
    kwargs: dict[str, Any] = {"keep_in_memory": True}
    # Without a cache folder, datasets would write its cache next to the shards they came from.
    # The file is always rewritten: its name does not capture the conversion's settings.
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {
            "cache_file_name": str(Path(cache_dir) / f"{name}.arrow"),
            "load_from_cache_file": False,
        }
    return dataset.map(fn, remove_columns=dataset.column_names, features=features, **kwargs)


def _message_features():
    from datasets import List, Value

    part = {"type": Value("string"), "text": Value("string")}
    return List({"role": Value("string"), "content": List(part)})


def build_sft_dataset(
    data: Any,
    codec: BoxCodec,
    max_pixels: int | None = None,
    split: str = "sft",
    limit: int | None = None,
    system: str | None = None,
    instruction: str = REASONING_INSTRUCTION,
    label: bool = True,
    completion_only: bool = False,
    cache_dir: str | Path | None = None,
):
    """The SFT view (see the module docstring) of one split of the shards."""
    from datasets import Features, Image, List

    dataset = select_split(open_shards(data), split, limit=limit)
    messages = _message_features()
    columns = (
        {"prompt": messages, "completion": messages} if completion_only else {"messages": messages}
    )
    features = Features({**columns, "images": List(Image())})

    def convert(row):
        return sft_example(
            resize_row(row, codec, max_pixels), codec, system, instruction, label, completion_only
        )

    return _map(dataset, convert, features, cache_dir, f"sft-{codec.name}")


def build_grpo_dataset(
    data: Any,
    codec: BoxCodec,
    max_pixels: int | None = None,
    split: str = "grpo",
    fallback: str | None = "sft",
    knowledge_map: str | Path | None = None,
    limit: int | None = None,
    system: str | None = None,
    instruction: str = REASONING_INSTRUCTION,
    cache_dir: str | Path | None = None,
    answer_format: str | None = None,
):
    """The GRPO view (see the module docstring) of one split of the shards.

    The ``grpo`` split holds the items the SFT model got right only some of the time; a run
    without a student pass has none, so by default an empty ``grpo`` split falls back to ``sft``.
    ``answer_format`` (``reasoning`` or ``bare``; None: :func:`answer_format_of` the whole split)
    decides whether prompts carry ``instruction``.
    """
    from datasets import Features, Image, List, Value

    levels = None if knowledge_map is None else load_knowledge_levels(knowledge_map)
    dataset = grpo_split(data, split, fallback)
    if answer_format is None:
        answer_format = answer_format_of(dataset)
        _LOG.info("GRPO answer format: %s (decided from the %d rows)", answer_format, len(dataset))
    if answer_format not in ANSWER_FORMATS:
        raise TrainDataError(
            f"answer format {answer_format!r}: use one of {', '.join(ANSWER_FORMATS)}"
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    features = Features(
        {
            "prompt": _message_features(),
            "image": Image(),
            "sample_id": Value("string"),
            "task": Value("string"),
            "gt_boxes": List(List(Value("float64"))),
            "width": Value("int32"),
            "height": Value("int32"),
            "target": Value("string"),
            "knowledge_level": Value("int32"),
        }
    )

    def convert(row):
        resized = resize_row(row, codec, max_pixels)
        return grpo_example(resized, system, instruction, levels, answer_format)

    return _map(dataset, convert, features, cache_dir, f"grpo-{codec.name}")
