"""A few examples of each drop reason, with a thumbnail and the boxes involved, for the report.

Each stage sends its drops to a ``preview`` output (:mod:`groundforge.pipelines.stage`);
:class:`WritePreviews` keeps the ``per_reason`` drops of each (stage, reason) with the smallest
rank (a hash of the item id: a stable pick whatever the runner) and writes them, thumbnails made
only for those, to one Parquet file. The work stays bounded however many items a run drops.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import apache_beam as beam

from groundforge.outputs.files import read_table, write_table
from groundforge.pixels import image_bytes
from groundforge.schemas.arrow import PREVIEW_SCHEMA, preview_to_row, row_to_preview
from groundforge.schemas.box import Box
from groundforge.schemas.records import (
    ImageRecord,
    KVGSample,
    MarkedBox,
    Rejection,
    RejectionPreview,
)

PREVIEWS_FILE = "rejection_previews.parquet"
PREVIEWS_PER_REASON = 6
THUMB_SIDE = 320
# A drop may be a decompression bomb: never decode more than this many pixels for a preview.
MAX_PREVIEW_PIXELS = 40_000_000


def thumbnail(data: bytes | None, side: int = THUMB_SIDE) -> tuple[bytes, int, int] | None:
    """A JPEG of at most ``side`` px on its longest side, upright, or None when ``data`` does not
    decode (or is too large to decode safely)."""
    if not data:
        return None
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            # The size is checked below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PREVIEW_PIXELS:
            return None
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
    except Exception:  # a preview of a broken image is "no image", never a failed run
        return None
    return out.getvalue(), image.width, image.height


def _cause_boxes(detail: dict[str, Any]) -> list[tuple[str, Box]]:
    """Boxes a drop's detail names (keys ending in ``box``: ``box``, ``grounder_box``, ...)."""
    found = []
    for key, value in sorted(detail.items()):
        if key.endswith("box") and isinstance(value, list) and len(value) == 4:
            try:
                found.append((key, Box.from_list([float(v) for v in value])))
            except (TypeError, ValueError):
                continue
    return found


def _marked(item: Any, detail: dict[str, Any]) -> tuple[bytes | None, int, int, list[MarkedBox]]:
    """The item's image and its boxes, in the item's pixels."""
    marks: list[MarkedBox] = []
    if isinstance(item, ImageRecord):
        image, width, height = image_bytes(item), item.width, item.height
        truths = [item.box] if item.box is not None else list(item.boxes)
        marks += [MarkedBox("gt", b, item.entity) for b in truths]
        candidates = item.candidates
    elif isinstance(item, KVGSample):
        image, width, height = image_bytes(item), item.width, item.height
        marks += [MarkedBox("gt", b, item.target) for b in item.gt_boxes]
        candidates = item.candidates
    else:
        return getattr(item, "data", None), 0, 0, []
    marks += [MarkedBox("candidate", d.box, name) for name, ds in candidates.items() for d in ds]
    marks += [MarkedBox("cause", box, key) for key, box in _cause_boxes(detail)]
    return image, width, height, marks


def make_preview(rejection: Rejection, item: Any, side: int = THUMB_SIDE) -> RejectionPreview:
    """The preview of one drop: a thumbnail of the item's image with its boxes scaled onto it."""
    detail = json.loads(rejection.detail)
    image, width, height, marks = _marked(item, detail)
    thumb = thumbnail(image, side)
    if thumb is None:
        return RejectionPreview(
            rejection.item_id, rejection.stage, rejection.reason, rejection.detail
        )
    jpeg, tw, th = thumb
    # Boxes are in the item's upright frame; a record not yet checked has no size, so no boxes.
    boxes = ()
    if width > 0 and height > 0:
        sx, sy = tw / width, th / height
        boxes = tuple(MarkedBox(m.kind, m.box.scale(sx, sy), m.label) for m in marks)
    return RejectionPreview(
        rejection.item_id, rejection.stage, rejection.reason, rejection.detail, jpeg, tw, th, boxes
    )


def _rank(value: tuple) -> str:
    return value[0]


def _write(group, path: str) -> int:
    _, previews = group
    rows = [
        preview_to_row(p) for p in sorted(previews, key=lambda p: (p.stage, p.reason, p.item_id))
    ]
    return write_table(path, rows, PREVIEW_SCHEMA, "parquet")


class WritePreviews(beam.PTransform):
    """Keep ``per_reason`` drops of each (stage, reason) and write their previews to ``path``."""

    def __init__(self, path: str, per_reason: int = PREVIEWS_PER_REASON, side: int = THUMB_SIDE):
        super().__init__()
        self.path, self.per_reason, self.side = path, per_reason, side

    def expand(self, drops):
        side = self.side
        return (
            drops
            | "pick examples" >> beam.combiners.Top.SmallestPerKey(self.per_reason, key=_rank)
            | "make previews"
            >> beam.FlatMap(lambda kv: [make_preview(r, item, side) for _, r, item in kv[1]])
            | "one group" >> beam.Map(lambda p: (0, p))
            | "gather" >> beam.GroupByKey()
            | "write previews" >> beam.Map(_write, self.path)
        )


def ensure_previews(path: str) -> None:
    """A run with nothing dropped still has a (0-row) previews table."""
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(path):
        write_table(path, [], PREVIEW_SCHEMA, "parquet")


def read_previews(path: str) -> list[RejectionPreview]:
    return [row_to_preview(row) for row in read_table(path, "parquet").to_pylist()]
