"""The ``groundforge`` command. Heavy libraries load inside each command, so ``--help`` is fast."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from groundforge import __version__

DEMO_OUT = "runs/demo"


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # Beam logs import-time notes about optional cloud clients on the root logger; they are
    # noise unless asked for.
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("groundforge").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Model loading bars from every worker would bury the progress display; the env var
        # reaches worker processes too.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _run(recipe_path: Path | None, recipe, out: str, beam_args: tuple[str, ...]) -> None:
    from rich.console import Console

    from groundforge.outputs.console import print_funnel
    from groundforge.pipelines.run import run_recipe

    console = Console(stderr=True)
    where = f" from {recipe_path}" if recipe_path else ""
    with console.status(f"running {recipe.name}{where} -> {out}"):
        result = run_recipe(recipe, out, beam_args)
    print_funnel(result.manifest, console)
    console.print(
        f"[bold]{result.manifest['samples']}[/] samples in {out}/shards "
        f"({', '.join(f'{k}: {v}' for k, v in result.manifest['splits'].items())}); "
        f"{result.manifest['rejections']['rows']} rejections in {out}/rejections.parquet"
    )


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, NotADirectoryError) as err:
            # Recipe and input errors name the file and the fix; a traceback adds nothing.
            if ctx.meta.get("verbose"):
                raise
            raise click.ClickException(str(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="groundforge")
@click.option("-v", "--verbose", is_flag=True, help="Show Beam's logs and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Build training data for knowledge-intensive visual grounding.

    Beam pipelines read fine-grained category images, find the box of each entity, and write
    Arrow shards that `datasets.load_from_disk` opens, with a manifest, a rejections table and a
    dataset card.
    """
    ctx.meta["verbose"] = verbose
    _configure_logging(verbose)


_BEAM_ARGS = {"ignore_unknown_options": True}


@main.command(context_settings=_BEAM_ARGS)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def run(recipe: Path, out: str, beam_args: tuple[str, ...]) -> None:
    """Run RECIPE (a YAML file) and write shards, manifest and rejections to --out.

    Anything after `--` goes to Beam, e.g.

        groundforge run flags.yaml --out runs/flags -- --direct_running_mode=multi_processing
        --direct_num_workers=2

    or `--runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK`, or the
    Dataflow/Flink/Spark runner options.
    """
    from groundforge.recipe import load_recipe

    _run(recipe, load_recipe(recipe), out, beam_args)


@main.command(context_settings=_BEAM_ARGS)
@click.option(
    "--out",
    default=DEMO_OUT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder.",
)
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def demo(out: str, beam_args: tuple[str, ...]) -> None:
    """Run the bundled flags recipe offline (about 350 public-domain flag images).

    No model is needed: boxes come from the foreground of each image.
    """
    from groundforge.examples import demo_recipe_path
    from groundforge.recipe import load_recipe

    path = demo_recipe_path()
    _run(path, load_recipe(path), out, beam_args)


@main.command("serve-teacher")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda:0).")
def serve_teacher(model: str, host: str, port: int, device: str) -> None:
    """Serve a local MLLM folder over the OpenAI chat API (``transformers serve``).

    For CPU use and tests: the image-only Qwen-VL processor is registered first, so images reach
    the model. Point a recipe's `teacher.base_url` at http://HOST:PORT/v1 and `teacher.model` at
    MODEL. On GPUs use vLLM in its own environment instead: `vllm serve MODEL`.
    """
    from groundforge.annotators.teacher.serve import run_server

    click.echo(f"serving {model} at http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    run_server(model, host, port, device)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-n", "--samples", default=5, show_default=True, help="Samples to show.")
@click.option("--no-verify", is_flag=True, help="Skip checking the shards' sha256.")
def inspect(run_dir: str, samples: int, no_verify: bool) -> None:
    """Show a run folder: its stage funnel, shards (checksums verified) and a few samples."""
    from rich.console import Console

    from groundforge.outputs.console import inspect_run

    ok = inspect_run(run_dir, Console(), samples=samples, verify=not no_verify)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
