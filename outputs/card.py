"""The dataset card (``README.md`` of a run folder): what the corpus is and how to use it."""

from __future__ import annotations

from typing import Any

import yaml

# Licence ids the Hub knows (https://huggingface.co/docs/hub/repositories-licenses) that a data
# recipe is likely to name; any other licence text is "other", explained in the card's body.
HUB_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-2.0",
        "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0",
        "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-permissive-1.0",
        "cdla-permissive-2.0", "cdla-sharing-1.0", "odc-by", "odbl", "pddl", "gpl-3.0",
        "unlicense", "unknown",
    }
)  # fmt: skip


def hub_license(text: str) -> str:
    """The Hub licence id that a licence text names; "other" for free text.

    >>> hub_license("CC-BY-4.0"), hub_license("cc by sa 4.0"), hub_license("public domain")
    ('cc-by-4.0', 'cc-by-sa-4.0', 'other')
    """
    name = "-".join(text.strip().lower().replace("_", " ").split())
    return name if name in HUB_LICENSES else "other"


def front_matter(manifest: dict[str, Any], data_dir: str) -> str:
    """The card's YAML metadata: licence, tasks, and one config naming every split's shards
    (``data_dir``: the shards folder as seen from the card), so that ``datasets.load_dataset``
    on the card's folder and the Hub find every split, not only the ones named like
    train/validation/test. A split without rows is left out: ``datasets`` refuses one."""
    recipe = manifest["recipe"]
    licences = manifest.get("provenance", {}).get("licenses") or [recipe["source"].get("license")]
    ids = sorted({hub_license(t) for t in licences if t}) or ["unknown"]
    prefix = f"{data_dir}/" if data_dir else ""
    # Shard files are data-NNNNN-of-NNNNN.<format>.
    data_files = [
        {"split": split, "path": f"{prefix}{split}/*.{manifest['format']}"}
        for split, rows in manifest["splits"].items()
        if rows
    ]
    meta = {
        "pretty_name": recipe["name"],
        "license": ids[0] if len(ids) == 1 else ids,
        "task_categories": ["object-detection", "visual-question-answering"],
    }
    if data_files:
        meta["configs"] = [{"config_name": "default", "data_files": data_files}]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n"


def render_shards_card(manifest: dict[str, Any]) -> str:
    """The ``README.md`` of the shards folder: the same metadata, pointing at the full card."""
    return (
        f"{front_matter(manifest, '')}\n# {manifest['recipe']['name']}: shards\n\n"
        "The dataset card is `../README.md`.\n"
    )


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


def _aliases(manifest: dict[str, Any]) -> str:
    """The entities known under more than one name (their other names' images were all copies
    of theirs), or nothing."""
    table = manifest.get("aliases") or {}
    if not table:
        return ""
    lines = [
        "## One entity, several names",
        "",
        "Every image of each alias was a copy of the entity's own, so the alias has no rows of",
        "its own; its name is another name of the entity.",
        "",
        "| entity | also named |",
        "|---|---|",
    ]
    lines += [f"| {name} | {', '.join(others)} |" for name, others in table.items()]
    return "\n".join(lines) + "\n\n"


def _models(manifest: dict[str, Any]) -> str:
    """The model stages' requests, tokens and cost, or nothing when the run used no model."""
    models = manifest.get("models") or {}
    if not models:
        return ""
    lines = [
        "Model requests:",
        "",
        "| stage | requests | cached | sent | prompt tokens | completion tokens | busy s | cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, m in models.items():
        cost = m.get("cost")
        lines.append(
            f"| {stage} | {m.get('requests', 0)} | {m.get('cached', 0)} | {m.get('sent', 0)} | "
            f"{m.get('prompt_tokens', 0)} | {m.get('completion_tokens', 0)} | "
            f"{m.get('seconds', 0.0):.1f} | {'-' if cost is None else f'{cost:.4f}'} |"
        )
    total = (manifest.get("cost") or {}).get("total")
    if total is not None:
        per = manifest["cost"].get("per_sample")
        each = f", {per:.6f} per accepted sample" if per is not None else ""
        lines += ["", f"Model cost of this run: {total:.4f}{each} (cached replies cost nothing)."]
    return "\n".join(lines) + "\n\n"


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
    return f"""{front_matter(manifest, "shards")}
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

{_aliases(manifest)}## How it was made

Source: `{source["kind"]}` at {_source_place(source)}. Steps: {"; ".join(layers)} (a box known
from the source wins). Stage funnel:

{_funnel_table(manifest["stages"])}

{_models(manifest)}Every dropped item is listed with its reason in `rejections.parquet`, with a few
examples of each reason (thumbnails and boxes) in `rejection_previews.parquet`; `report.html`
shows samples, drops and distributions in a browser. Shard checksums are in `manifest.json`.

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
groundforge train sft  . --model Qwen/Qwen2.5-VL-7B-Instruct --out runs/sft
groundforge train grpo . --model runs/sft --out runs/grpo
groundforge eval . --split val --model runs/grpo --codec qwen25vl --max-pixels 401408
```

Or export it: `groundforge export llamafactory . --out lf` (LLaMA-Factory) and
`groundforge export verl . --out verl` (verl).
"""
