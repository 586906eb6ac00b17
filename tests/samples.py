"""Small hand-made samples and images for the output and pipeline tests."""

from __future__ import annotations

import io

from PIL import Image

from groundforge.schemas.box import Box
from groundforge.schemas.records import Entity, KVGSample, Provenance, stable_id


def png_bytes(width: int = 8, height: int = 6, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def make_sample(i: int, split: str = "sft") -> KVGSample:
    box = Box(1, 1, 5 + i % 3, 4)
    return KVGSample(
        sample_id=stable_id("test", i),
        image=png_bytes(color=(i % 256, 10, 10)),
        width=8,
        height=6,
        domain="flag",
        task="kvg",
        question=f"where is entity {i}?",
        target=f"entity {i}",
        entities=(Entity(f"entity {i}", box),),
        gt_boxes=(box,),
        split=split,
        provenance=Provenance(
            source_image_ids=(f"img{i}",), locations=(f"/x/{i}.png",), licenses=("cc0",)
        ),
        rationale=None if i % 2 else "<think>t</think><answer>a</answer>",
        teacher_iou=0.5 if i % 2 else None,
        student_k=4 if i % 2 else None,
    )
