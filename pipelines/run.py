"""Run a recipe end to end: prepare the folder, run the graph, finalise shards and manifest."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import WorkerOptions

from groundforge.outputs.card import render_card, render_shards_card
from groundforge.outputs.cost import cost_section
from groundforge.outputs.files import (
    list_files,
    move_files,
    relative_to,
    remove_folder,
    write_text,
)
from groundforge.outputs.manifest import build_manifest, read_manifest, write_manifest
from groundforge.outputs.previews import PREVIEWS_FILE, ensure_previews
from groundforge.outputs.rejections import REJECTIONS_FILE, iter_rejections, merge_rejections
from groundforge.outputs.report import REPORT_FILE, write_report
from groundforge.outputs.shards import finalize_shards
from groundforge.pipelines.aliases import read_aliases
from groundforge.pipelines.kvg import (
    CACHE_DIR,
    REJECTION_PARTS,
    SHARDS_DIR,
    WORK_DIR,
    KVGGraph,
    make_source,
    splits_for,
)
from groundforge.pipelines.metrics import (
    StageCount,
    read_chat_counts,
    read_funnel,
    read_instances,
    read_model_counts,
    read_provenance,
    read_stage_seconds,
)
from groundforge.pipelines.options import (
    check_beam_args,
    describe_runner,
    is_multi_process,
    pipeline_options,
)
from groundforge.pipelines.preflight import PreflightError, preflight
from groundforge.pipelines.progress import ProgressWatcher, shows_progress
from groundforge.pipelines.selection import Selection, count_selected
from groundforge.pipelines.workerlogs import worker_stderr_to_file
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


class NotARunFolder(ValueError):
    """``--out`` holds files that no run wrote: writing there could destroy them."""


class EmptySource(ValueError):
    """The source gave no item at all: there is nothing to build a run from."""


# What a finished run consists of; a rerun replaces exactly these (the reply cache stays).
RUN_ENTRIES = (MANIFEST_FILE, SHARDS_DIR, REJECTIONS_FILE, PREVIEWS_FILE, CARD_FILE, REPORT_FILE)
# A run is built here and moved into place only once it has finished, so a rerun that fails or is
# interrupted leaves the previous run as it was.
STAGING_DIR = "_staging"
# In the staging folder: the staged run is complete and is being moved (a run killed while moving
# is finished by the next one) ...
_PUBLISHING = "_publishing"
# ... and the previous run's files are gone (only staged files remain to move).
_OLD_REMOVED = "_old_removed"
# What a run that never finished may leave in --out: not a sign of someone else's folder.
_LEFTOVERS = {CACHE_DIR, STAGING_DIR, WORK_DIR}


def _entries(out_dir: str) -> set[str]:
    """The names of the files and folders directly in ``out_dir``."""
    return {
        relative_to(p, out_dir).split("/", 1)[0]
        for p in list_files(FileSystems.join(out_dir, "**"))
    }


def _remove_entries(out_dir: str, names) -> None:
    for name in names:
        path = FileSystems.join(out_dir, name)
        if name == SHARDS_DIR:
            remove_folder(path)
        elif FileSystems.exists(path):
            FileSystems.delete([path])


def _mark(staging: str, name: str) -> None:
    # Not empty: an object store upload of no bytes has no part and is refused.
    write_text(FileSystems.join(staging, name), f"{name}\n")


def _move_staged(staging: str, out_dir: str) -> None:
    """Finish publishing a complete staged run: remove the previous run (once), move the staged
    files in, the manifest last (it is what marks a finished run), then drop the staging folder."""
    if not FileSystems.exists(FileSystems.join(staging, _OLD_REMOVED)):
        _remove_entries(out_dir, RUN_ENTRIES)
        _mark(staging, _OLD_REMOVED)
    markers = {_PUBLISHING, _OLD_REMOVED, MANIFEST_FILE}
    staged = [
        p
        for p in list_files(FileSystems.join(staging, "**"))
        if relative_to(p, staging) not in markers
        and not relative_to(p, staging).startswith(WORK_DIR + "/")
    ]
    move_files(staged, [FileSystems.join(out_dir, relative_to(p, staging)) for p in staged])
    manifest = [FileSystems.join(staging, MANIFEST_FILE)]
    move_files(manifest, [FileSystems.join(out_dir, MANIFEST_FILE)])
    remove_folder(staging)


def publish(staging: str, out_dir: str) -> None:
    """Replace the run in ``out_dir`` (if any) by the finished run in ``staging``."""
    _mark(staging, _PUBLISHING)
    _move_staged(staging, out_dir)


def prepare_out(out_dir: str, force: bool = False) -> str:
    """Check that ``out_dir`` may receive a run and return the (empty) staging folder in it.

    A run killed while it was being moved into place is finished first; what an unfinished run
    left is removed. A folder with files of its own and no run manifest is refused (they could be
    lost) unless ``force``.
    """
    staging = FileSystems.join(out_dir, STAGING_DIR)
    if FileSystems.exists(FileSystems.join(staging, _PUBLISHING)):
        _move_staged(staging, out_dir)
    remove_folder(staging)
    # Older versions built the run in place and left this folder when interrupted.
    remove_folder(FileSystems.join(out_dir, WORK_DIR))
    if not force:
        manifest = FileSystems.join(out_dir, MANIFEST_FILE)
        if FileSystems.exists(manifest):
            read_manifest(manifest)  # a damaged one raises, naming the file and --force
        else:
            foreign = sorted(_entries(out_dir) - _LEFTOVERS)
            if foreign:
                raise NotARunFolder(
                    f"{out_dir} is not a groundforge run folder (it has no {MANIFEST_FILE}) but "
                    f"holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}; a run "
                    f"would replace its {', '.join(RUN_ENTRIES[1:])}. Give a new or empty --out, "
                    "or add --force to write into it anyway"
                )
    return staging


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
    force: bool = False,
    selection: Selection | None = None,
):
    """Run ``recipe`` into ``out_dir`` and return the manifest and funnel.

    The run is built in ``out_dir/_staging`` and replaces a previous run in ``out_dir`` only
    once it has finished: a run that fails or is interrupted leaves the previous one intact. The
    reply cache, ``out_dir/cache``, is shared by every run into ``out_dir``. A folder that is not
    a run is refused unless ``force`` (see :func:`prepare_out`); models and endpoints are checked
    before any work (see :mod:`groundforge.pipelines.preflight`). With ``selection`` only the
    source items it chooses are read, and the manifest's ``selection`` says so.

    ``progress``, when given, receives every half second the live counts of every stage
    (``{"stage", "in", "kept", "dropped"}`` dicts, in stage order) on local runners; a stage fed
    by a model also has ``model``, its requests so far (see
    :func:`groundforge.pipelines.progress.read_progress`).

    ``out_dir`` is any ``FileSystems`` path; the filesystem options in ``beam_args``
    (``--s3_endpoint_url``, ``--s3_access_key_id``, ...) reach the workers through the pipeline
    and every file this process reads or writes before and after it.
    """
    check_api_keys(recipe)
    check_beam_args(beam_args)
    options = pipeline_options(beam_args)
    harness = options.view_as(WorkerOptions)
    beam_level = logging.getLogger("apache_beam").getEffectiveLevel()
    if harness.default_sdk_harness_log_level is None and shows_progress(options):
        # Local worker processes log as this process logs Beam (the CLI: quiet unless -v), or
        # each repeats the traceback of the one error the run reports. Remote workers keep their
        # own logs: they are where a cluster's problems are read.
        harness.default_sdk_harness_log_level = logging.getLevelName(beam_level)
    # What worker subprocesses print before they read that level goes to a file unless Beam's
    # logs are wanted (the CLI's -v).
    quiet_workers = is_multi_process(options) and beam_level > logging.INFO
    # beam.Pipeline() sets these too, but only once it is built: the folder is checked first.
    FileSystems.set_options(options)
    staging = prepare_out(out_dir, force)
    preflight(recipe)
    started = time.perf_counter()
    watched = progress is not None and shows_progress(options)
    progress_dir = tempfile.mkdtemp(prefix="groundforge-progress-") if watched else None
    budget = None
    if recipe.budget is not None:
        from groundforge.annotators.teacher.budget import Budget

        # A local folder: the workers of a local runner share it; a remote worker makes its own.
        budget = Budget(tempfile.mkdtemp(prefix="groundforge-budget-"), recipe.budget.limits())
    try:
        workers = worker_stderr_to_file() if quiet_workers else contextlib.nullcontext()
        with _interrupts_noted(recipe, out_dir, staging), workers:
            return _run_staged(
                recipe,
                out_dir,
                staging,
                options,
                beam_args,
                progress_dir,
                progress,
                started,
                selection,
                budget,
            )
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
        if budget is not None:
            shutil.rmtree(budget.folder, ignore_errors=True)
        # Unless it is being published: a failed or interrupted run leaves nothing behind.
        if not FileSystems.exists(FileSystems.join(staging, _PUBLISHING)):
            remove_folder(staging)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what state ``--out`` is in."""


@contextlib.contextmanager
def _interrupts_noted(recipe: Recipe, out_dir: str, staging: str):
    """Turn Ctrl-C into :class:`RunInterrupted`, also where Beam has turned the
    ``KeyboardInterrupt`` raised inside a step into a ``RuntimeError``."""
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    watch = threading.current_thread() is threading.main_thread() and callable(previous)
    if watch:

        def note(signum, frame):
            pressed.append(signum)
            previous(signum, frame)

        signal.signal(signal.SIGINT, note)
    try:
        yield
    except BaseException as err:
        if not (isinstance(err, KeyboardInterrupt) or pressed):
            raise
        if FileSystems.exists(FileSystems.join(staging, _PUBLISHING)):
            state = (
                f"the finished run is half moved into {out_dir}; the next run into it completes it"
            )
        else:
            state = f"{out_dir} is as it was before this run"
        if any(getattr(recipe, role) for role in ("grounder", "teacher", "student")):
            state += (
                f"; the replies received so far are kept in {FileSystems.join(out_dir, CACHE_DIR)}"
            )
        raise RunInterrupted(state) from None
    finally:
        if watch:
            signal.signal(signal.SIGINT, previous)


def _run_staged(
    recipe, out_dir, staging, options, beam_args, progress_dir, progress, started, selection, budget
) -> RunResult:
    """Build the run in ``staging``, then publish it to ``out_dir``."""
    # Several worker processes on a few cores oversubscribe torch's thread pool badly.
    graph = KVGGraph(
        recipe,
        staging,
        model_threads=1 if is_multi_process(options) else None,
        progress_dir=progress_dir,
        cache_dir=FileSystems.join(out_dir, CACHE_DIR),
        selection=selection,
        budget=budget,
    )
    pipeline = beam.Pipeline(options=options)
    graph.build(pipeline)
    watcher = (
        ProgressWatcher(progress_dir, graph.stages, progress, feeders=graph.feeders)
        if progress_dir
        else contextlib.nullcontext()
    )
    with watcher:
        result = pipeline.run()
        result.wait_until_finish()
    finished = _finish(recipe, staging, options, beam_args, graph, result, started, selection)
    if finished.funnel and finished.funnel[0].total == 0:
        chosen = f" chosen by {selection.describe()}" if selection else ""
        raise EmptySource(
            f"the source ({describe_source(recipe)}) gave no items{chosen}, so nothing was "
            f"written to {out_dir}; check the source's path and filters"
        )
    publish(staging, out_dir)
    return RunResult(out_dir, finished.manifest, finished.funnel)


@dataclass
class DryRun:
    """What a run would do: its source's items per partition, how many a selection keeps, the
    graph's stages in order, and the pre-flight's problems (``None`` when there are none)."""

    source: str
    per_partition: list[int]
    selected: int | None
    stages: list[str]
    problems: str | None

    @property
    def items(self) -> int:
        return sum(self.per_partition)


def dry_run(
    recipe: Recipe, beam_args: list[str] | tuple[str, ...] = (), selection: Selection | None = None
) -> DryRun:
    """Check ``recipe`` as a run would, without starting a pipeline or writing into its
    output folder: list the source on this machine (every item, none read), run the pre-flight,
    and build the graph to name its stages."""
    check_api_keys(recipe)
    check_beam_args(beam_args)
    options = pipeline_options(beam_args)
    FileSystems.set_options(options)
    source = make_source(recipe)
    per_partition: list[int] = []

    def listed():
        for part in source.partitions():
            n = 0
            for item in source.items(part):
                n += 1
                yield item
            per_partition.append(n)

    if selection is None:
        selected = None
        for _ in listed():
            pass
    else:
        selected = count_selected(listed(), selection)
    try:
        preflight(recipe)
        problems = None
    except PreflightError as err:
        problems = str(err)
    # Building writes nothing, but any path it names points into a folder removed at once.
    scratch = tempfile.mkdtemp(prefix="groundforge-dry-run-")
    try:
        graph = KVGGraph(recipe, scratch, selection=selection)
        graph.build(beam.Pipeline(options=options))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return DryRun(describe_source(recipe), per_partition, selected, graph.stages, problems)


def budget_section(budget, shared: bool) -> dict[str, Any]:
    """The manifest's ``budget``: limits, spent, refused, overshoot; on a remote runner only the
    limits (each worker process kept its own ledger there)."""
    if not shared:
        return {
            "limits": budget.limits.as_dict(),
            "enforced": "per worker process (remote runner): the totals are not known here",
        }
    return {**budget.summary(), "enforced": "for the whole run (local runner)"}


def describe_source(recipe: Recipe) -> str:
    """Where a recipe's items come from, as a person would name it."""
    src = recipe.source
    where = getattr(src, "path", None) or getattr(src, "annotations", "")
    return f"{src.kind} {where}"


def _finish(recipe, out_dir, options, beam_args, graph, result, started, selection) -> RunResult:
    """After the pipeline: complete the shards and tables, check the funnel, write the
    manifest, card and report."""
    stages = graph.stages
    timing = {
        "wall_seconds": round(time.perf_counter() - started, 3),
        "stage_seconds": read_stage_seconds(result, stages),
    }

    funnel = read_funnel(result, stages)
    models = {
        **read_chat_counts(result, graph.chat_roles),
        **read_model_counts(result, graph.model_stages),
    }
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

    cost = cost_section(models, graph.prices, written)
    for stage, priced in cost["stages"].items():
        models[stage]["cost"] = priced["cost"]
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
        cost=cost,
        timing=timing,
        provenance=read_provenance(result),
        aliases=read_aliases(result),
        instances=read_instances(result) if "instances" in stages else None,
    )
    if selection is not None:
        manifest["selection"] = selection.to_dict()
    if graph.budget is not None:
        manifest["budget"] = budget_section(graph.budget, shows_progress(options))
    write_manifest(FileSystems.join(out_dir, MANIFEST_FILE), manifest)
    write_text(FileSystems.join(out_dir, CARD_FILE), render_card(manifest))
    # datasets.load_dataset reads the card of the folder it is given: the shards folder too.
    write_text(FileSystems.join(out_dir, SHARDS_DIR, CARD_FILE), render_shards_card(manifest))
    write_report(out_dir)
    return RunResult(out_dir, manifest, funnel)
