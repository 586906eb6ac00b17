"""The ``groundforge`` command. Heavy libraries load inside each command, so ``--help`` is fast."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

import click

from groundforge import __version__
from groundforge.cliparams import (
    VERBOSE_HELP,
    Command,
    aliased_option,
    configure_logging,
    run_dir_argument,
)

DEMO_OUT = "runs/demo"


def _selection(limit: int | None, sample: float | None):
    """The --limit/--sample choice, or None for every item."""
    if limit is None and sample is None:
        return None
    from groundforge.pipelines.selection import Selection

    try:
        return Selection(limit=limit, sample=sample)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def _selection_options(func):
    func = click.option(
        "--dry-run",
        is_flag=True,
        help="Check the recipe, list its source, run the pre-flight checks and print the "
        "pipeline's stages, then exit (0, or 1 with the problems) without running Beam or "
        "writing anything.",
    )(func)
    func = click.option(
        "--sample",
        type=float,
        metavar="FRACTION",
        help="Read only about this fraction of the source items (0 < FRACTION <= 1), the same "
        "ones every time.",
    )(func)
    return click.option(
        "--limit",
        type=int,
        metavar="N",
        help="Read only N source items, the same N every time, on every runner (chosen by a "
        "stable hash of each item's id).",
    )(func)


def _dry_run(recipe_path: Path | None, recipe, out: str, beam_args, selection) -> None:
    from groundforge.pipelines.run import dry_run

    where = f" ({recipe_path})" if recipe_path else ""
    click.echo(f"recipe {recipe.name}{where}: valid")
    report = dry_run(recipe, beam_args, selection)
    counts = report.per_partition
    spread = f", {min(counts)} to {max(counts)} per partition" if counts else ""
    click.echo(
        f"source {report.source}: {report.items} items in {len(counts)} "
        f"partition{'' if len(counts) == 1 else 's'}{spread}"
    )
    if selection is not None:
        click.echo(f"selected: {report.selected} items ({selection.describe()})")
    click.echo("stages: " + " -> ".join(report.stages))
    if report.problems:
        raise click.ClickException(report.problems)
    click.echo(f"pre-flight: models and endpoints answer; nothing was written to {out}")


def _run(
    recipe_path: Path | None,
    recipe,
    out: str,
    beam_args: tuple[str, ...],
    force: bool = False,
    selection=None,
) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner

    from groundforge.outputs.console import live_view, print_funnel
    from groundforge.pipelines.run import run_recipe
    from groundforge.pipelines.staging import check_submitter, stage_for_workers

    console = Console(stderr=True)
    where = f" from {recipe_path}" if recipe_path else ""
    title = f"running {recipe.name}{where} -> {out}"
    check_submitter(beam_args, out)
    if selection is not None:
        console.print(f"[bold]limited run[/]: {selection.describe()}")
    # Remote workers get groundforge's wheel and pinned requirements; local runs stage nothing.
    with stage_for_workers(beam_args) as staging:
        if staging.note:
            console.print(staging.note)
        started = time.monotonic()
        with Live(Spinner("dots", title), console=console, transient=True) as live:

            def show(stages: list[dict]) -> None:
                elapsed = time.monotonic() - started
                live.update(live_view(stages, f"{title} ({elapsed:.0f} s)"))

            result = run_recipe(
                recipe, out, staging.args, progress=show, force=force, selection=selection
            )
    print_funnel(result.manifest, console)
    if selection is not None:
        console.print(f"limited run ({selection.describe()}): not the whole source")
    console.print(
        f"[bold]{result.manifest['samples']}[/] samples in {out}/shards "
        f"({', '.join(f'{k}: {v}' for k, v in result.manifest['splits'].items())}); "
        f"{result.manifest['rejections']['rows']} rejections in {out}/rejections.parquet"
    )
    console.print(f"report: {out.rstrip('/')}/report.html")
    if not result.manifest["samples"]:
        console.print(
            "[bold yellow]no sample was kept[/]: every item was dropped at the stages above; "
            "report.html shows examples of each reason"
        )
        # The run is written, so its rejections can be read; but it made no data.
        raise SystemExit(1)


# Beam re-raises an error of a worker with the worker's traceback in its message.
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def error_text(err: BaseException) -> str:
    """``err``'s message without the tracebacks runners put into it: the innermost exception's
    own line, and the Beam step it happened in when the message names one."""
    text = str(err) or type(err).__name__
    if _TRACEBACK not in text:
        return text
    lines = text.splitlines()
    found = [m for line in lines if (m := _EXCEPTION_LINE.match(line.strip()))]
    step = re.findall(r"\[while running '([^']+)'\]", text)
    message = f"{found[-1].group(1)}: {found[-1].group(2)}" if found else lines[-1].strip()
    message = re.sub(r" \[while running '[^']+'\]", "", message)
    return message + (f" (in step {step[-1]!r})" if step else "")


class _Group(click.Group):
    command_class = Command
    group_class = type

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            # Ctrl-C: say what was kept (a run's message does), exit as the shell expects.
            click.echo(f"interrupted: {stop}" if str(stop) else "interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            # Errors name the file or field and the fix; a traceback only helps with -v.
            if ctx.meta.get("verbose"):
                raise
            raise click.ClickException(error_text(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="groundforge")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Build training data for knowledge-intensive visual grounding.

    Beam pipelines read fine-grained category images, find the box of each entity, and write
    Arrow shards that `datasets.load_from_disk` opens, with a manifest, a rejections table and a
    dataset card.
    """
    ctx.meta["verbose"] = verbose
    configure_logging(verbose)


_BEAM_ARGS = {"ignore_unknown_options": True}


@main.command(context_settings=_BEAM_ARGS)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--force",
    is_flag=True,
    help="Write into --out even if it is a folder of other files (its README.md, report.html, "
    "shards/ ... are replaced).",
)
@click.option(
    "--budget",
    "budget",
    multiple=True,
    metavar="LIMIT=VALUE",
    help="Stop sending chat requests once a limit is reached: max_requests=N, max_tokens=N or "
    "max_cost=X (needs token prices); repeatable; replaces the recipe's budget limit of that "
    "name. The items still waiting are dropped as <role>_over_budget; a rerun with a larger "
    "budget continues from the reply cache.",
)
@_selection_options
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def run(
    recipe: Path,
    out: str,
    force: bool,
    budget: tuple[str, ...],
    limit: int | None,
    sample: float | None,
    dry_run: bool,
    beam_args: tuple[str, ...],
) -> None:
    """Run RECIPE (a YAML file) and write shards, manifest and rejections to --out.

    The run is built in --out/_staging and replaces a previous run in --out only once it has
    finished: a run that fails or is interrupted (Ctrl-C exits 130) leaves the previous run as it
    was. Chat replies are cached in --out/cache, so a rerun only asks for what is missing. Model
    folders and endpoints are checked before any work.

    Try a recipe on a few items first, or check it without running anything:

        groundforge run examples/flags.yaml --out runs/try --limit 20

        groundforge run examples/flags.yaml --out runs/try --sample 0.1

        groundforge run examples/flags.yaml --out runs/try --dry-run

    --limit and --sample choose items by a stable hash of their ids: the same items every time,
    on every runner; the others are not read, and the manifest's `selection` records the choice.
    --dry-run lists the source (and how many items --limit/--sample keep), checks models and
    endpoints, prints the stages, and exits without starting Beam or writing to --out.

    Anything after `--` goes to Beam, e.g.

        groundforge run flags.yaml --out runs/flags -- --direct_running_mode=multi_processing
        --direct_num_workers=2

    or `--runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK`, or the
    Dataflow/Flink/Spark runner options. Remote workers get groundforge's wheel and pinned
    requirements, unless the options name a worker image or your own --extra_package.
    """
    from groundforge.recipe import RecipeError, load_recipe, with_budget

    selection = _selection(limit, sample)
    loaded = load_recipe(recipe)
    if budget:
        try:
            loaded = with_budget(loaded, budget)
        except RecipeError as err:
            raise click.BadParameter(str(err), param_hint="--budget") from None
    if dry_run:
        _dry_run(recipe, loaded, out, beam_args, selection)
        return
    _run(recipe, loaded, out, beam_args, force, selection)


@main.command(context_settings=_BEAM_ARGS)
@click.option(
    "--out",
    default=DEMO_OUT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder.",
)
@_selection_options
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def demo(
    out: str,
    limit: int | None,
    sample: float | None,
    dry_run: bool,
    beam_args: tuple[str, ...],
) -> None:
    """Run the bundled flags recipe offline (about 350 public-domain flag images).

    No model is needed: boxes come from the foreground of each image. `groundforge demo
    --limit 20` runs it on 20 of them (see `groundforge run --help`).
    """
    from groundforge.examples import demo_recipe_path
    from groundforge.recipe import load_recipe

    path = demo_recipe_path()
    selection = _selection(limit, sample)
    if dry_run:
        _dry_run(path, load_recipe(path), out, beam_args, selection)
        return
    _run(path, load_recipe(path), out, beam_args, selection=selection)


@main.command("serve-teacher")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda:0).")
def serve_teacher(model: str, host: str, port: int, device: str) -> None:
    """Serve a local MLLM folder over the OpenAI chat API (``transformers serve``).

    For CPU use and tests. Qwen2-VL, Qwen2.5-VL and Qwen3-VL folders (a hub download's stock
    processor config included) get an image-only processor that needs no torchvision; at startup
    one request with an image must cost more prompt tokens than its text alone, else the command
    exits 1 rather than serve the model text-only. Point a recipe's `teacher.base_url` at
    http://HOST:PORT/v1 and `teacher.model` at MODEL. On GPUs use vLLM in its own environment
    instead: `vllm serve MODEL`.
    """
    _require(("fastapi", "uvicorn", "openai"), "serve-teacher", "serve")
    from groundforge.annotators.teacher.serve import ServeError, run_server

    click.echo(f"loading {model} for http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    try:
        run_server(model, host, port, device)
    except ServeError as exc:
        raise click.ClickException(str(exc)) from None


def _run_folder(run_dir: str, beam_args: tuple[str, ...]) -> str:
    """``run_dir``, with the filesystem options of ``beam_args`` set for every file read or
    written (``--s3_endpoint_url=...`` and the like, for a run folder in a bucket)."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import is_local
    from groundforge.pipelines.options import pipeline_options

    FileSystems.set_options(pipeline_options(beam_args))
    if is_local(run_dir) and not os.path.isdir(run_dir):
        what = "is a file" if os.path.exists(run_dir) else "does not exist"
        raise click.BadParameter(f"{run_dir} {what}; give a run folder", param_hint="RUN_DIR")
    return run_dir


@main.command(context_settings=_BEAM_ARGS)
@click.argument("run_dir")
@click.option("--out", help="Where to write (RUN_DIR/report.html); a path or a bucket URI.")
@click.option(
    "--per-group",
    default=12,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples shown per domain and split.",
)
@click.option(
    "--thumb",
    default=320,
    show_default=True,
    type=click.IntRange(min=16),
    help="Longest side of a thumbnail, in pixels.",
)
@click.option("--no-verify", is_flag=True, help="Skip checking the shards' sha256.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def report(
    run_dir: str,
    out: str | None,
    per_group: int,
    thumb: int,
    no_verify: bool,
    beam_args: tuple[str, ...],
) -> None:
    """Write a run folder's report: one self-contained HTML file (no network needed).

    Funnel, a gallery of samples with their boxes, dropped examples by reason, distributions and
    filters. Runs write it themselves; use this to redo it with other settings. The shards are
    checked against the manifest first (a missing or damaged file is an error naming it). RUN_DIR
    may be in a bucket; Beam's filesystem options go after `--`, e.g.
    `-- --s3_endpoint_url=http://127.0.0.1:9000`.
    """
    from groundforge.outputs.manifest import check_run
    from groundforge.outputs.report import write_report

    run_dir = _run_folder(run_dir, beam_args)
    # A report of a damaged run would look like a report of a small one.
    check_run(run_dir, verify=not no_verify)
    click.echo(write_report(run_dir, out, per_group=per_group, thumb=thumb))


@main.command(context_settings=_BEAM_ARGS)
@click.argument("run_dir")
@click.option("-n", "--samples", default=5, show_default=True, help="Samples to show.")
@click.option("--no-verify", is_flag=True, help="Skip checking the shards' sha256.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def inspect(run_dir: str, samples: int, no_verify: bool, beam_args: tuple[str, ...]) -> None:
    """Show a run folder: its stage funnel, shards (checksums verified) and a few samples.

    A folder that is not a complete run (no or a damaged manifest, a missing or damaged shard)
    is an error naming the file.

    RUN_DIR may be in a bucket; Beam's filesystem options go after `--` as for `report`.
    """
    from rich.console import Console

    from groundforge.outputs.console import inspect_run
    from groundforge.outputs.manifest import check_run

    run_dir = _run_folder(run_dir, beam_args)
    check_run(run_dir, contents=False)  # the checksums are shown in the table below
    if not inspect_run(run_dir, Console(), samples=samples, verify=not no_verify):
        check_run(run_dir)  # raises, naming the first damaged file
        raise click.ClickException(f"the shards of {run_dir} changed while they were read")


# -- training, evaluation, export -----------------------------------------------------------


def _overrides(settings: tuple[str, ...]) -> dict:
    """``--set sft.max_steps=2`` options as config overrides (values read as YAML, but a string
    field keeps ``no``/``yes``/``on``/``off`` and numbers as written)."""
    import yaml

    from groundforge.trainer.config import parse_override

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected FIELD=VALUE, e.g. sft.max_steps=2")
        try:
            overrides[key.strip()] = parse_override(key.strip(), value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{item!r}: the value is not YAML ({exc})") from None
    return overrides


def _train_options(func):
    options = [
        run_dir_argument("data", "--data"),
        click.option("--model", required=True, help="Model folder or hub id to start from."),
        click.option(
            "--config",
            "config_path",
            type=click.Path(exists=True, dir_okay=False),
            help="train.yaml (defaults: the 7B-class recipe, see the README).",
        ),
        aliased_option(
            "--out",
            "output",
            aliases=("--output",),
            help="Output folder (default: the config's output_dir).",
        ),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in it."),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="FIELD=VALUE",
            help="Override one config field, e.g. --set sft.max_steps=2 or "
            "--set sft.save_strategy=no (repeatable; read as the field's type).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_TRAINING = ("trl", "peft", "accelerate")


def _require(modules: tuple[str, ...], what: str, extra: str) -> None:
    """Stop with the one command that installs what ``what`` needs, when a module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"{what} needs {', '.join(missing)}: pip install 'groundforge[{extra}]' "
            f"(in this clone: .venv/bin/pip install -e '.[{extra}]')"
        )


@main.group()
def train() -> None:
    """Train on the shards with TRL: `sft` (CoT-SFT), then `grpo` from the SFT output."""


@train.command("sft")
@_train_options
def train_sft(data, model, config_path, output, resume, settings) -> None:
    """Stage 1: supervised fine-tuning on the `sft` split (rationale, then answer box).

    RUN_DIR is a run folder or its shards/ folder.
    """
    _require(_TRAINING, "training", "train")
    from groundforge.trainer.config import load_train_config
    from groundforge.trainer.data import open_shards, rationale_count, select_split
    from groundforge.trainer.sft import run_sft

    overrides = _overrides(settings)
    split = load_train_config(config_path, overrides).sft.split
    dataset = select_split(open_shards(data), split)
    with_rationale = rationale_count(dataset)
    click.echo(
        f"SFT targets: {with_rationale} of {len(dataset)} samples of split {split!r} have a "
        "teacher rationale and train as <think>rationale</think><answer>box</answer> after the "
        "reasoning instruction; the others train as the bare box after the bare question"
    )
    with _interruptible():
        out = run_sft(data, model, config_path, output, overrides, resume)
    click.echo(f"model and processor saved to {out} (training log: {out}/train_log.jsonl)")


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C during training: say where the checkpoint is and exit 130, without a traceback."""
    from groundforge.trainer.interrupt import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stopped:
        click.echo(f"interrupted: {stopped}", err=True)
        raise SystemExit(130) from None


def _grpo_answer_format(data, config_path, overrides: dict) -> dict:
    """Say which answer format GRPO trains (decided from the data, as its prompts are) and
    return the overrides, with rewards that read a bare box when the corpus has no rationales."""
    from groundforge.trainer.config import load_train_config
    from groundforge.trainer.data import grpo_split, rationale_count
    from groundforge.trainer.grpo import reward_spec
    from groundforge.trainer.rewards import bare_answer_spec

    stage = load_train_config(config_path, overrides).grpo
    dataset = grpo_split(data, stage.split, stage.fallback_split)
    spec = reward_spec(stage.rewards)
    with_rationale = rationale_count(dataset)
    if with_rationale:
        click.echo(
            f"GRPO answer format: reasoning ({with_rationale} of {len(dataset)} samples have a "
            "teacher rationale, so SFT taught <think>..</think><answer>..</answer>); prompts "
            f"carry the reasoning instruction; rewards: {', '.join(spec)}"
        )
        return overrides
    try:
        bare = bare_answer_spec(spec)
    except ValueError as err:
        raise click.ClickException(
            f"GRPO answer format: bare box (no sample has a teacher rationale, so SFT taught "
            f"the bare box), but {err}. Give grpo.rewards that read a box (e.g. iou_giou, "
            "parsable_box), or build the corpus with a `teacher` section for rationales."
        ) from None
    left_out = [name for name in spec if name not in bare]
    click.echo(
        f"GRPO answer format: bare box (none of the {len(dataset)} samples has a teacher "
        "rationale, so SFT taught the bare box); prompts carry no think/answer instruction and "
        f"the rewards read the whole reply: {', '.join(bare)}"
        + (f" (left out: {', '.join(left_out)})" if left_out else "")
        + ". For the think/answer format, build the corpus with a `teacher` section."
    )
    return {**overrides, "grpo.rewards": bare}


@train.command("grpo")
@_train_options
@click.option(
    "--knowledge",
    type=click.Path(exists=True, dir_okay=False),
    help="Knowledge map from `groundforge knowledge probe` (read by the karl_iou reward).",
)
def train_grpo(data, model, config_path, output, resume, settings, knowledge) -> None:
    """Stage 2: GRPO with rule-based rewards on the `grpo` split (else `sft`).

    RUN_DIR is a run folder or its shards/ folder; --model is normally the `train sft` output
    folder.
    """
    _require(_TRAINING, "training", "train")
    from groundforge.trainer.grpo import run_grpo

    overrides = _grpo_answer_format(data, config_path, _overrides(settings))
    with _interruptible():
        out = run_grpo(data, model, config_path, output, knowledge, overrides, resume)
    click.echo(f"model and processor saved to {out} (training log: {out}/train_log.jsonl)")


def _model_options(func):
    options = [
        click.option("--model", help="Model folder or hub id, run in this process."),
        click.option("--endpoint", help="OpenAI-compatible base URL, e.g. http://HOST:8000/v1."),
        click.option("--served-model", help="The model name the endpoint answers to."),
        click.option(
            "--api-key-env",
            metavar="VAR",
            help="Environment variable that holds the endpoint's API key.",
        ),
        click.option(
            "--device", default="cpu", show_default=True, help="torch device for --model."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _one_model(model: str | None, endpoint: str | None) -> None:
    if (model is None) == (endpoint is None):
        raise click.UsageError("give exactly one of --model and --endpoint")


@main.command("eval")
@click.option(
    "--bench",
    type=click.Path(exists=True),
    help="KVG-Bench-format parquet file (or a folder of them).",
)
@run_dir_argument("shards", "--shards", required=False)
@click.option("--split", default="val", show_default=True, help="The split of RUN_DIR.")
@_model_options
@click.option(
    "--scorer",
    type=click.Choice(["kvgbench", "codec"]),
    help="How a reply's box is read. kvgbench: the published KVG-Bench scorer's pattern "
    "cascade, 0..1000 frame (the default for that frame). codec: the project's codec parser for "
    "the codec's frame (last box, put right and clipped; the default for other frames).",
)
@click.option(
    "--codec",
    type=click.Choice(["norm1000", "qwen25vl", "qwen3vl", "norm01", "pixel"]),
    help="The frame of the model's answer boxes. Default: --model's family, as `train` derives "
    "it (qwen2_vl norm1000, qwen2_5_vl qwen25vl, qwen3_vl qwen3vl); norm1000 for --endpoint "
    "or another family.",
)
@click.option(
    "--max-pixels",
    type=int,
    help="Pixel budget of the qwen25vl frame and of an in-process model's processor "
    "(default: the processor's own).",
)
@click.option(
    "--reasoning/--no-reasoning",
    default=False,
    show_default=True,
    help="Ask for <think>...</think><answer>...</answer> replies.",
)
@click.option("--max-tokens", default=256, show_default=True, help="Reply length limit.")
@click.option("--batch-size", default=8, show_default=True, help="Requests per batch.")
@click.option("--limit", type=int, help="Evaluate the first N items only.")
@click.option("--out", type=click.Path(file_okay=False), help="Write metrics and predictions.")
@click.option(
    "--categories",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML or JSON file with seen: [...] and unseen: [...] categories, and optionally "
    "map: {domain or entity: category}. Default: KVG-Bench's split for --bench, the run's "
    "held-out domains (its recipe's split.val_domains) for RUN_DIR.",
)
def eval_(
    bench,
    shards,
    split,
    model,
    endpoint,
    served_model,
    api_key_env,
    device,
    scorer,
    codec,
    max_pixels,
    reasoning,
    max_tokens,
    batch_size,
    limit,
    out,
    categories,
) -> None:
    """Score a model on KVG-Bench (Acc@0.5 and mean IoU per category, seen / unseen / all).

    The box frame (--codec) defaults to the in-process model's family and is printed first;
    the published KVG-Bench scorer reads the 0..1000 frame, the codec scorer the others. Give
    --bench, or RUN_DIR (a run folder or its shards/ folder) to score a split of our own shards;
    `detect` samples get precision, recall, F1 and AP at IoU 0.5. --out writes metrics.json and
    predictions.jsonl (the scorer used is in its config).
    """
    from groundforge.outputs.console import progress_bar
    from groundforge.outputs.shards import detect_format, shards_folder
    from groundforge.trainer.evaluate import format_table, run_eval

    if (bench is None) == (shards is None):
        raise click.UsageError("give exactly one of --bench and RUN_DIR")
    _one_model(model, endpoint)
    fmt = "arrow"
    if shards is not None:
        shards = shards_folder(shards)
        fmt = detect_format(shards)
    with progress_bar("evaluating") as update:
        report = run_eval(
            bench=bench,
            shards=shards,
            split=split,
            model=model,
            endpoint=endpoint,
            served_model=served_model,
            api_key_env=api_key_env,
            scorer=scorer,
            codec=codec,
            max_pixels=max_pixels,
            reasoning=reasoning,
            max_tokens=max_tokens,
            limit=limit,
            out_dir=out,
            batch_size=batch_size,
            shard_format=fmt,
            device=device,
            progress=update,
            on_codec=lambda choice: click.echo(choice.describe()),
            categories=categories,
        )
    click.echo(format_table(report), nl=False)
    if out:
        click.echo(f"metrics.json and predictions.jsonl written to {out}")


@main.group()
def knowledge() -> None:
    """Measure what a model knows about the entities of the shards."""


@knowledge.command("probe")
@run_dir_argument("data", "--data")
@_model_options
@click.option("--out", default="knowledge.json", show_default=True, help="Where to write the map.")
@click.option("--per-entity", default=50, show_default=True, help="Questions per entity (max).")
@click.option("--max-pixels", type=int, help="Pixel budget of an in-process Qwen-VL processor.")
@click.option("--text-model", help="Text embedder for the distractors (folder or hub id).")
@click.option("--cache", "cache_dir", help="Folder that keeps replies, so a rerun asks nothing.")
@click.option("--seed", default=0, show_default=True, help="Which crops and option orders.")
@click.option(
    "--min-questions",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="An entity answered fewer times gets no level (written under `unknown`; the reward "
    "gives it the middle level).",
)
@click.option(
    "--thresholds",
    default="0.7,0.45,0.3,0.1",
    show_default=True,
    help="Lowest accuracy of levels 0 to 3 (strictly decreasing, each in (0, 1]); below the "
    "last is level 4.",
)
def knowledge_probe(
    data,
    model,
    endpoint,
    served_model,
    api_key_env,
    device,
    out,
    per_entity,
    max_pixels,
    text_model,
    cache_dir,
    seed,
    min_questions,
    thresholds,
) -> None:
    """Ask 4-choice questions about each entity's crops in RUN_DIR (a run folder or its shards/
    folder); write the KARL knowledge map to --out.

    Distractors are the most similar entities of the same domain; accuracy per entity gives one
    of five levels, which `train grpo --knowledge` hands to the karl_iou reward.
    """
    from groundforge.outputs.console import progress_bar
    from groundforge.trainer.knowledge import run_probe

    _one_model(model, endpoint)
    with progress_bar("probing") as update:
        result = run_probe(
            data,
            model=model,
            endpoint=endpoint,
            served_model=served_model,
            api_key_env=api_key_env,
            out=out,
            per_entity=per_entity,
            seed=seed,
            device=device,
            max_pixels=max_pixels,
            text_model=text_model,
            cache_dir=cache_dir,
            progress=update,
            min_questions=min_questions,
            thresholds=thresholds,
        )
    click.echo(f"{result.summary()}; written to {out}")


@main.group()
def export() -> None:
    """Write the shards in the formats of other trainers."""


def _export_options(func):
    options = [
        run_dir_argument("data"),
        aliased_option(
            "--out", "dest", aliases=("--to",), required=True, help="Destination folder."
        ),
        click.option(
            "--model",
            help="The model to be trained (folder or hub id): codec and pixel budget as "
            "`train` derives them for it.",
        ),
        click.option(
            "--codec",
            type=click.Choice(["norm1000", "qwen25vl", "qwen3vl", "norm01", "pixel"]),
            help="How answer boxes are written. Default: --model's family, else qwen25vl.",
        ),
        click.option(
            "--max-pixels",
            type=int,
            help="qwen25vl pixel budget; images are resized to it (default: train's 401408 "
            "with --model, else the codec's 1003520).",
        ),
        click.option(
            "--split", "splits", multiple=True, help="Only these splits (repeatable; default all)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _export_codec(model: str | None, codec: str | None, max_pixels: int | None):
    """The export's codec and its parameters, printed with where they came from."""
    from groundforge.outputs.export import choose_export_codec
    from groundforge.trainer.evaluate import codec_line

    try:
        codec, params, source = choose_export_codec(model, codec, max_pixels)
    except ValueError as err:
        raise click.UsageError(f"{err} with --codec") from None
    if max_pixels and codec != "qwen25vl":
        raise click.UsageError(
            f"--max-pixels applies to --codec qwen25vl only, not {codec} ({source})"
        )
    click.echo(codec_line(codec, params, source))
    return codec, params


@export.command("llamafactory")
@_export_options
@click.option(
    "--name",
    default="groundforge",
    show_default=True,
    help="Dataset name prefix: each split is the dataset NAME_<split>.",
)
def export_llamafactory(data, dest, model, codec, max_pixels, splits, name) -> None:
    """One sharegpt dataset per split: NAME_<split>.json, images/ and dataset_info.json.

    Each split gets its own file and dataset_info.json entry, NAME_<split>: put the training
    splits in LLaMA-Factory's `dataset:` and NAME_val in `eval_dataset:`, so val is never
    trained on. RUN_DIR is a run folder or its shards/ folder.
    """
    from groundforge.outputs.export import export_llamafactory as write
    from groundforge.outputs.export import llamafactory_datasets

    codec, params = _export_codec(model, codec, max_pixels)
    paths = write(
        data,
        dest,
        codec=codec,
        codec_params=params,
        splits=list(splits) or None,
        dataset_name=name,
    )
    if not paths:
        raise click.ClickException(f"no samples in {data} for the splits asked for")
    for split, path in paths.items():
        click.echo(f"wrote {path} ({split})")
    click.echo(f"and {Path(dest) / 'dataset_info.json'}; in LLaMA-Factory's config:")
    for key, names in llamafactory_datasets(name, list(paths)).items():
        if names:
            click.echo(f"  {key}: {','.join(names)}")


@export.command("verl")
@_export_options
def export_verl(data, dest, model, codec, max_pixels, splits) -> None:
    """One verl parquet per split; score rollouts with groundforge.outputs.verl_reward.

    RUN_DIR is a run folder or its shards/ folder. Set verl's custom_reward_function.path to
    that module's file and name to compute_score.
    """
    from groundforge.outputs.export import export_verl as write

    codec, params = _export_codec(model, codec, max_pixels)
    folder = write(data, dest, codec=codec, codec_params=params, splits=list(splits) or None)
    files = sorted(p.name for p in Path(folder).glob("*.parquet"))
    click.echo(f"wrote {', '.join(files)} to {folder}")


@main.command(context_settings=_BEAM_ARGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--student",
    required=True,
    help="The model to evaluate: a model folder or hub id (run in this process), or an "
    "OpenAI-compatible base URL (http://HOST:PORT/v1) with --served-model.",
)
@click.option("--served-model", help="The model name the --student endpoint answers to.")
@click.option(
    "--api-key-env", metavar="VAR", help="Environment variable that holds the endpoint's API key."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Where the rounds go: OUT/round-2, OUT/round-3, ... and OUT/refine.json "
    "(default: RUN_DIR-refine).",
)
@click.option("--rounds", default=1, show_default=True, help="Evaluate-then-build rounds to run.")
@click.option(
    "--extra-scenes",
    "budget",
    type=int,
    help="Extra scenes per round, shared among the failed entities by failed items "
    "(default: two per failed item).",
)
@click.option(
    "--split", default="val", show_default=True, help="The split the student is scored on."
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seeds the student's sampling and the new scenes: the same seed gives the same rounds.",
)
@click.option(
    "--codec",
    type=click.Choice(["norm1000", "qwen25vl", "qwen3vl", "norm01", "pixel"]),
    help="The frame of the student's boxes (default: a model's family, norm1000 for an endpoint).",
)
@click.option("--max-tokens", default=256, show_default=True, help="Reply length limit.")
@click.option("--device", default="cpu", show_default=True, help="torch device for a model.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def refine(
    run_dir,
    student,
    served_model,
    api_key_env,
    out,
    rounds,
    budget,
    split,
    seed,
    codec,
    max_tokens,
    device,
    beam_args,
) -> None:
    """Make more data where a student fails: score it on RUN_DIR's split, then build a run
    with extra scenes for the entities it got wrong.

    Each round evaluates the student, gives every failed entity more scenes as the target, with
    the entities the student took it for and its nearest look-alikes as distractors and sizes
    and layouts weighted by its error rates (the recipe's `scenes.focus`), and runs the run's
    recipe with that focus into OUT/round-N, reusing RUN_DIR's reply cache. OUT/refine.json
    holds per round and entity the accuracy before, the samples added and the cost. Options
    after `--` go to Beam.
    """
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner

    from groundforge.outputs.console import funnel_table, print_funnel, progress_bar
    from groundforge.pipelines.run import run_recipe
    from groundforge.trainer.refine import REFINE_FILE, Student, round_table
    from groundforge.trainer.refine import refine as run_refine

    console = Console(stderr=True)

    def run_round(recipe, target: str) -> dict:
        title = f"building {target}"
        with Live(Spinner("dots", title), console=console, transient=True) as live:
            result = run_recipe(
                recipe,
                target,
                list(beam_args),
                progress=lambda stages: live.update(funnel_table(stages, title=title)),
            )
        print_funnel(result.manifest, console)
        return result.manifest

    def show(record: dict) -> None:
        console.print(round_table(record))
        if record["out"] is None:
            console.print(f"the student fails no item of {split}: nothing to add")

    spec = Student(
        student,
        served_model=served_model,
        api_key_env=api_key_env,
        codec=codec,
        max_tokens=max_tokens,
        device=device,
        seed=seed,
    )
    body = run_refine(
        run_dir,
        spec,
        out=out,
        rounds=rounds,
        budget=budget,
        split=split,
        run_round=run_round,
        progress=progress_bar,
        on_round=show,
    )
    if body["crawl"] is not None:
        console.print(
            f"the run's images come from a crawl ({body['crawl']['folder']}); refine fetched no "
            "new images: rerun `groundforge crawl` for the failed entities to add some"
        )
    held_out = sorted(
        {n for r in body["rounds"] for n in r["failed_entities"]} if split == "val" else set()
    )
    if held_out:
        console.print(
            f"{len(held_out)} failed entities are held out ({split}): their new scenes are "
            f"{split} scenes; score the student on --split sft to add training scenes"
        )
    click.echo(f"{body['out']}/{REFINE_FILE}")


def _add_crawl() -> None:
    from groundforge.sources.crawl.cli import crawl

    main.add_command(crawl)


_add_crawl()


if __name__ == "__main__":
    main()
