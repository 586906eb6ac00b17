"""``groundforge refine``: rounds that make more data where a student fails.

One round evaluates the student on a run's split (``val`` by default), scores every grounding
item (:mod:`groundforge.trainer.failures`), shares a budget of extra scenes among the entities it
failed, writes them into the run's own recipe as ``scenes.focus`` (added to any focus it already
had) and runs that recipe into ``OUT/round-<n+1>``: a normal run folder whose scenes are the
original ones plus the focus scenes. The next round evaluates that folder, and so on.

Every round is reproducible: the student answers greedily with a fixed seed, the focus is a
function of the scores, and the focus scenes are planned from their own seed. Every round shares
the first run's reply cache (``RUN_DIR/cache`` unless the recipe sets ``cache_dir``), so a scene
already asked about is never paid for twice. ``OUT/refine.json`` records, per round and per
entity, the accuracy before, the scenes and samples added and the requests and tokens the
evaluation cost, with the new run's own ``cost`` (or its chat ``models`` counts) from its
manifest.

A failed entity keeps its split: the split is a function of the entity name, so the extra scenes
of a held-out (``val``) entity are ``val`` scenes, and a training entity's are training scenes.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from groundforge.trainer.failures import (
    allocate,
    default_budget,
    entity_scores,
    focus_section,
    outcome,
)

REFINE_FILE = "refine.json"
CHAT_ROLES = ("grounder", "teacher", "student")
# Marks an image folder written by `groundforge crawl` (sources/crawl/run.py).
CRAWL_STATE = "crawl.sqlite"


class RefineError(ValueError):
    """A run or student that refine cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class Student:
    """The model evaluated: an http(s) base URL answered by ``served_model``, or a model folder
    or hub id run in this process. ``codec`` is the frame of its boxes (default: its family's for
    a model, ``norm1000`` for an endpoint)."""

    student: str
    served_model: str | None = None
    api_key_env: str | None = None
    codec: str | None = None
    max_tokens: int = 256
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0

    @property
    def is_endpoint(self) -> bool:
        return self.student.startswith(("http://", "https://"))

    def backend(self):
        from groundforge.trainer.evaluate import make_backend

        if self.is_endpoint and not self.served_model:
            raise RefineError(
                f"--student {self.student} is an endpoint: give --served-model, the model name "
                "it answers to"
            )
        if not self.is_endpoint and (self.served_model or self.api_key_env):
            raise RefineError(
                f"--student {self.student} is a model run in this process: --served-model and "
                "--api-key-env apply to an http(s) endpoint only"
            )
        return make_backend(
            model=None if self.is_endpoint else self.student,
            endpoint=self.student if self.is_endpoint else None,
            served_model=self.served_model,
            api_key_env=self.api_key_env,
            max_tokens=self.max_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
            device=self.device,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "served_model": self.served_model,
            "codec": self.codec,
            "seed": self.seed,
        }


class CountingBackend:
    """A backend that keeps every reply's request and token counts by item id."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.replies: dict[str, Any] = {}

    def answer(self, requests):
        replies = list(self.backend.answer(requests))
        for reply in replies:
            # The text is not needed; "" (not None) keeps an answered reply ``ok``.
            self.replies[reply.item_id] = replace(reply, text="" if reply.ok else None)
        return replies

    def cost(self) -> dict[str, Any]:
        """Requests (sent and cached), failures by kind, prompt and completion tokens."""
        from groundforge.annotators.teacher.client import BatchStats

        stats = BatchStats.from_replies(list(self.replies.values()))
        return {
            "requests": stats.requests,
            "cached": stats.cached,
            "failed": dict(sorted(stats.failed.items())),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
        }


def run_recipe_of(manifest: dict[str, Any], run_dir: str):
    """The recipe a run was built from, as its manifest records it."""
    from groundforge.recipe import RecipeError, parse_recipe

    data = manifest.get("recipe")
    origin = f"{run_dir}/manifest.json"
    if not isinstance(data, dict):
        raise RefineError(f"{origin} records no recipe: rebuild the run with `groundforge run`")
    try:
        recipe = parse_recipe(data, Path(run_dir), origin)
    except RecipeError as err:
        raise RefineError(f"{err}\n(the run was built by another groundforge version?)") from None
    if recipe.scenes is None or not recipe.scenes.enabled or recipe.detect is not None:
        raise RefineError(
            f"{origin}: refine adds scenes, and this run's recipe composes none; add a `scenes:` "
            "section to its recipe and run it again"
        )
    return recipe


def target_counts(run_dir: str, fmt: str) -> Counter:
    """Samples per target entity, over every split of the run (one shard read at a time)."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import list_files, read_table
    from groundforge.outputs.shards import EXTENSIONS

    counts: Counter = Counter()
    pattern = FileSystems.join(run_dir, "shards", "*", f"data-*.{EXTENSIONS[fmt]}")
    for path in list_files(pattern):
        counts.update(read_table(path, fmt).column("target").to_pylist())
    return counts


def crawl_folder(recipe) -> str | None:
    """The image folder a crawl wrote, when the recipe reads one."""
    from apache_beam.io.filesystems import FileSystems

    source = recipe.source
    if source.kind != "image_folder":
        return None
    return source.path if FileSystems.exists(FileSystems.join(source.path, CRAWL_STATE)) else None


def next_recipe(recipe, focus: dict[str, Any], cache_dir: str):
    """``recipe`` with ``scenes.focus`` set and every chat model's replies cached in
    ``cache_dir`` (unless the recipe names its own)."""
    from groundforge.recipe import Recipe

    data = recipe.model_dump(mode="json")
    data["scenes"]["focus"] = focus
    for role in CHAT_ROLES:
        if data.get(role) is not None and not data[role].get("cache_dir"):
            data[role]["cache_dir"] = cache_dir
    return Recipe.model_validate(data)


def evaluate_split(
    run_dir: str, fmt: str, split: str, backend: Any, student: Student, progress=None
) -> tuple[list, dict[str, Any]]:
    """The :class:`~groundforge.trainer.failures.Outcome` of every grounding sample of the
    run's ``split`` and what asking for them cost."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.shards import read_samples
    from groundforge.trainer.evaluate import choose_codec, evaluate, shard_item

    shards = FileSystems.join(run_dir, "shards")
    samples = [s for s in read_samples(shards, split, fmt) if s.task == "kvg"]
    if not samples:
        raise RefineError(
            f"{run_dir}: its {split!r} split holds no grounding sample to evaluate; give a split "
            "that has some (--split sft) or a recipe with `split.val_fraction` above 0"
        )
    items = [shard_item(s) for s in samples]
    # The pixels were only needed for the requests.
    samples = [replace(s, image=b"") for s in samples]
    choice = choose_codec(None if student.is_endpoint else student.student, None, student.codec)
    counting = CountingBackend(backend)
    report = evaluate(
        items,
        counting,
        codec=choice.codec,
        codec_params=choice.params,
        scorer=choice.scorer,
        batch_size=student.batch_size,
        progress=progress,
    )
    # A failed request says nothing about what the student knows: it is counted, not scored.
    outcomes = [
        outcome(s, p, counting.replies.get(s.sample_id))
        for s, p in zip(samples, report.predictions, strict=True)
        if p.error is None
    ]
    if not outcomes:
        kinds = Counter(p.error for p in report.predictions)
        raise RefineError(
            f"the student {student.student} answered none of {len(samples)} requests "
            f"({', '.join(f'{k} {n}' for k, n in kinds.most_common())}): is it running, and is "
            "--served-model its name?"
        )
    return outcomes, {**counting.cost(), "codec": choice.codec, "scorer": choice.scorer}


def _manifest(run_dir: str) -> dict[str, Any]:
    from groundforge.outputs.manifest import check_run

    return check_run(run_dir)


def _run_cost(manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest.get("cost"):
        return {"cost": manifest["cost"]}
    return {"models": manifest.get("models", {})}


def _round_entities(scores, shares, before: Counter, after: Counter | None) -> dict[str, Any]:
    changed = (
        set() if after is None else {n for n in set(before) | set(after) if before[n] != after[n]}
    )
    rows = {}
    for name in sorted(set(scores) | changed):
        score = scores.get(name)
        row: dict[str, Any] = {
            "items": score.items if score else 0,
            "correct": score.correct if score else 0,
            "accuracy": round(score.accuracy, 4) if score else None,
            "mean_iou": round(score.iou_sum / score.items, 4) if score and score.items else None,
            "confused_with": score.confused_with() if score else [],
            "scenes_added": shares.get(name, 0),
            "samples_before": before[name],
            "samples_after": None if after is None else after[name],
            "samples_added": None if after is None else after[name] - before[name],
            "requests": score.items if score else 0,
            "prompt_tokens": score.prompt_tokens if score else 0,
            "completion_tokens": score.completion_tokens if score else 0,
        }
        rows[name] = row
    return rows


RunRound = Callable[[Any, str], dict[str, Any]]


def _default_run(beam_args: Sequence[str]) -> RunRound:
    def run(recipe, out_dir: str) -> dict[str, Any]:
        from groundforge.pipelines.run import run_recipe

        return run_recipe(recipe, out_dir, list(beam_args)).manifest

    return run


def refine(
    run_dir: str,
    student: Student,
    out: str | None = None,
    rounds: int = 1,
    budget: int | None = None,
    split: str = "val",
    beam_args: Sequence[str] = (),
    run_round: RunRound | None = None,
    progress=None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``rounds`` refine rounds from ``run_dir`` into ``out`` (default ``RUN_DIR-refine``):
    ``out/round-2``, ``out/round-3``, ... and ``out/refine.json`` (returned). ``budget`` is the
    extra scenes per round (default: two per failed item). ``run_round(recipe, out_dir)`` runs a
    round's recipe and returns its manifest (default: :func:`run_recipe` with ``beam_args``);
    ``progress(label)``, when given, is a context manager giving the evaluation's
    ``(done, total)`` callback (:func:`groundforge.outputs.console.progress_bar`); ``on_round``
    gets each round's record as it is done. Stops early when the student fails nothing."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import write_text

    if rounds < 1:
        raise RefineError(f"--rounds must be at least 1, got {rounds}")
    if budget is not None and budget < 1:
        raise RefineError(f"--extra-scenes must be at least 1 scene, got {budget}")
    run_dir = run_dir.rstrip("/")
    out = (out or f"{run_dir}-refine").rstrip("/")
    run_round = run_round or _default_run(beam_args)
    first = run_recipe_of(_manifest(run_dir), run_dir)
    chat = [getattr(first, role) for role in CHAT_ROLES if getattr(first, role) is not None]
    cache_dir = next((c.cache_dir for c in chat if c.cache_dir), FileSystems.join(run_dir, "cache"))
    crawl = crawl_folder(first)
    body: dict[str, Any] = {
        "run": run_dir,
        "out": out,
        "split": split,
        "budget": budget,
        **student.describe(),
        "crawl": None
        if crawl is None
        else {
            "folder": crawl,
            "fetched": 0,
            "note": "more images are not fetched; rerun `groundforge crawl` for the failed "
            "entities to add some",
        },
        "rounds": [],
    }
    backend = student.backend()
    try:
        current = run_dir
        for number in range(1, rounds + 1):
            manifest = _manifest(current)
            recipe = run_recipe_of(manifest, current)
            bar = progress(f"evaluating {current}") if progress else contextlib.nullcontext()
            with bar as update:
                outcomes, eval_cost = evaluate_split(
                    current, manifest["format"], split, backend, student, update
                )
            scores = entity_scores(outcomes)
            shares = allocate(scores, default_budget(scores) if budget is None else budget)
            before = target_counts(current, manifest["format"])
            record: dict[str, Any] = {
                "round": number,
                "evaluated": current,
                "items": len(outcomes),
                "accuracy": round(sum(o.correct for o in outcomes) / len(outcomes), 4),
                "failed_entities": sorted(n for n, s in scores.items() if s.failed),
                "out": None,
                "focus": None,
                "cost": {"eval": eval_cost},
            }
            if shares:
                cfg = recipe.scenes
                previous = None if cfg.focus is None else cfg.focus.model_dump(mode="json")
                focus = focus_section(
                    scores,
                    shares,
                    outcomes,
                    k_values=[k for k, w in cfg.k_weights.items() if w > 0],
                    layouts=[name for name, w in cfg.layout_weights.items() if w > 0],
                    seed=f"refine-{student.seed}",
                    previous=previous,
                )
                target = FileSystems.join(out, f"round-{number + 1}")
                new_manifest = run_round(next_recipe(recipe, focus, cache_dir), target)
                after = target_counts(target, new_manifest["format"])
                record.update(out=target, focus=focus)
                record["cost"]["run"] = _run_cost(new_manifest)
            else:
                after = None
            record["entities"] = _round_entities(scores, shares, before, after)
            body["rounds"].append(record)
            write_text(FileSystems.join(out, REFINE_FILE), json.dumps(body, indent=2) + "\n")
            if on_round is not None:
                on_round(record)
            if not shares:
                break
            current = record["out"]
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return body


def round_table(record: dict[str, Any], limit: int = 30):
    """One round as a rich table: the failed entities first (lowest accuracy first), then the
    others, at most ``limit`` rows."""
    from rich.table import Table

    title = (
        f"round {record['round']}: {record['evaluated']} -> {record['out'] or 'no new run'} "
        f"(accuracy {record['accuracy']:.2%} over {record['items']} items)"
    )
    table = Table(title=title, title_justify="left")
    for column in (
        "entity",
        "items",
        "accuracy before",
        "taken for",
        "scenes added",
        "samples added",
        "requests",
        "tokens",
    ):
        table.add_column(column, justify="left" if column in ("entity", "taken for") else "right")
    rows = sorted(
        record["entities"].items(),
        key=lambda kv: (kv[1]["accuracy"] if kv[1]["accuracy"] is not None else 2, kv[0]),
    )
    for name, row in rows[:limit]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.0%}"
        added = "-" if row["samples_added"] is None else f"{row['samples_added']:+d}"
        table.add_row(
            name,
            str(row["items"]),
            accuracy,
            ", ".join(row["confused_with"][:3]),
            str(row["scenes_added"]),
            added,
            str(row["requests"]),
            str(row["prompt_tokens"] + row["completion_tokens"]),
        )
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more entities in refine.json"
    return table
