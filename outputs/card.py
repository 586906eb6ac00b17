"""The dataset card (``README.md`` of a run folder): what the corpus is and how to use it."""

from __future__ import annotations

from typing import Any


def _funnel_table(stages: list[dict[str, Any]]) -> str:
    lines = ["| stage | in | kept | dropped (by reason) |", "|---|---:|---:|---|"]
    for s in stages:
        dropped = ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {dropped} |")
    return "\n".join(lines)


def render_card(manifest: dict[str, Any]) -> str:
    """Markdown for a run folder, from its manifest."""
    recipe = manifest["recipe"]
    source = recipe["source"]
    fmt = manifest["format"]
    splits = "\n".join(f"| {k} | {v} |" for k, v in manifest["splits"].items())
    if fmt == "arrow":
        load = (
            "```python\nfrom datasets import load_from_disk\n\n"
            'ds = load_from_disk("shards")   # a DatasetDict, one entry per split\n'
            'ds["sft"][0]["image"]          # a PIL image\n```'
        )
    else:
        load = (
            "```python\nfrom datasets import load_dataset\n\n"
            'ds = load_dataset("parquet", data_files={"sft": "shards/sft/*.parquet"})\n```'
        )
    license_note = source.get("license") or "as given per sample in `provenance.licenses`"
    return f"""---
pretty_name: {recipe["name"]}
task_categories:
- object-detection
- visual-question-answering
---

# {recipe["name"]}

{recipe.get("description") or "A knowledge-intensive visual grounding corpus."}

Built by groundforge {manifest["groundforge_version"]} (recipe hash `{manifest["recipe_hash"]}`)
on {manifest["created_at"]}. Domain: `{recipe["domain"]}`. Each row is one question asking for
the box of a named entity in an image; `gt_boxes` are pixel `[x1, y1, x2, y2]` boxes of that
image, and `entities` lists every named instance it shows.

## Splits

| split | rows |
|---|---:|
{splits}

`val` holds entities that never appear in the training splits.

## How it was made

Source: `{source["kind"]}` at `{source["path"]}`. Boxes: {recipe["boxes"]["method"]}
(a box known from the source wins). Stage funnel:

{_funnel_table(manifest["stages"])}

Every dropped item is listed with its reason in `rejections.parquet`; shard checksums are in
`manifest.json`.

## Licence and sources

Licence: {license_note}. Each row carries its source image ids, locations, licences and authors in
`provenance`.

## Use

{load}
"""
