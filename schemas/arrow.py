"""Arrow schemas of the records and the one place records become rows and back.

Each table schema carries Hugging Face ``features`` metadata, so ``datasets`` decodes the
``image`` column as a PIL image; the metadata is derived from the schema, never written by hand.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pyarrow as pa

from groundforge.schemas.box import Box
from groundforge.schemas.records import (
    Detection,
    Entity,
    ImageRecord,
    Instance,
    KVGSample,
    MarkedBox,
    Provenance,
    Rejection,
    RejectionPreview,
    UncertainRegion,
)

_BOX = pa.list_(pa.float64())
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_STRINGS = pa.list_(pa.string())

PROVENANCE_TYPE = pa.struct(
    [
        ("source_image_ids", _STRINGS),
        ("locations", _STRINGS),
        ("sources", _STRINGS),
        ("licenses", _STRINGS),
        ("authors", _STRINGS),
        ("urls", _STRINGS),
        ("layout", pa.string()),
        ("recipe_hash", pa.string()),
        ("version", pa.string()),
    ]
)

_CANDIDATES = pa.list_(
    pa.struct(
        [
            ("annotator", pa.string()),
            ("box", _BOX),
            ("score", pa.float64()),
            ("label", pa.string()),
        ]
    )
)

_INSTANCES = pa.list_(
    pa.struct(
        [
            ("box", _BOX),
            ("label", pa.string()),
            ("full", _BOX),
            ("visible", _BOX),
            ("ignore", pa.bool_()),
        ]
    )
)

_NAMED_BOXES = pa.list_(pa.struct([("name", pa.string()), ("box", _BOX)]))

_REASON_COUNTS = pa.list_(pa.struct([("reason", pa.string()), ("count", pa.int64())]))

_SAMPLE_FIELDS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", _IMAGE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("domain", pa.string()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("target", pa.string()),
        ("entities", _NAMED_BOXES),
        ("gt_boxes", pa.list_(_BOX)),
        ("rationale", pa.string()),
        ("rationale_boxes", _NAMED_BOXES),
        ("split", pa.string()),
        ("box_source", pa.string()),
        ("teacher_model", pa.string()),
        ("teacher_iou", pa.float64()),
        ("detector_iou", pa.float64()),
        ("student_k", pa.int32()),
        ("student_correct", pa.int32()),
        ("distractors", pa.string()),
        ("distractor_similarity", pa.float64()),
        ("candidates", _CANDIDATES),
        ("teacher_box", _BOX),
        ("uncertain_regions", pa.list_(pa.struct([("box", _BOX), ("reason", pa.string())]))),
        ("ignore_regions", pa.list_(_BOX)),
        ("provenance", PROVENANCE_TYPE),
        ("dropped_instances", _REASON_COUNTS),
    ]
)

_IMAGE_RECORD_FIELDS = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", _IMAGE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("domain", pa.string()),
        ("entity", pa.string()),
        ("boxes", pa.list_(_BOX)),
        ("source", pa.string()),
        ("location", pa.string()),
        ("license", pa.string()),
        ("author", pa.string()),
        ("url", pa.string()),
        ("opaque_box", _BOX),
        ("candidates", _CANDIDATES),
        ("box", _BOX),
        ("box_source", pa.string()),
        ("box_ious", pa.list_(pa.struct([("name", pa.string()), ("iou", pa.float64())]))),
        ("embedding", pa.list_(pa.float32())),
        ("instances", _INSTANCES),
        ("dropped_instances", _REASON_COUNTS),
        ("declared_size", pa.list_(pa.int32())),
    ]
)

REJECTION_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source_id", pa.string()),
        ("sha256", pa.string()),
        ("entity", pa.string()),
    ]
)


PREVIEW_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        (
            "boxes",
            pa.list_(pa.struct([("kind", pa.string()), ("box", _BOX), ("label", pa.string())])),
        ),
    ]
)


@cache
def _with_hf_features(schema: pa.Schema, image_columns: tuple[str, ...]) -> pa.Schema:
    # datasets is imported here, not at module level: it is slow to import and only writers
    # need the metadata.
    from datasets import Features, Image

    features = Features.from_arrow_schema(schema)
    for name in image_columns:
        features[name] = Image()
    hf_schema = features.arrow_schema
    if hf_schema.names != schema.names:
        raise AssertionError("Hugging Face features changed the column order")
    return hf_schema


def sample_schema() -> pa.Schema:
    """The shard schema, with Hugging Face features metadata (``image`` decodes to PIL)."""
    return _with_hf_features(_SAMPLE_FIELDS, ("image",))


def image_record_schema() -> pa.Schema:
    return _with_hf_features(_IMAGE_RECORD_FIELDS, ("image",))


def hf_features_dict(schema: pa.Schema) -> dict[str, Any]:
    """The ``features`` dict stored in a schema's Hugging Face metadata."""
    return json.loads(schema.metadata[b"huggingface"])["info"]["features"]


def _box(values: Any) -> Box:
    return Box.from_list(list(values))


def _opt_box(values: Any) -> Box | None:
    return None if values is None else _box(values)


def _opt_list(box: Box | None) -> list[float] | None:
    return None if box is None else box.to_list()


def _candidates_to_rows(candidates: dict[str, tuple[Detection, ...]]) -> list[dict[str, Any]]:
    return [
        {"annotator": name, "box": d.box.to_list(), "score": d.score, "label": d.label}
        for name, dets in sorted(candidates.items())
        for d in dets
    ]


def _rows_to_candidates(rows: list[dict[str, Any]]) -> dict[str, tuple[Detection, ...]]:
    candidates: dict[str, list[Detection]] = {}
    for c in rows:
        candidates.setdefault(c["annotator"], []).append(
            Detection(_box(c["box"]), c["score"], c["label"])
        )
    return {k: tuple(v) for k, v in candidates.items()}


def _instances_to_rows(instances: tuple[Instance, ...]) -> list[dict[str, Any]]:
    return [
        {
            "box": i.box.to_list(),
            "label": i.label,
            "full": _opt_list(i.full),
            "visible": _opt_list(i.visible),
            "ignore": i.ignore,
        }
        for i in instances
    ]


def _rows_to_instances(rows: list[dict[str, Any]]) -> tuple[Instance, ...]:
    return tuple(
        Instance(
            _box(i["box"]), i["label"], _opt_box(i["full"]), _opt_box(i["visible"]), i["ignore"]
        )
        for i in rows
    )


def sample_to_row(s: KVGSample) -> dict[str, Any]:
    p = s.provenance
    return {
        "sample_id": s.sample_id,
        "image": {"bytes": s.image, "path": None},
        "width": s.width,
        "height": s.height,
        "domain": s.domain,
        "task": s.task,
        "question": s.question,
        "target": s.target,
        "entities": [{"name": e.name, "box": e.box.to_list()} for e in s.entities],
        "gt_boxes": [b.to_list() for b in s.gt_boxes],
        "rationale": s.rationale,
        "rationale_boxes": [{"name": e.name, "box": e.box.to_list()} for e in s.rationale_boxes],
        "split": s.split,
        "box_source": s.box_source,
        "teacher_model": s.teacher_model,
        "teacher_iou": s.teacher_iou,
        "detector_iou": s.detector_iou,
        "student_k": s.student_k,
        "student_correct": s.student_correct,
        "distractors": s.distractors,
        "distractor_similarity": s.distractor_similarity,
        "candidates": _candidates_to_rows(s.candidates),
        "teacher_box": _opt_list(s.teacher_box),
        "uncertain_regions": [
            {"box": r.box.to_list(), "reason": r.reason} for r in s.uncertain_regions
        ],
        "ignore_regions": [b.to_list() for b in s.ignore_regions],
        "provenance": {
            "source_image_ids": list(p.source_image_ids),
            "locations": list(p.locations),
            "sources": list(p.sources),
            "licenses": list(p.licenses),
            "authors": list(p.authors),
            "urls": list(p.urls),
            "layout": p.layout,
            "recipe_hash": p.recipe_hash,
            "version": p.version,
        },
        "dropped_instances": _counts_to_rows(s.dropped_instances),
    }


def row_to_sample(row: dict[str, Any]) -> KVGSample:
    """Inverse of :func:`sample_to_row` for a row read back with ``to_pylist``."""
    p = row["provenance"]
    return KVGSample(
        sample_id=row["sample_id"],
        image=row["image"]["bytes"],
        width=row["width"],
        height=row["height"],
        domain=row["domain"],
        task=row["task"],
        question=row["question"],
        target=row["target"],
        entities=tuple(Entity(e["name"], _box(e["box"])) for e in row["entities"]),
        gt_boxes=tuple(_box(b) for b in row["gt_boxes"]),
        split=row["split"],
        provenance=Provenance(
            source_image_ids=tuple(p["source_image_ids"]),
            locations=tuple(p["locations"]),
            sources=tuple(p["sources"]),
            licenses=tuple(p["licenses"]),
            authors=tuple(p["authors"]),
            urls=tuple(p["urls"]),
            layout=p["layout"],
            recipe_hash=p["recipe_hash"],
            version=p["version"],
        ),
        rationale=row["rationale"],
        # Shards written before rationales kept their boxes apart have no such column.
        rationale_boxes=tuple(
            Entity(e["name"], _box(e["box"])) for e in row.get("rationale_boxes") or ()
        ),
        box_source=row["box_source"],
        teacher_model=row["teacher_model"],
        teacher_iou=row["teacher_iou"],
        detector_iou=row["detector_iou"],
        student_k=row["student_k"],
        student_correct=row["student_correct"],
        distractors=row["distractors"],
        distractor_similarity=row["distractor_similarity"],
        candidates=_rows_to_candidates(row["candidates"]),
        teacher_box=_opt_box(row["teacher_box"]),
        uncertain_regions=tuple(
            UncertainRegion(_box(r["box"]), r["reason"]) for r in row["uncertain_regions"]
        ),
        ignore_regions=tuple(_box(b) for b in row["ignore_regions"]),
        # Shards written before samples counted their dropped instances have no such column.
        dropped_instances=_rows_to_counts(row.get("dropped_instances") or ()),
    )


def _counts_to_rows(counts: dict[str, int]) -> list[dict[str, Any]]:
    return [{"reason": k, "count": v} for k, v in sorted(counts.items())]


def _rows_to_counts(rows) -> dict[str, int]:
    return {x["reason"]: x["count"] for x in rows}


def image_record_to_row(r: ImageRecord) -> dict[str, Any]:
    return {
        "image_id": r.image_id,
        "image": {"bytes": r.image, "path": None},
        "width": r.width,
        "height": r.height,
        "domain": r.domain,
        "entity": r.entity,
        "boxes": [b.to_list() for b in r.boxes],
        "source": r.source,
        "location": r.location,
        "license": r.license,
        "author": r.author,
        "url": r.url,
        "opaque_box": _opt_list(r.opaque_box),
        "candidates": _candidates_to_rows(r.candidates),
        "box": _opt_list(r.box),
        "box_source": r.box_source,
        "box_ious": [{"name": k, "iou": v} for k, v in sorted(r.box_ious.items())],
        "embedding": list(r.embedding) if r.embedding is not None else None,
        "instances": _instances_to_rows(r.instances),
        "dropped_instances": _counts_to_rows(r.dropped_instances),
        "declared_size": list(r.declared_size) if r.declared_size is not None else None,
    }


def row_to_image_record(row: dict[str, Any]) -> ImageRecord:
    return ImageRecord(
        image_id=row["image_id"],
        image=row["image"]["bytes"],
        width=row["width"],
        height=row["height"],
        domain=row["domain"],
        entity=row["entity"],
        boxes=tuple(_box(b) for b in row["boxes"]),
        source=row["source"],
        location=row["location"],
        license=row["license"],
        author=row["author"],
        url=row["url"],
        opaque_box=_opt_box(row["opaque_box"]),
        candidates=_rows_to_candidates(row["candidates"]),
        box=_opt_box(row["box"]),
        box_source=row["box_source"],
        box_ious={x["name"]: x["iou"] for x in row["box_ious"]},
        embedding=tuple(row["embedding"]) if row["embedding"] is not None else None,
        instances=_rows_to_instances(row["instances"]),
        dropped_instances=_rows_to_counts(row["dropped_instances"]),
        declared_size=tuple(row["declared_size"]) if row.get("declared_size") else None,
    )


def rejection_to_row(r: Rejection) -> dict[str, Any]:
    return {
        "item_id": r.item_id,
        "stage": r.stage,
        "reason": r.reason,
        "detail": r.detail,
        "source_id": r.source_id,
        "sha256": r.sha256,
        "entity": r.entity,
    }


def row_to_rejection(row: dict[str, Any]) -> Rejection:
    # Tables written before the sha256 and entity columns existed read with them empty.
    return Rejection(**{k: row.get(k) or "" for k in REJECTION_SCHEMA.names})


def preview_to_row(r: RejectionPreview) -> dict[str, Any]:
    return {
        "item_id": r.item_id,
        "stage": r.stage,
        "reason": r.reason,
        "detail": r.detail,
        "image": r.image,
        "width": r.width,
        "height": r.height,
        "boxes": [{"kind": b.kind, "box": b.box.to_list(), "label": b.label} for b in r.boxes],
    }


def row_to_preview(row: dict[str, Any]) -> RejectionPreview:
    return RejectionPreview(
        item_id=row["item_id"],
        stage=row["stage"],
        reason=row["reason"],
        detail=row["detail"],
        image=row["image"],
        width=row["width"],
        height=row["height"],
        boxes=tuple(MarkedBox(b["kind"], _box(b["box"]), b["label"]) for b in row["boxes"]),
    )
