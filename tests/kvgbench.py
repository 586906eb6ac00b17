"""A small KVG-Bench-format parquet for the evaluation tests.

Columns as in the benchmark: ``question_id``, ``category``, ``question``, ``answer`` (the box as
``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in the Qwen2-VL 0..1000 frame) and ``image`` (a struct
of ``bytes`` and ``path``). Each image is noise with the answer box painted in one colour, so the
box is known and visible.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

QUESTION = "Find and give the bounding box of <|object_ref_start|>{entity}<|object_ref_end|>"


@dataclass(frozen=True)
class BenchCase:
    """One row: the answer ``box`` in integers 0..1000 of a ``width`` x ``height`` image."""

    question_id: int
    category: str
    entity: str
    box: tuple[int, int, int, int]
    width: int = 280
    height: int = 224

    @property
    def question(self) -> str:
        return QUESTION.format(entity=self.entity)

    @property
    def answer(self) -> str:
        x1, y1, x2, y2 = self.box
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


# Seen (aircraft, bird), unseen (dog, flower) and one of our own domains (flag).
DEFAULT_CASES = (
    BenchCase(101, "aircraft", "Boeing 757", (100, 100, 500, 600)),
    BenchCase(102, "aircraft", "Airbus A320", (0, 0, 400, 400), width=300, height=200),
    BenchCase(103, "bird", "Snowy owl", (250, 125, 750, 875)),
    BenchCase(104, "dog", "Beagle", (200, 200, 600, 600), width=200, height=320),
    BenchCase(105, "flower", "Tulip", (500, 0, 1000, 500)),
    BenchCase(106, "flag", "Flag of Chad", (100, 300, 900, 700)),
)


def case_png(case: BenchCase, seed: int | None = None) -> bytes:
    """Noise with the case's box filled in one colour, as PNG bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(case.question_id if seed is None else seed)
    pixels = rng.integers(0, 256, (case.height, case.width, 3), np.uint8)
    x1, y1, x2, y2 = case.box
    sx, sy = case.width / 1000, case.height / 1000
    pixels[round(y1 * sy) : round(y2 * sy), round(x1 * sx) : round(x2 * sx)] = (220, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_kvg_bench(path: str | Path, items=DEFAULT_CASES) -> list[BenchCase]:
    """Write ``items`` (:class:`BenchCase`) as a KVG-Bench parquet file at ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = list(items)
    schema = pa.schema(
        [
            ("question_id", pa.int64()),
            ("category", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ]
    )
    rows = [
        {
            "question_id": case.question_id,
            "category": case.category,
            "question": case.question,
            "answer": case.answer,
            "image": {"bytes": case_png(case), "path": f"{case.question_id}.png"},
        }
        for case in items
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return items
