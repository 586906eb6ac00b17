"""Run a recipe end to end: prepare the folder, run the graph, finalise shards and manifest."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from groundforge.outputs.card import render_card, render_shards_card
from groundforge.outputs.files import list_files, remove_folder, write_text
from groundforge.outputs.manifest import build_manifest, write_manifest
from groundforge.outputs.previews import PREVIEWS_FILE, ensure_previews
from groundforge.outputs.rejections import REJECTIONS_FILE, iter_rejections, merge_rejections
from groundforge.outputs.report import REPORT_FILE, write_report
from groundforge.outputs.shards import finalize_shards
from groundforge.pipelines.aliases import read_aliases
from groundforge.pipelines.kvg import (
    REJECTION_PARTS,
    SHARDS_DIR,
    WORK_DIR,
    KVGGraph,
    splits_for,
)
from groundforge.pipelines.metrics import (
    StageCount,
    read_chat_counts,
    read_funnel,
    read_instances,
    read_provenance,
    read_stage_seconds,
)
from groundforge.pipelines.options import (
    describe_runner,
    is_multi_process,
    pipeline_options,
    unknown_options,
)
from groundforge.pipelines.progress import ProgressWatcher, shows_progress
from groundforge.recipe import Recipe

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
# Option names whose values are credentials; the manifest records them as "***".
_SECRET_OPTION = re.compile(r"--[\w.-]*(secret|token|password|credential|access_key)[\w.-]*", re.I)
REDACTED = "***"


class FunnelMismatch(RuntimeError):
    """The counters and the rejections table disagree: something was lost."""


@dataclass
class RunResult:
    out_dir: str
    manifest: dict[str, Any]
    funnel: list[StageCount]


def _clear_previous(out_dir: str) -> None:
    """Remove what a previous run wrote here (and only that), so old shards never mix in."""
    stale = list_files(FileSystems.join(out_dir, SHARDS_DIR, "**"))
    stale += [
        p
        for name in (REJECTIONS_FILE, PREVIEWS_FILE, MANIFEST_FILE, CARD_FILE, REPORT_FILE)
        for p in list_files(FileSystems.join(out_dir, name))
    ]
    if stale:
        FileSystems.delete(stale)
    # An interrupted run leaves its work folder: its rejection parts must not mix in either.
    remove_folder(FileSystems.join(out_dir, WORK_DIR))


def check_funnel(funnel: list[StageCount], rejections: Counter) -> None:
    """Every stage balances, and the rejections table holds exactly the counted drops."""
    for s in funnel:
        if not s.balanced:
            raise FunnelMismatch(
                f"stage {s.stage}: in {s.total} != kept {s.kept} + dropped {s.dropped_total}"
            )
        for reason, n in s.dropped.items():
            if rejections.get((s.stage, reason), 0) != n:
                raise FunnelMismatch(
                    f"stage {s.stage}: {n} counted as {reason} but "
                    f"{rejections.get((s.stage, reason), 0)} in {REJECTIONS_FILE}"
                )
    counted = {(s.stage, r) for s in funnel for r in s.dropped}
    extra = {k: v for k, v in rejections.items() if k not in counted}
    if extra:
        raise FunnelMismatch(f"rejections without a counter: {extra}")


def redact_args(beam_args: list[str] | tuple[str, ...]) -> list[str]:
    """``beam_args`` with the values of credential options (``--s3_secret_access_key``, ...)
    replaced by ``***``, in both ``--flag=value`` and ``--flag value`` forms."""
    shown: list[str] = []
    hide_next = False
    for arg in beam_args:
        if hide_next:
            shown.append(REDACTED)
            hide_next = False
            continue
        name, sep, _ = arg.partition("=")
        if _SECRET_OPTION.fullmatch(name):
            if sep:
                arg = f"{name}={REDACTED}"
            else:
                hide_next = True
        shown.append(arg)
    return shown


def check_api_keys(recipe: Recipe) -> None:
    """Fail before any work when a model's key variable is not set (naming the variable only)."""
    for role in ("grounder", "teacher", "student"):
        cfg = getattr(recipe, role)
        if cfg is not None and cfg.api_key_env and cfg.api_key_env not in os.environ:
            raise ValueError(
                f"{role}.api_key_env names the environment variable {cfg.api_key_env}, which is "
                f"not set; export it (the key never goes in the recipe)"
            )


def run_recipe(
    recipe: Recipe,
    out_dir: str,
    beam_args: list[str] | tuple[str, ...] = (),
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
):
    """Run ``recipe`` into ``out_dir`` and return the manifest and funnel.

    ``progress``, when given, receives every half second the live counts of every stage
    (``{"stage", "in", "kept", "dropped"}`` dicts, in stage order) on local runners.

    ``out_dir`` is any ``FileSystems`` path; the filesystem options in ``beam_args``
    (``--s3_endpoint_url``, ``--s3_access_key_id``, ...) reach the workers through the pipeline
    and every file this process reads or writes before and after it.
    """
    check_api_keys(recipe)
    options = pipeline_options(beam_args)
    for flag in unknown_options(options):
        log.warning(
            "%s is not a Beam pipeline option any loaded runner knows; check the spelling", flag
        )
    # beam.Pipeline() sets these too, but only once it is built: the folder is cleared first.
    FileSystems.set_options(options)
    _clear_previous(out_dir)
    started = time.perf_counter()
    watched = progress is not None and shows_progress(options)
    progress_dir = tempfile.mkdtemp(prefix="groundforge-progress-") if watched else None
    try:
        # Several worker processes on a few cores oversubscribe torch's thread pool badly.
        graph = KVGGraph(
            recipe,
            out_dir,
            model_threads=1 if is_multi_process(options) else None,
            progress_dir=progress_dir,
        )
        pipeline = beam.Pipeline(options=options)
        graph.build(pipeline)
        watcher = (
            ProgressWatcher(progress_dir, graph.stages, progress)
            if progress_dir
            else contextlib.nullcontext()
        )
        with watcher:
            result = pipeline.run()
            result.wait_until_finish()
        return _finish(recipe, out_dir, options, beam_args, graph, result, started)
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
        remove_folder(FileSystems.join(out_dir, WORK_DIR))


def _finish(recipe, out_dir, options, beam_args, graph, result, started) -> RunResult:
    """After the pipeline: complete the shards and tables, check the funnel, write the
    manifest, card and report."""
    stages = graph.stages
    timing = {
        "wall_seconds": round(time.perf_counter() - started, 3),
        "stage_seconds": read_stage_seconds(result, stages),
    }

    funnel = read_funnel(result, stages)
    models = read_chat_counts(result, graph.chat_roles)
    fmt = recipe.output.format
    shards = finalize_shards(FileSystems.join(out_dir, SHARDS_DIR), splits_for(recipe), fmt)
    rejections_path = FileSystems.join(out_dir, REJECTIONS_FILE)
    merge_rejections(FileSystems.join(out_dir, WORK_DIR, REJECTION_PARTS), rejections_path)
    ensure_previews(FileSystems.join(out_dir, PREVIEWS_FILE))
    by_stage = Counter((r.stage, r.reason) for r in iter_rejections(rejections_path))
    check_funnel(funnel, by_stage)
    kept = funnel[-1].kept if funnel else 0
    written = sum(s.rows for s in shards)
    if kept != written:
        raise FunnelMismatch(f"{kept} samples kept but {written} rows in the shards")

    manifest = build_manifest(
        recipe=recipe.model_dump(mode="json"),
        recipe_hash=recipe.digest(),
        funnel=[s.to_dict() for s in funnel],
        shards=shards,
        out_dir=out_dir,
        fmt=fmt,
        rejection_reasons=Counter(f"{stage}/{reason}" for (stage, reason) in by_stage.elements()),
        runner=describe_runner(options, redact_args(beam_args)),
        models=models,
        timing=timing,
        provenance=read_provenance(result),
        aliases=read_aliases(result),
        instances=read_instances(result) if "instances" in stages else None,
    )
    write_manifest(FileSystems.join(out_dir, MANIFEST_FILE), manifest)
    write_text(FileSystems.join(out_dir, CARD_FILE), render_card(manifest))
    # datasets.load_dataset reads the card of the folder it is given: the shards folder too.
    write_text(FileSystems.join(out_dir, SHARDS_DIR, CARD_FILE), render_shards_card(manifest))
    write_report(out_dir)
    return RunResult(out_dir, manifest, funnel)
