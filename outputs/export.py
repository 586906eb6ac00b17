"""Shards to the formats other trainers read: LLaMA-Factory (SFT) and verl (RL).

**Box frame and image size.** A box is rendered by a codec in the frame of the image the trainer
will show the model. For ``qwen25vl`` that frame is the image *after* the Qwen2.5-VL processor's
resize (:func:`~groundforge.schemas.codecs.smart_resize` with the codec's ``min_pixels`` /
``max_pixels``), so the exporters **resize every image to the codec frame before writing it**
(bicubic, as the processor does) and render boxes in the written image's pixels. The processor
then leaves the image as it is (``smart_resize`` of a size it produced is that size), whatever
``max_pixels`` the trainer's processor uses, as long as it is at least the codec's: with
LLaMA-Factory set ``image_max_pixels`` to at least the codec's ``max_pixels`` (KARL: 401,408 =
512 x 28 x 28, pass ``codec_params={"max_pixels": 401408}``) so it does not shrink the image
further; with verl the same for the processor. The other codecs are relative frames (0..1000,
0..1) or the stored image itself (``pixel``): images are written at their stored size. Pass
``resize=False``/``True`` to override.

**LLaMA-Factory** (:func:`export_llamafactory`): one dataset per non-empty split,
``dest/<dataset_name>_<split>.json`` (a list of sharegpt records of that split only), one
``dest/dataset_info.json`` entry per split named ``<dataset_name>_<split>`` (merged into any
existing file) and ``dest/images/<sha256>.png`` (one PNG per distinct written image, named by the
sha256 of its bytes, shared by the splits). The training splits go in LLaMA-Factory's
``dataset:`` (``groundforge_sft,groundforge_grpo``) and ``val`` in ``eval_dataset:``
(``groundforge_val``), so no evaluation sample is trained on. A record::

    {"messages": [
        {"role": "user", "content": "<image>Find and give the bounding box of
            <|object_ref_start|>Chad<|object_ref_end|>  Output the thinking process in <think>
            </think> and final answer (bounding box) in <answer> </answer> tags."},
        {"role": "assistant", "content": "<think>The left flag ...</think><answer>[{\\"bbox_2d\\":
            [28, 28, 140, 112], \\"label\\": \\"Chad\\"}]</answer>"}],
     "images": ["images/3f1c...e9.png"]}

A sample with a rationale gets the reasoning instruction (:data:`REASONING_INSTRUCTION`) after
its question and ``<think>RATIONALE</think><answer>BOX</answer>`` as the answer (the boxes the
rationale quotes written like BOX: same codec, same written image); one without
gets the bare question and the box alone. A ``kvg`` answer is the target's box labelled with its
name; a ``detect`` answer is every ground-truth box, unlabelled.

**verl** (:func:`export_verl`): ``dest/<split>.parquet`` per non-empty split, the columns of
verl's RLHF dataset (images decode through the ``datasets`` ``Image`` feature)::

    {"data_source": "groundforge/flag",
     "prompt": [{"role": "user", "content": "<image>Find and give ... <answer> </answer> tags."}],
     "images": [{"bytes": b"\\x89PNG...", "path": None}],
     "ability": "grounding",
     "reward_model": {"style": "rule", "ground_truth": "{\\"codec\\": \\"qwen25vl\\",
         \\"codec_params\\": {}, \\"width\\": 224, \\"height\\": 168, \\"task\\": \\"kvg\\",
         \\"boxes\\": [[28, 28, 140, 112]]}"},
     "extra_info": {"split": "grpo", "index": 0, "sample_id": "9a0c...", "width": 224,
         "height": 168, "boxes": [[28.0, 28.0, 140.0, 112.0]], "target": "Chad", "task": "kvg"}}

``ground_truth`` holds the boxes as the codec renders them in the written image, the codec and
its parameters, and the written image's size: all that
:func:`groundforge.outputs.verl_reward.compute_score` needs. ``extra_info.boxes`` are the same
boxes in float pixels of the written image.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundforge.schemas.box import Box
from groundforge.schemas.codecs import BoxCodec, get_codec, render_box_template
from groundforge.schemas.records import sha256_hex
from groundforge.trainer.evaluate import REASONING_SUFFIX

IMAGE_TOKEN = "<image>"
# The trainer's and the evaluation's own suffix (it starts with its separating spaces), so an
# exported model is trained on the prompt it is evaluated with.
REASONING_INSTRUCTION = REASONING_SUFFIX
ABILITIES = {"kvg": "grounding", "detect": "detection"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_VERL_BATCH = 64


# The codec of an export that names no model: the Qwen2.5-VL frame.
DEFAULT_CODEC = "qwen25vl"


def choose_export_codec(
    model: str | os.PathLike | None = None,
    codec: str | None = None,
    max_pixels: int | None = None,
) -> tuple[str, dict[str, Any], str]:
    """``(codec, codec_params, source)`` of an export, the frame ``train`` would use.

    A given ``codec`` wins; else ``model``'s family by training's rule
    (:func:`groundforge.trainer.data.codec_name_for` of its model type; ``ValueError`` for an
    unknown family or an unreadable config); else :data:`DEFAULT_CODEC`. With a ``model``,
    ``qwen25vl`` gets training's pixel budget (``max_pixels``, else the default config's,
    401,408) and its processor's minimum clamped to it, as training sets the processor; without
    one, ``max_pixels`` or the codec's defaults. Other codecs take no parameters and ignore
    ``max_pixels``.
    """
    from groundforge.trainer.config import load_train_config
    from groundforge.trainer.data import TrainDataError, codec_name_for
    from groundforge.trainer.evaluate import model_type_for_codec, processor_budget

    if codec is not None:
        source = "given"
    elif model is None:
        codec, source = DEFAULT_CODEC, "the default without a model"
    else:
        model_type = model_type_for_codec(model)
        try:
            codec = codec_name_for(model_type)
        except TrainDataError:
            raise ValueError(
                f"{model}: no default box codec for model type {model_type!r}; choose a codec"
            ) from None
        source = f"from model type {model_type}, as train derives it"
    if codec != "qwen25vl":
        return codec, {}, source
    params: dict[str, Any] = {}
    if model is not None:
        params["max_pixels"] = max_pixels or load_train_config().max_pixels
        low = processor_budget(str(model)).get("min_pixels")
        if low is not None:
            params["min_pixels"] = min(low, params["max_pixels"])
    elif max_pixels:
        params["max_pixels"] = max_pixels
    return codec, params, source


@dataclass(frozen=True)
class ExportImage:
    """A sample's image as written: PNG bytes, size, and its boxes in that image's pixels."""

    png: bytes
    width: int
    height: int
    boxes: tuple[Box, ...]

    @property
    def sha256(self) -> str:
        return sha256_hex(self.png)


def _needs_resize(codec: BoxCodec, resize: bool | None) -> bool:
    return codec.name == "qwen25vl" if resize is None else resize


def export_image(sample: Any, codec: BoxCodec, resize: bool | None = None) -> ExportImage:
    """The sample's image as exported (resized to the codec frame when that is a pixel frame,
    see the module doc) with its ground-truth boxes mapped into it."""
    from PIL import Image

    width, height = sample.width, sample.height
    target = (width, height)
    if _needs_resize(codec, resize):
        fw, fh = codec.frame(width, height)
        target = (int(fw), int(fh))
    image = Image.open(io.BytesIO(sample.image))
    if target != image.size or not sample.image.startswith(_PNG_MAGIC):
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
        if target != image.size:
            image = image.resize(target, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        png = buf.getvalue()
    else:
        png = sample.image
    sx, sy = target[0] / width, target[1] / height
    boxes = tuple(box.scale(sx, sy) for box in sample.gt_boxes)
    return ExportImage(png, target[0], target[1], boxes)


def think_text(rationale: str | None) -> str | None:
    """The reasoning of a stored rationale: the think text, whether the rationale is stored as
    the think text alone (the pipeline's way) or as a whole ``<think>..</think><answer>..``.

    >>> think_text("<think> a </think><answer>[1, 2, 3, 4]</answer>"), think_text("b")
    ('a', 'b')
    >>> think_text("") is None
    True
    """
    if rationale is None or not rationale.strip():
        return None
    text = rationale
    if "<think>" in text or "</think>" in text:
        start = text.find("<think>")
        start = 0 if start < 0 else start + len("<think>")
        end = text.find("</think>", start)
        text = text[start:] if end < 0 else text[start:end]
    text = text.strip()
    return text or None


def rationale_text(sample: Any, exported: ExportImage, codec: BoxCodec) -> str | None:
    """The sample's stored rationale with the boxes it quotes (``rationale_boxes``) written by
    ``codec`` in the exported image's frame, as the answer box is; None without a rationale."""
    if sample.rationale is None:
        return None
    sx, sy = exported.width / sample.width, exported.height / sample.height
    quoted = getattr(sample, "rationale_boxes", ())
    boxes = [e.box.scale(sx, sy) for e in quoted]
    labels = [e.name or None for e in quoted]
    return render_box_template(
        sample.rationale, boxes, codec, exported.width, exported.height, labels
    )


def render_answer_box(sample: Any, exported: ExportImage, codec: BoxCodec) -> str:
    """The ground truth as the model writes it: a ``kvg`` target's box labelled with its name,
    or every box of a ``detect`` sample."""
    if not exported.boxes:
        raise ValueError(f"sample {sample.sample_id} has no ground-truth box")
    if sample.task == "kvg" and len(exported.boxes) == 1:
        label = sample.target or None
        return codec.render(exported.boxes[0], exported.width, exported.height, label)
    return codec.render_many(list(exported.boxes), exported.width, exported.height)


def user_prompt(question: str, reasoning: bool) -> str:
    """``<image>`` then the question, and the reasoning instruction when asked for."""
    text = f"{IMAGE_TOKEN}{question}"
    return f"{text}{REASONING_INSTRUCTION}" if reasoning else text


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)


EVAL_SPLITS = ("val",)


def split_dataset_name(dataset_name: str, split: str) -> str:
    """The LLaMA-Factory dataset name (and file stem) of one split.

    >>> split_dataset_name("groundforge", "val")
    'groundforge_val'
    """
    return f"{dataset_name}_{split}"


def dataset_info_entry(dataset_name: str) -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json`` entry for an exported sharegpt file."""
    return {
        dataset_name: {
            "file_name": f"{dataset_name}.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }


def sharegpt_record(sample: Any, codec: BoxCodec, image_name: str, exported: ExportImage) -> dict:
    """One sample as a sharegpt record whose image is ``images/<image_name>``."""
    box = render_answer_box(sample, exported, codec)
    think = think_text(rationale_text(sample, exported, codec))
    answer = box if think is None else f"<think>{think}</think><answer>{box}</answer>"
    return {
        "messages": [
            {"role": "user", "content": user_prompt(sample.question, think is not None)},
            {"role": "assistant", "content": answer},
        ],
        "images": [f"images/{image_name}"],
    }


def _write_sharegpt(
    samples: Iterable, json_path: Path, codec: BoxCodec, resize: bool | None, written: set[str]
) -> int:
    """Stream ``samples`` into ``json_path`` (images beside it, each written once); returns the
    row count. An empty split writes no file."""
    images_dir = json_path.parent / "images"
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("[")
            for sample in samples:
                exported = export_image(sample, codec, resize)
                name = f"{exported.sha256}.png"
                if name not in written:
                    image_path = images_dir / name
                    if not image_path.is_file():
                        image_path.write_bytes(exported.png)
                    written.add(name)
                record = sharegpt_record(sample, codec, name, exported)
                out.write(",\n" if count else "\n")
                out.write(json.dumps(record, ensure_ascii=False))
                count += 1
            out.write("\n]\n")
        if count:
            tmp.replace(json_path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _read_dataset_info(info_path: Path) -> dict[str, Any]:
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{info_path} is not JSON ({exc}); fix or remove it") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} does not hold a JSON object; fix or remove it")
    return info


def export_llamafactory(
    shards_dir: str | Path,
    dest: str | Path,
    codec: str = "qwen25vl",
    codec_params: Mapping[str, Any] | None = None,
    splits: Sequence[str] | None = None,
    dataset_name: str = "groundforge",
    resize: bool | None = None,
    fmt: str | None = None,
) -> dict[str, Path]:
    """Write each non-empty split (``splits``, default all) as its own LLaMA-Factory sharegpt
    dataset ``<dataset_name>_<split>`` in ``dest``; returns split -> JSON file. See the module
    doc for the layout and the image frame."""
    from groundforge.outputs.shards import (
        detect_format,
        read_samples,
        shards_folder,
        splits_on_disk,
    )

    box_codec = get_codec(codec, **dict(codec_params or {}))
    dest = Path(dest)
    info_path = dest / "dataset_info.json"
    # Checked before any row is written, so a broken file costs no export time.
    info = _read_dataset_info(info_path)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    shards_dir = shards_folder(shards_dir)
    fmt = fmt or detect_format(shards_dir)
    if splits is None:
        splits = sorted(splits_on_disk(shards_dir, fmt))

    written: set[str] = set()
    paths: dict[str, Path] = {}
    for split in dict.fromkeys(splits):
        name = split_dataset_name(dataset_name, split)
        path = dest / f"{name}.json"
        samples = read_samples(shards_dir, split, fmt=fmt)
        if _write_sharegpt(samples, path, box_codec, resize, written):
            paths[split] = path
            info.update(dataset_info_entry(name))
    _write_atomic(info_path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return paths


def llamafactory_datasets(dataset_name: str, splits: Sequence[str]) -> dict[str, list[str]]:
    """The exported dataset names for LLaMA-Factory's ``dataset`` (training) and
    ``eval_dataset`` keys: the :data:`EVAL_SPLITS` go to evaluation only.

    >>> llamafactory_datasets("kvg", ["grpo", "sft", "val"])
    {'dataset': ['kvg_grpo', 'kvg_sft'], 'eval_dataset': ['kvg_val']}
    """
    names: dict[str, list[str]] = {"dataset": [], "eval_dataset": []}
    for split in splits:
        key = "eval_dataset" if split in EVAL_SPLITS else "dataset"
        names[key].append(split_dataset_name(dataset_name, split))
    return names


def verl_features() -> Any:
    """The ``datasets`` features of an exported verl parquet file."""
    import datasets as ds

    string = ds.Value("string")
    return ds.Features(
        {
            "data_source": string,
            "prompt": ds.List({"role": string, "content": string}),
            "images": ds.List(ds.Image()),
            "ability": string,
            "reward_model": {"style": string, "ground_truth": string},
            "extra_info": {
                "split": string,
                "index": ds.Value("int64"),
                "sample_id": string,
                "width": ds.Value("int64"),
                "height": ds.Value("int64"),
                "boxes": ds.List(ds.List(ds.Value("float64"))),
                "target": string,
                "task": string,
            },
        }
    )


def ground_truth(
    exported: ExportImage, codec: BoxCodec, codec_params: Mapping[str, Any], task: str
) -> str:
    """The ``reward_model.ground_truth`` JSON of one row (see the module doc)."""
    boxes = [codec.to_frame(box, exported.width, exported.height) for box in exported.boxes]
    return json.dumps(
        {
            "codec": codec.name,
            "codec_params": dict(codec_params),
            "width": exported.width,
            "height": exported.height,
            "task": task,
            "boxes": boxes,
        }
    )


def verl_row(
    sample: Any,
    index: int,
    codec: BoxCodec,
    codec_params: Mapping[str, Any],
    resize: bool | None = None,
) -> dict[str, Any]:
    """One verl row for a sample (see the module doc)."""
    exported = export_image(sample, codec, resize)
    if not exported.boxes:
        raise ValueError(f"sample {sample.sample_id} has no ground-truth box")
    return {
        "data_source": f"groundforge/{sample.domain}",
        "prompt": [{"role": "user", "content": user_prompt(sample.question, True)}],
        "images": [{"bytes": exported.png, "path": None}],
        "ability": ABILITIES.get(sample.task, sample.task),
        "reward_model": {
            "style": "rule",
            "ground_truth": ground_truth(exported, codec, codec_params, sample.task),
        },
        "extra_info": {
            "split": sample.split,
            "index": index,
            "sample_id": sample.sample_id,
            "width": exported.width,
            "height": exported.height,
            "boxes": [box.to_list() for box in exported.boxes],
            "target": sample.target,
            "task": sample.task,
        },
    }


def export_verl(
    shards_dir: str | Path,
    dest: str | Path,
    codec: str = "qwen25vl",
    codec_params: Mapping[str, Any] | None = None,
    splits: Sequence[str] | None = None,
    resize: bool | None = None,
    fmt: str | None = None,
) -> Path:
    """Write one verl parquet file per non-empty split (``splits``, default all) into ``dest``;
    returns ``dest``. ``index`` counts rows within a split. See the module doc."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from groundforge.outputs.shards import (
        detect_format,
        read_samples,
        shards_folder,
        splits_on_disk,
    )

    params = dict(codec_params or {})
    box_codec = get_codec(codec, **params)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    schema = verl_features().arrow_schema
    shards_dir = shards_folder(shards_dir)
    fmt = fmt or detect_format(shards_dir)
    if splits is None:
        splits = sorted(splits_on_disk(shards_dir, fmt))

    for split in splits:
        path = dest / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        writer = None
        rows: list[dict[str, Any]] = []
        index = 0
        try:
            for sample in read_samples(shards_dir, split, fmt=fmt):
                rows.append(verl_row(sample, index, box_codec, params, resize))
                index += 1
                if len(rows) == _VERL_BATCH:
                    writer = writer or pq.ParquetWriter(tmp, schema)
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows:
                writer = writer or pq.ParquetWriter(tmp, schema)
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            tmp.replace(path)
    return dest
