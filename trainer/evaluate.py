"""Evaluate a grounding model on KVG-Bench (or on our own shards) with the reference scorer.

The pipeline is: load :class:`BenchItem` rows (:func:`load_kvg_bench` for the benchmark's parquet,
:func:`load_shard_items` for our shards), ask a chat backend one
:class:`~groundforge.annotators.teacher.types.TeacherRequest` per item (the question as given,
plus :data:`REASONING_SUFFIX` when ``reasoning``), score every reply, and summarise
(:func:`evaluate` -> :class:`EvalReport`; :func:`run_eval` wires it for the CLI).

**Scorers.** ``scorer`` says how a grounding reply's box is read and scored:

- ``kvgbench`` (the default): the published KVG-Bench scorer
  (:mod:`groundforge.trainer.kvgbench_score`): its ordered cascade of eight patterns over the
  whole reply, in the Qwen2-VL 0..1000 frame, no match is ``(0, 0, 0, 0)``; the IoU as it
  computes it (no clipping, an inverted or empty box scores 0), the best over the answer boxes.
- ``codec``: the project's codec parser (:mod:`groundforge.schemas.codecs`) for the frame the
  model answers in (``codec``: ``norm1000``, ``qwen25vl`` (pixels of the processor's resized
  image), ``qwen3vl``, ``norm01``, ``pixel``): the reply's last box, put right and clipped, in
  pixels of the item's image, compared with the answer box converted to pixels. IoU is unchanged
  by scaling x and y (each by its own factor), so a box gets the same IoU in any frame.

Giving a ``codec`` without a ``scorer`` picks ``codec``; the ``kvgbench`` scorer reads the
0..1000 frame only. Without a ``codec``, :func:`choose_codec` takes an in-process model's
family's frame (the rule training uses), else ``norm1000``. An item is correct at IoU >= 0.5;
Acc@0.5 (in %) and mean IoU are averaged over *instances*, per category and over the seen,
unseen and all items (which categories are seen: :mod:`groundforge.trainer.categories`). A
failed request (a reply with an ``error``) and a reply holding no readable box score IoU 0;
both are counted.

**Detection rows** (items with ``task == "detect"``: many answer boxes, the reply a box list) are
scored with the DIP-R1 metrics instead: every box the codec reads from the reply (``norm1000``
with the ``kvgbench`` scorer: there is no reference scorer for lists), matched one-to-one with
the answer boxes by the Hungarian algorithm (:func:`groundforge.schemas.box.match_boxes`),
gives precision, recall and F1 at IoU 0.5 (micro-averaged over boxes), and pycocotools'
COCOeval gives AP@0.5 (:func:`detection_ap`). COCOeval ranks detections by score and a chat
model gives none, so each box gets a **rank-based pseudo-score** ``1 / (1 + rank)`` (its 0-based
position in the reply): a model's earlier boxes are taken as its more confident ones; boxes of
equal rank in different images tie and pycocotools breaks ties in item order (a stable sort).

Heavy libraries (torch, transformers, pyarrow, PIL, scipy, pycocotools, Beam) are imported inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundforge.schemas.box import Box, match_boxes
from groundforge.schemas.records import sha256_hex
from groundforge.trainer.categories import (
    SeenUnseen,
    explain,
    kvg_bench_split,
    load_categories,
    run_split,
)
from groundforge.trainer.kvgbench_score import (
    CORRECT_IOU,
    PATTERN_NAMES,
    SEEN_CATEGORIES,
    UNSEEN_CATEGORIES,
    best_iou,
    instance_groups,
    reference_match,
    score_group,
)

Quad = tuple[float, float, float, float]

# The reasoning models' prompt suffix (the R1-style template of the reference inference code).
REASONING_SUFFIX = (
    "  Output the thinking process in <think> </think> and final answer (bounding box) in "
    "<answer> </answer> tags."
)
SCORERS: tuple[str, ...] = ("kvgbench", "codec")
DETECTION_TASKS: frozenset[str] = frozenset({"detect"})
REFERENCE_FRAME = 1000.0

# -- items -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchItem:
    """One evaluation case. ``boxes`` are the answer boxes in the 0..1000 frame of the image
    (floats; one for grounding, all instances for ``task == "detect"``)."""

    question_id: str
    category: str
    question: str
    boxes: tuple[Quad, ...]
    image: bytes = field(repr=False)
    width: int
    height: int
    task: str = "kvg"
    entity: str = ""

    @property
    def answer(self) -> Quad | None:
        """The (first) answer box in 0..1000."""
        return self.boxes[0] if self.boxes else None

    @property
    def is_detection(self) -> bool:
        return self.task in DETECTION_TASKS

    def pixel_boxes(self) -> list[Box]:
        """The answer boxes in pixels of the image."""
        w, h, f = self.width, self.height, REFERENCE_FRAME
        return [
            Box.from_corners(x1 * w / f, y1 * h / f, x2 * w / f, y2 * h / f)
            for x1, y1, x2, y2 in self.boxes
        ]


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        return image.size


_NUM = r"\s*(\d+(?:\.\d*)?)\s*"
_ANSWER_BOX = re.compile(rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")


def parse_answer_boxes(answer: str) -> tuple[Quad, ...]:
    """Every ``(x1,y1),(x2,y2)`` box of a KVG-Bench ``answer`` cell, in 0..1000.

    >>> parse_answer_boxes("<|box_start|>(12,34),(560,780)<|box_end|>")
    ((12.0, 34.0, 560.0, 780.0),)
    """
    found = _ANSWER_BOX.findall(answer or "")
    return tuple(tuple(float(v) for v in m) for m in found)  # type: ignore[misc]


BENCH_COLUMNS = ("question_id", "category", "question", "answer", "image")
_ENTITY = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>")


def question_entity(question: str) -> str:
    """The entity a KVG-Bench question names (``""`` when it names none).

    >>> question_entity("Find <|object_ref_start|>Boeing 757<|object_ref_end|>")
    'Boeing 757'
    """
    found = _ENTITY.search(question or "")
    return found.group(1).strip() if found else ""


def _parquet_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a parquet file nor a folder of them")
    return [path]


def _image_bytes(cell: Any, base: Path, question_id: str) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            candidate = Path(cell["path"])
            candidate = candidate if candidate.is_absolute() else base / candidate
            if candidate.is_file():
                return candidate.read_bytes()
    raise ValueError(f"question {question_id}: the image cell holds no bytes and no readable path")


def load_kvg_bench(path: str | os.PathLike) -> list[BenchItem]:
    """The rows of a KVG-Bench parquet file (or of every ``*.parquet`` under a folder, sorted),
    in file order. The ``answer`` column's box is kept in 0..1000; the image size is read from
    the image header. Raises ``ValueError`` on a missing column or an answer without a box."""
    import pyarrow.parquet as pq

    items = []
    for file in _parquet_files(path):
        parquet = pq.ParquetFile(file)
        missing = [c for c in BENCH_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{file} is not a KVG-Bench parquet: missing columns {missing}")
        for batch in parquet.iter_batches(batch_size=64, columns=list(BENCH_COLUMNS)):
            for row in batch.to_pylist():
                qid = str(row["question_id"])
                boxes = parse_answer_boxes(row["answer"])
                if not boxes:
                    raise ValueError(f"{file}: question {qid} has no box in {row['answer']!r}")
                image = _image_bytes(row["image"], file.parent, qid)
                width, height = _image_size(image)
                items.append(
                    BenchItem(
                        question_id=qid,
                        category=str(row["category"]),
                        question=row["question"],
                        boxes=boxes,
                        image=image,
                        width=width,
                        height=height,
                        entity=question_entity(row["question"]),
                    )
                )
    return items


def load_shard_items(
    shards_dir: str | os.PathLike, split: str = "val", fmt: str = "arrow"
) -> list[BenchItem]:
    """Our shards' samples of one split as :class:`BenchItem`: ``category`` is the sample's
    domain, ``task`` is kept (``detect`` samples get detection metrics), the pixel ``gt_boxes``
    become 0..1000 floats of the image (no rounding)."""
    from groundforge.outputs.shards import read_samples

    return [shard_item(sample) for sample in read_samples(str(shards_dir), split, fmt)]


def shard_item(sample) -> BenchItem:
    """One of our samples (a :class:`KVGSample`) as the :class:`BenchItem` that scores it."""
    w, h, f = sample.width, sample.height, REFERENCE_FRAME
    return BenchItem(
        question_id=sample.sample_id,
        category=sample.domain,
        question=sample.question,
        boxes=tuple(
            (b.x1 * f / w, b.y1 * f / h, b.x2 * f / w, b.y2 * f / h) for b in sample.gt_boxes
        ),
        image=sample.image,
        width=sample.width,
        height=sample.height,
        task=sample.task,
        entity=sample.target or "",
    )


# -- detection metrics -----------------------------------------------------------------------


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def prf(tp: int, n_pred: int, n_gt: int) -> dict[str, float]:
    """Precision, recall and F1 from counts. A zero denominator gives 0, except that nothing
    predicted for nothing true gives 1 for all three."""
    both_empty = 1.0 if n_pred == 0 and n_gt == 0 else 0.0
    precision = _ratio(tp, n_pred, both_empty)
    recall = _ratio(tp, n_gt, both_empty)
    f1 = _ratio(2 * precision * recall, precision + recall, both_empty)
    return {"precision": precision, "recall": recall, "f1": f1}


def pseudo_scores(n: int) -> list[float]:
    """Rank-based scores for ``n`` boxes of one reply: ``1 / (1 + rank)``, earlier is higher."""
    return [1.0 / (1 + rank) for rank in range(n)]


def detection_ap(
    images: Sequence[tuple[Sequence[Box], Sequence[Box], int, int]],
    iou_threshold: float = CORRECT_IOU,
) -> float | None:
    """COCO AP at one IoU threshold (101-point interpolated, pycocotools' COCOeval, one class,
    area "all", no cap on detections per image) over ``(gt boxes, predicted boxes in reply
    order, width, height)`` per image. Predictions get :func:`pseudo_scores`. ``None`` when
    there is no answer box at all (AP is undefined); 0 when there are answer boxes but no
    predictions. Note COCOeval matches greedily by score, not by Hungarian assignment.
    """
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_images, annotations, detections = [], [], []
    for image_id, (gts, preds, width, height) in enumerate(images, start=1):
        coco_images.append({"id": image_id, "width": width, "height": height})
        for box in gts:
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [box.x1, box.y1, box.width, box.height],
                    "area": box.area,
                    "iscrowd": 0,
                }
            )
        for box, score in zip(preds, pseudo_scores(len(preds)), strict=True):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [box.x1, box.y1, box.width, box.height],
                    "score": score,
                }
            )
    if not annotations:
        return None
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {
            "images": coco_images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}],
        }
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.iouThrs = np.array([iou_threshold])
        evaluator.params.areaRng = [[0.0, 1e12]]
        evaluator.params.areaRngLbl = ["all"]
        most = max(sum(1 for d in detections if d["image_id"] == i["id"]) for i in coco_images)
        evaluator.params.maxDets = [max(100, most)]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, 0, 0, -1]  # (T, R, K, A, M)
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


# -- evaluation ------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One item's reply and score.

    ``boxes`` and ``gt_boxes`` are in ``frame``: ``norm1000`` when the kvgbench scorer read
    the reply, else ``pixel``. Grounding items have ``iou`` and ``correct``; detection items
    have ``tp``, ``fp``, ``fn`` (``iou``/``correct`` are ``None``). ``error`` is the failure
    kind of a failed request; ``pattern`` names the kvgbench cascade's pattern that read the box
    (:data:`~groundforge.trainer.kvgbench_score.PATTERN_NAMES`).
    """

    question_id: str
    category: str
    task: str
    answer: str | None
    boxes: list[list[float]]
    gt_boxes: list[list[float]]
    frame: str
    iou: float | None = None
    correct: bool | None = None
    error: str | None = None
    pattern: str | None = None
    tp: int | None = None
    fp: int | None = None
    fn: int | None = None

    @property
    def is_detection(self) -> bool:
        return self.task in DETECTION_TASKS


@dataclass
class EvalReport:
    """Per-item :class:`Prediction` rows, the summary ``metrics`` and the run's ``config``."""

    predictions: list[Prediction]
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[int, int], None]


def build_prompt(question: str, reasoning: bool = False, suffix: str | None = None) -> str:
    """The question as given, plus the reasoning suffix when ``reasoning``."""
    if not reasoning:
        return question
    return question + (REASONING_SUFFIX if suffix is None else suffix)


def build_requests(
    items: Sequence[BenchItem], reasoning: bool = False, suffix: str | None = None
) -> list:
    """One :class:`TeacherRequest` per item: its image, then its prompt."""
    from groundforge.annotators.teacher.types import TeacherRequest
    from groundforge.schemas.records import stable_id

    template_hash = stable_id("eval", build_prompt("", reasoning, suffix))
    return [
        TeacherRequest(
            item_id=item.question_id,
            prompt=build_prompt(item.question, reasoning, suffix),
            images=(item.image,),
            image_ids=(sha256_hex(item.image),),
            template_hash=template_hash,
        )
        for item in items
    ]


def resolve_scorer(scorer: str | None = None, codec: str | None = None) -> tuple[str, str]:
    """The ``(scorer, codec)`` of a run: no ``scorer`` means ``codec`` when a codec is given,
    else ``kvgbench``; the ``kvgbench`` scorer reads ``norm1000`` only; ``codec`` defaults to
    ``norm1000``. Raises ``ValueError`` on an unknown scorer or a frame it cannot read."""
    if scorer is None:
        scorer = "kvgbench" if codec is None else "codec"
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: choose from {', '.join(SCORERS)}")
    if scorer == "kvgbench" and codec not in (None, "norm1000"):
        raise ValueError(
            f"the kvgbench scorer reads the 0..1000 frame only, not codec {codec!r}: "
            "use scorer 'codec' for other frames"
        )
    return scorer, codec or "norm1000"


# The frame assumed when no in-process model names one (an endpoint, an unknown model type): the
# published scorer's.
DEFAULT_CODEC = "norm1000"


@dataclass(frozen=True)
class CodecChoice:
    """The scorer, codec and codec parameters of a run, and where the codec came from."""

    scorer: str
    codec: str
    params: dict[str, Any]
    source: str

    def describe(self) -> str:
        """One line for the user, e.g. ``codec qwen25vl (max_pixels 12544, min_pixels 3136;
        from model type qwen2_5_vl), scorer codec``."""
        return f"{codec_line(self.codec, self.params, self.source)}, scorer {self.scorer}"


def codec_line(codec: str, params: dict[str, Any], source: str) -> str:
    """``codec NAME (PARAMS; SOURCE)``: which frame was chosen and why.

    >>> codec_line("qwen25vl", {"max_pixels": 401408}, "given")
    'codec qwen25vl (max_pixels 401408; given)'
    """
    details = [", ".join(f"{k} {v}" for k, v in sorted(params.items(), reverse=True)), source]
    return f"codec {codec} ({'; '.join(d for d in details if d)})"


def processor_budget(model: str) -> dict[str, int]:
    """``min_pixels``/``max_pixels`` of a Qwen-VL model's image processor (``{}`` for a
    processor without a pixel budget)."""
    from groundforge.annotators.vlm_processor import load_processor

    size = getattr(getattr(load_processor(model), "image_processor", None), "size", None)
    budget = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        try:
            value = size[edge]
        except (KeyError, TypeError):
            value = None
        if value:
            budget[key] = int(value)
    return budget


def model_type_for_codec(model: str | os.PathLike) -> str | None:
    """The model type a default box frame is chosen by (``ValueError`` when the model's
    config cannot be read)."""
    from groundforge.annotators.vlm_processor import model_type_of

    try:
        return model_type_of(str(model))
    except OSError as exc:
        raise ValueError(
            f"{model}: no model config to choose the box frame from ({exc}); choose a codec"
        ) from None


def choose_codec(
    model: str | os.PathLike | None = None,
    scorer: str | None = None,
    codec: str | None = None,
    codec_params: dict[str, Any] | None = None,
) -> CodecChoice:
    """Decide the frame a run reads the model's boxes in.

    A given ``codec`` wins. Otherwise an in-process ``model`` answers in its family's frame, by
    the rule training uses (:func:`groundforge.trainer.data.codec_name_for` of the model type
    in its config); an endpoint, a model type with no known frame and the ``kvgbench`` scorer get
    :data:`DEFAULT_CODEC`. A derived frame other than ``norm1000`` makes the ``codec`` scorer the
    default (the ``kvgbench`` scorer reads 0..1000 only). ``qwen25vl`` takes its pixel budget
    from ``codec_params``, else from the in-process model's processor (the frame the model
    sees; the minimum is clamped to the budget as the processor does), else the codec's
    defaults. ``max_pixels`` is a ``qwen25vl`` parameter only and is dropped for other codecs.
    """
    from groundforge.trainer.data import CODEC_BY_MODEL_TYPE

    params = dict(codec_params or {})
    if codec is not None:
        source = "given"
    elif model is None:
        source = "the default for an endpoint; give --codec for the served model's frame"
    elif scorer == "kvgbench":
        source = "the kvgbench scorer's frame"
    else:
        model_type = model_type_for_codec(model)
        codec = CODEC_BY_MODEL_TYPE.get(model_type)
        if codec is None:
            source = f"the default: model type {model_type!r} has no known box frame"
        else:
            source = f"from model type {model_type}"
            scorer = scorer or ("kvgbench" if codec == "norm1000" else "codec")
    scorer, codec = resolve_scorer(scorer, codec)
    if codec != "qwen25vl":
        params.pop("max_pixels", None)
    elif model is not None and not {"max_pixels", "min_pixels"} <= params.keys():
        own = processor_budget(str(model))
        params.setdefault("max_pixels", own.get("max_pixels"))
        low = own.get("min_pixels")
        if low is not None and params["max_pixels"] is not None:
            params.setdefault("min_pixels", min(low, params["max_pixels"]))
        params = {k: v for k, v in params.items() if v is not None}
    return CodecChoice(scorer, codec, params, source)


def score_reply(
    item: BenchItem,
    text: str | None,
    error: str | None = None,
    codec: str = "norm1000",
    codec_params: dict[str, Any] | None = None,
    iou_threshold: float = CORRECT_IOU,
    scorer: str = "kvgbench",
) -> Prediction:
    """Score one reply (``text``, or ``error`` for a failed request) against its item with
    ``scorer`` (see the module docstring); detection items always go through ``codec``."""
    from groundforge.schemas.codecs import get_codec

    base = {
        "question_id": item.question_id,
        "category": item.category,
        "task": item.task,
        "answer": text,
        "error": error,
    }
    reply = text if error is None else None
    if item.is_detection:
        gts = item.pixel_boxes()
        preds = [] if reply is None else _parse_all(reply, item, codec, codec_params or {})
        tp = len(match_boxes(preds, gts, iou_threshold))
        return Prediction(
            **base,
            boxes=[b.to_list() for b in preds],
            gt_boxes=[b.to_list() for b in gts],
            frame="pixel",
            tp=tp,
            fp=len(preds) - tp,
            fn=len(gts) - tp,
        )
    if scorer == "kvgbench":
        found = reference_match(reply)
        iou = best_iou(found.box, item.boxes)
        return Prediction(
            **base,
            boxes=[] if found.pattern is None else [list(found.box)],
            gt_boxes=[list(g) for g in item.boxes],
            frame="norm1000",
            iou=iou,
            correct=iou >= iou_threshold,
            pattern=found.pattern,
        )
    gts = item.pixel_boxes()
    parser = get_codec(codec, **(codec_params or {}))
    box = None if reply is None else parser.parse_last(reply, item.width, item.height)
    iou = 0.0 if box is None else max((box.iou(g) for g in gts), default=0.0)
    return Prediction(
        **base,
        boxes=[] if box is None else [box.to_list()],
        gt_boxes=[g.to_list() for g in gts],
        frame="pixel",
        iou=iou,
        correct=iou >= iou_threshold,
    )


def _parse_all(text: str, item: BenchItem, codec: str, params: dict[str, Any]) -> list[Box]:
    from groundforge.schemas.codecs import get_codec

    return get_codec(codec, **params).parse(text, item.width, item.height)


def _grounding_row(preds: Sequence[Prediction], iou_threshold: float) -> dict[str, Any]:
    return {
        **score_group([p.iou or 0.0 for p in preds], iou_threshold),
        "failed": sum(p.error is not None for p in preds),
        "no_box": sum(p.error is None and not p.boxes for p in preds),
    }


def _detection_row(
    preds: Sequence[Prediction], items: dict[str, BenchItem], iou_threshold: float
) -> dict[str, Any]:
    tp = sum(p.tp or 0 for p in preds)
    n_pred = sum(len(p.boxes) for p in preds)
    n_gt = sum(len(p.gt_boxes) for p in preds)
    images = [
        (
            [Box.from_list(b) for b in p.gt_boxes],
            [Box.from_list(b) for b in p.boxes],
            items[p.question_id].width,
            items[p.question_id].height,
        )
        for p in preds
    ]
    return {
        "n": len(preds),
        "n_gt": n_gt,
        "n_pred": n_pred,
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        **prf(tp, n_pred, n_gt),
        "ap50": detection_ap(images, iou_threshold),
        "failed": sum(p.error is not None for p in preds),
    }


def summarize(
    predictions: Sequence[Prediction],
    items: Sequence[BenchItem],
    seen: Sequence[str] = SEEN_CATEGORIES,
    unseen: Sequence[str] = UNSEEN_CATEGORIES,
    iou_threshold: float = CORRECT_IOU,
) -> dict[str, Any]:
    """The summary of scored predictions.

    ``grounding``: per category and for ``seen``, ``unseen`` and ``all`` grounding items
    (instance-weighted): ``n``, ``correct``, ``acc`` (Acc@IoU>=threshold, %), ``miou`` (0..1),
    ``failed``, ``no_box``; categories in neither list count in ``all`` and their own row only.
    ``detection``: per category and ``all``: box counts, ``precision``, ``recall``, ``f1``,
    ``ap50``. ``failures``: failed requests by kind. ``grounding.patterns`` counts the replies
    the kvgbench scorer read by each pattern of its cascade (``none``: no match).
    """
    by_id = {item.question_id: item for item in items}
    grounding = [p for p in predictions if not p.is_detection]
    detection = [p for p in predictions if p.is_detection]
    failures: dict[str, int] = {}
    for p in predictions:
        if p.error is not None:
            failures[p.error] = failures.get(p.error, 0) + 1
    metrics: dict[str, Any] = {
        "n_items": len(predictions),
        "n_failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "iou_threshold": iou_threshold,
        "seen_categories": list(seen),
        "unseen_categories": list(unseen),
    }
    if grounding:
        per_category, splits = instance_groups([p.category for p in grounding], seen, unseen)

        def row(positions: list[int]) -> dict[str, Any]:
            return _grounding_row([grounding[i] for i in positions], iou_threshold)

        metrics["grounding"] = {
            "categories": {c: row(pos) for c, pos in per_category.items()},
            **{name: row(pos) for name, pos in splits.items()},
        }
        matched = [
            p.pattern or "none" for p in grounding if p.frame == "norm1000" and p.error is None
        ]
        if matched:
            metrics["grounding"]["patterns"] = {
                name: matched.count(name) for name in ("none", *PATTERN_NAMES) if name in matched
            }
    if detection:
        per_category, _ = instance_groups([p.category for p in detection], seen, unseen)
        metrics["detection"] = {
            "categories": {
                c: _detection_row([detection[i] for i in pos], by_id, iou_threshold)
                for c, pos in per_category.items()
            },
            "all": _detection_row(detection, by_id, iou_threshold),
        }
    return metrics


def evaluate(
    items: Sequence[BenchItem],
    backend: Any,
    codec: str | None = None,
    codec_params: dict[str, Any] | None = None,
    reasoning: bool = False,
    suffix: str | None = None,
    seen: Sequence[str] = SEEN_CATEGORIES,
    unseen: Sequence[str] = UNSEEN_CATEGORIES,
    batch_size: int = 8,
    iou_threshold: float = CORRECT_IOU,
    progress: Progress | None = None,
    scorer: str | None = None,
) -> EvalReport:
    """Ask ``backend`` (anything with ``answer(requests) -> replies``, one reply per request in
    order) about every item, ``batch_size`` requests at a time, and score the replies.

    ``scorer`` and ``codec`` (the frame of the model's answers) are resolved by
    :func:`resolve_scorer` (see the module docstring); ``progress`` is called with
    ``(done, total)`` after each batch.
    """
    from groundforge.schemas.codecs import get_codec

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scorer, codec = resolve_scorer(scorer, codec)
    get_codec(codec, **(codec_params or {}))  # an unknown codec or bad parameter fails here
    items = list(items)
    requests = build_requests(items, reasoning, suffix)
    predictions: list[Prediction] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        replies = list(backend.answer(requests[start : start + batch_size]))
        if len(replies) != len(chunk):
            raise RuntimeError(f"the backend gave {len(replies)} replies to {len(chunk)} requests")
        for item, reply in zip(chunk, replies, strict=True):
            ok = reply.error is None and reply.text is not None
            error = None if ok else (reply.error or "empty")
            predictions.append(
                score_reply(item, reply.text, error, codec, codec_params, iou_threshold, scorer)
            )
        if progress is not None:
            progress(len(predictions), len(items))
    metrics = summarize(predictions, items, seen, unseen, iou_threshold)
    config = {
        "scorer": scorer,
        "codec": codec,
        "codec_params": dict(codec_params or {}),
        "reasoning": reasoning,
        "suffix": build_prompt("", reasoning, suffix),
    }
    return EvalReport(predictions=predictions, metrics=metrics, config=config)


# -- output ----------------------------------------------------------------------------------


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``metrics.json`` (metrics plus config) and ``predictions.jsonl`` (one row per
    item) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, predictions_path = out / "metrics.json", out / "predictions.jsonl"
    body = {"config": report.config, **report.metrics}
    metrics_path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    with predictions_path.open("w") as f:
        for p in report.predictions:
            f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
    return metrics_path, predictions_path


def read_report(out_dir: str | os.PathLike) -> EvalReport:
    """The report that :func:`write_report` wrote into ``out_dir``."""
    out = Path(out_dir)
    body = json.loads((out / "metrics.json").read_text())
    config = body.pop("config", {})
    with (out / "predictions.jsonl").open() as f:
        predictions = [Prediction(**json.loads(line)) for line in f if line.strip()]
    return EvalReport(predictions=predictions, metrics=body, config=config)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def report_tables(report: EvalReport) -> list:
    """The report as rich tables: grounding (per category, then seen / unseen / all) and, when
    there are detection items, detection (per category, then all)."""
    from rich.table import Table

    tables = []
    grounding = report.metrics.get("grounding")
    if grounding:
        scorer = report.config.get("scorer")
        title = "grounding (Acc@0.5, mean IoU" + (f"; scorer {scorer})" if scorer else ")")
        table = Table(title=title, title_justify="left")
        for col in ("category", "n", "Acc@0.5 %", "mIoU", "failed", "no box"):
            table.add_column(col, justify="left" if col == "category" else "right")

        def row(name: str, r: dict[str, Any]) -> list[str]:
            return [
                name,
                str(r["n"]),
                _fmt(r["acc"]),
                _fmt(r["miou"], 4),
                str(r["failed"]),
                str(r["no_box"]),
            ]

        for name, r in grounding["categories"].items():
            table.add_row(*row(name, r))
        table.add_section()
        for name in ("seen", "unseen", "all"):
            table.add_row(*row(name, grounding[name]))
        tables.append(table)
    detection = report.metrics.get("detection")
    if detection:
        table = Table(title="detection (IoU 0.5)", title_justify="left")
        for col in ("category", "images", "gt", "pred", "P", "R", "F1", "AP@0.5", "failed"):
            table.add_column(col, justify="left" if col == "category" else "right")

        def drow(name: str, r: dict[str, Any]) -> list[str]:
            return [
                name,
                str(r["n"]),
                str(r["n_gt"]),
                str(r["n_pred"]),
                *(_fmt(r[k], 4) for k in ("precision", "recall", "f1", "ap50")),
                str(r["failed"]),
            ]

        for name, r in detection["categories"].items():
            table.add_row(*drow(name, r))
        table.add_section()
        table.add_row(*drow("all", detection["all"]))
        tables.append(table)
    return tables


def format_table(report: EvalReport, width: int = 100) -> str:
    """The report's tables as plain text."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    for table in report_tables(report):
        console.print(table)
    groups = report.metrics.get("seen_unseen") or {}
    if groups and report.metrics.get("grounding"):
        for line in (f"seen / unseen: {groups['source']}", *groups.get("notes", [])):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    failures = report.metrics.get("failures") or {}
    if failures:
        console.print("failed requests: " + ", ".join(f"{k} {n}" for k, n in failures.items()))
    return console.file.getvalue()


# -- the CLI's entry point -------------------------------------------------------------------


def resolve_categories(
    items: Sequence[BenchItem],
    categories: SeenUnseen | None = None,
    shards: str | os.PathLike | None = None,
    split: str = "val",
) -> SeenUnseen:
    """The seen / unseen split of a run: ``categories`` when given, else the run's own for
    ``shards`` (:func:`~groundforge.trainer.categories.run_split`), else KVG-Bench's."""
    if categories is not None:
        return categories
    if shards is not None:
        return run_split(shards, split, [item.category for item in items])
    return kvg_bench_split()


def make_backend(
    model: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    api_key_env: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    seed: int | None = 0,
    batch_size: int = 8,
    device: str = "cpu",
    max_pixels: int | None = None,
    max_concurrency: int = 16,
    timeout: float = 120.0,
):
    """The chat backend of a run: ``model`` (a folder or hub id) runs in this process
    (:class:`TransformersBackend`), ``endpoint`` is an OpenAI-compatible URL answered by
    ``served_model`` (:class:`OpenAIBackend`). Exactly one of the two."""
    from groundforge.annotators.teacher.types import Sampling

    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of model (in-process) and endpoint (a served model)")
    sampling = Sampling(temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    if model is not None:
        if served_model is not None or api_key_env is not None:
            raise ValueError("served_model and api_key_env apply to an endpoint, not to model")
        from groundforge.annotators.teacher.embedded import TransformersBackend

        return TransformersBackend(
            str(model), sampling, batch_size=batch_size, device=device, max_pixels=max_pixels
        )
    if not served_model:
        raise ValueError("an endpoint needs served_model: the model name the server answers to")
    from groundforge.annotators.teacher.client import OpenAIBackend
    from groundforge.annotators.teacher.types import EndpointSettings

    settings = EndpointSettings(
        base_url=endpoint,
        model=served_model,
        api_key_env=api_key_env,
        sampling=sampling,
        max_concurrency=max_concurrency,
        timeout=timeout,
    )
    return OpenAIBackend(settings)


def run_eval(
    bench: str | os.PathLike | None = None,
    shards: str | os.PathLike | None = None,
    split: str = "val",
    model: str | os.PathLike | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    api_key_env: str | None = None,
    codec: str | None = None,
    codec_params: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    reasoning: bool = False,
    max_tokens: int = 256,
    limit: int | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    shard_format: str = "arrow",
    temperature: float = 0.0,
    device: str = "cpu",
    suffix: str | None = None,
    categories: str | os.PathLike | SeenUnseen | None = None,
    progress: Progress | None = None,
    scorer: str | None = None,
    on_codec: Callable[[CodecChoice], None] | None = None,
) -> EvalReport:
    """Evaluate ``model`` (in-process) or ``endpoint`` (+ ``served_model``) on the KVG-Bench
    parquet ``bench`` or on the ``split`` of our ``shards``; write the report to ``out_dir``
    when given. Greedy decoding unless ``temperature`` > 0. ``limit`` keeps the first items.
    ``scorer``, ``codec`` and its parameters are chosen by :func:`choose_codec` (without a
    ``codec``, an in-process model's family decides; ``config["codec_source"]`` says which) and
    handed to ``on_codec`` before the model loads.
    ``max_pixels`` (or ``codec_params["max_pixels"]``) is the pixel budget of the ``qwen25vl``
    frame and of an in-process Qwen-VL model's processor, so the frame the model sees is the
    one parsed.
    ``categories`` (a categories file or a :class:`SeenUnseen`) says which categories are seen
    and which unseen, and maps a run's domains or entities to categories; without it, ``bench``
    takes KVG-Bench's published split and ``shards`` the run's own (:func:`resolve_categories`);
    ``metrics["seen_unseen"]`` says where the split came from and why a row is empty."""
    from groundforge.schemas.codecs import get_codec

    if (bench is None) == (shards is None):
        raise ValueError("give exactly one of bench (a KVG-Bench parquet) and shards (our shards)")
    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of model (in-process) and endpoint (a served model)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    params = dict(codec_params or {})
    if max_pixels:
        params["max_pixels"] = max_pixels
    if codec is not None:  # fail before loading anything
        resolve_scorer(scorer, codec)
        get_codec(
            codec, **{k: v for k, v in params.items() if codec == "qwen25vl" or k != "max_pixels"}
        )

    if categories is not None and not isinstance(categories, SeenUnseen):
        categories = load_categories(categories)  # a bad file fails before anything loads

    if bench is not None:
        items = load_kvg_bench(bench)
    else:
        items = load_shard_items(shards, split, shard_format)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"no items to evaluate in {bench if bench is not None else shards}")
    groups = resolve_categories(items, categories, shards, split)
    items = [
        dataclasses.replace(item, category=groups.category_of(item.category, item.entity))
        for item in items
    ]

    budget = params.get("max_pixels")
    if budget and model is None and codec != "qwen25vl":
        raise ValueError("max_pixels applies to the qwen25vl frame or an in-process model only")
    backend = make_backend(
        model=None if model is None else str(model),
        endpoint=endpoint,
        served_model=served_model,
        api_key_env=api_key_env,
        temperature=temperature,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
        max_pixels=None if model is None else budget,
    )
    try:
        choice = choose_codec(model, scorer, codec, params)
        if on_codec is not None:
            on_codec(choice)
        report = evaluate(
            items,
            backend,
            codec=choice.codec,
            codec_params=choice.params,
            reasoning=reasoning,
            suffix=suffix,
            seen=groups.seen,
            unseen=groups.unseen,
            batch_size=batch_size,
            progress=progress,
            scorer=choice.scorer,
        )
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    report.config.update(
        {
            "bench": None if bench is None else str(bench),
            "shards": None if shards is None else str(shards),
            "split": split if shards is not None else None,
            "model": None if model is None else str(model),
            "endpoint": endpoint,
            "served_model": served_model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "limit": limit,
            "codec_source": choice.source,
        }
    )
    graded = [item.category for item in items if not item.is_detection]
    report.metrics["seen_unseen"] = {
        "source": groups.source,
        "map": dict(groups.mapping),
        "notes": explain(groups, graded) if graded else [],
    }
    if out_dir is not None:
        write_report(report, out_dir)
    return report
