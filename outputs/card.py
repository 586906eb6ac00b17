"""The dataset card (``README.md`` of a run folder): what the corpus is and how to use it."""

from __future__ import annotations

from typing import Any


def _funnel_table(stages: list[dict[str, Any]]) -> str:
    lines = ["| stage | in | kept | dropped (by reason) |", "|---|---:|---:|---|"]
    for s in stages:
        dropped = ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {dropped} |")
    return "\n".join(lines)


def _tally(counts: dict[str, int], what: str) -> str:
    if not counts:
        return f"No {what} recorded."
    lines = [f"| {what} | rows |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in counts.items()]
    return "\n".join(lines)


def _domains(manifest: dict[str, Any], recipe_domain: str) -> str:
    """Every domain of the rows, with its rows and distinct entities; the recipe's domain for a
    manifest that does not count them."""
    provenance = manifest.get("provenance") or {}
    rows, entities = provenance.get("domains") or {}, provenance.get("entities") or {}
    if not rows:
        return f"Domain: `{recipe_domain}`"
    parts = [f"`{d}` ({n} rows, {entities.get(d, 0)} entities)" for d, n in sorted(rows.items())]
    return ("Domains: " if len(parts) > 1 else "Domain: ") + ", ".join(parts)


def _source_place(source: dict[str, Any]) -> str:
    # Annotation sources name two places, an annotation file and an image folder.
    if "annotations" in source:
        return f"`{source['annotations']}` (images in `{source['images']}`)"
    return f"`{source['path']}`"


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
    provenance = manifest.get("provenance") or {}
    layers = ["box from " + recipe["boxes"]["method"]]
    for section, text in (
        ("scenes", "composed scenes of look-alike entities"),
        ("grounder", "boxes checked against an MLLM grounder"),
        ("teacher", "teacher rationales checked against the answer box"),
        ("student", "a `grpo` split of items the student solves 1 to k-1 times"),
    ):
        if recipe.get(section) and (recipe[section].get("enabled", True)):
            layers.append(text)
    return f"""---
pretty_name: {recipe["name"]}
task_categories:
- object-detection
- visual-question-answering
---

# {recipe["name"]}

{recipe.get("description") or "A knowledge-intensive visual grounding corpus."}

Built by groundforge {manifest["groundforge_version"]} (recipe hash `{manifest["recipe_hash"]}`)
on {manifest["created_at"]}. {_domains(manifest, recipe["domain"])}. Each row is one question
asking for the box of a named entity in an image; `gt_boxes` are pixel `[x1, y1, x2, y2]`
boxes of that image, and `entities` lists every named instance it shows.

## Splits

| split | rows |
|---|---:|
{splits}

`val` holds entities that never appear in the training splits.

## How it was made

Source: `{source["kind"]}` at {_source_place(source)}. Steps: {"; ".join(layers)} (a box known
from the source wins). Stage funnel:

{_funnel_table(manifest["stages"])}

Every dropped item is listed with its reason in `rejections.parquet`, with a few examples of
each reason (thumbnails and boxes) in `rejection_previews.parquet`; `report.html` shows samples,
drops and distributions in a browser. Shard checksums are in `manifest.json`.

## Licence and sources

Licence: {license_note}. Each row carries its source image ids, locations, licences and authors in
`provenance`; a composed scene carries those of every image in it.

{_tally(provenance.get("licenses", {}), "licence")}

{_tally(provenance.get("sources", {}), "source")}

## Intended use

Training and evaluating multimodal LLMs on knowledge-intensive visual grounding: given an image
and an entity's name, answer with the entity's box, ideally after reasoning about what tells it
apart from its look-alikes. Not for identifying people, and not a benchmark: `val` is a held-out
split for checking a training run, not a measurement of general ability.

## Load

{load}

## Train

```bash
groundforge train sft  --data . --model Qwen/Qwen2.5-VL-7B-Instruct --output runs/sft
groundforge train grpo --data . --model runs/sft --output runs/grpo
groundforge eval --shards . --split val --model runs/grpo --codec qwen25vl --max-pixels 401408
```

Or export it: `groundforge export llamafactory . --to lf` (LLaMA-Factory) and
`groundforge export verl . --to verl` (verl).
"""
