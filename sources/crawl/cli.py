"""``groundforge crawl``: collect the images of a new domain into an image folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from groundforge.cliparams import Command

if TYPE_CHECKING:
    from rich.console import Console

    from groundforge.sources.crawl.run import CrawlSummary


@click.command("crawl", cls=Command)
@click.argument("entities", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Crawl folder."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="At most N URLs per entity (overrides commons.per_entity).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Fetch again the URLs earlier runs gave up on for good (refused, robots.txt, invalid "
    "URL, too large, not an image, ...), e.g. after changing the fetch settings.",
)
def crawl(entities: Path, out: Path, limit: int | None, retry_failed: bool) -> None:
    """Collect images for the entities of ENTITIES (a YAML file) into --out.

    Images come from Wikimedia Commons and/or a URL manifest, fetched politely (robots.txt,
    per-host pacing, an identifying User-Agent) and safely (public hosts only, size and pixel
    limits, real decoding). A rerun resumes: finished URLs are not fetched again, and failed ones
    are retried unless the failure would repeat (see --retry-failed). The folder is ready for a
    recipe's `source: {kind: image_folder, path: OUT}`. With -v (before or after `crawl`),
    every URL that is not stored is logged with its reason.
    """
    from rich.console import Console

    from groundforge.outputs.console import progress_bar
    from groundforge.sources.crawl.run import CrawlBusyError, CrawlInterrupted, run_crawl

    # `groundforge -v crawl` and `groundforge crawl -v` both set it.
    verbose = click.get_current_context().meta.get("verbose", False)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("groundforge").setLevel(logging.INFO if verbose else logging.WARNING)
    console = Console()
    try:
        with progress_bar(f"crawling {entities.name}") as update:
            summary = run_crawl(
                entities, out, progress=update, limit=limit, retry_failed=retry_failed
            )
    except CrawlInterrupted as stop:
        print_summary(stop.summary, console)
        console.print("[yellow]interrupted[/]: run the same command again to resume")
        sys.exit(130)
    except (ValueError, CrawlBusyError) as err:
        # Configuration and manifest errors name the file and the field; a traceback adds nothing.
        if verbose:
            raise
        raise click.ClickException(str(err)) from None
    print_summary(summary, console)


def print_summary(summary: CrawlSummary, console: Console) -> None:
    """The end-of-crawl table and how to use the folder in a recipe."""
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from groundforge.sources.crawl.state import FINAL_REASONS

    table = Table(title="crawl", title_justify="left")
    table.add_column("URLs")
    table.add_column("count", justify="right")
    table.add_column("reasons")
    table.add_row("listed", str(summary.listed), "")
    table.add_row("fetched and stored", str(summary.fetched), "")
    table.add_row("same image as another URL", str(summary.duplicates), "")
    table.add_row("skipped (done before)", str(summary.skipped), "")
    failed = summary.reasons.get("failed", Counter())
    rows = (
        ("disallowed by robots.txt", summary.reasons.get("robots", Counter())),
        ("refused by a safety rule", summary.reasons.get("refused", Counter())),
        (
            "failed for good (--retry-failed)",
            Counter({r: n for r, n in failed.items() if r in FINAL_REASONS}),
        ),
        (
            "failed (retried next run)",
            Counter({r: n for r, n in failed.items() if r not in FINAL_REASONS}),
        ),
    )
    for label, reasons in rows:
        by_count = ", ".join(f"{r} {n}" for r, n in reasons.most_common())
        table.add_row(label, str(reasons.total()), by_count)
    if summary.source_skipped:
        by_count = ", ".join(f"{r} {n}" for r, n in summary.source_skipped.most_common())
        table.add_row("left out when listing", str(summary.source_skipped.total()), by_count)
    console.print(table)
    for error in summary.source_errors:
        console.print(f"[red]listing failed[/]: {escape(error)}")
    out = Path(summary.out_dir).resolve()
    name = summary.domain or "my-domain"
    # Paths are printed without markup: a "[" in a folder name is not a style tag.
    console.print(
        f"{summary.images} images in {Path(summary.images_dir).resolve()}; licences, authors "
        f"and URLs in {Path(summary.metadata_path).resolve()}\n"
        "next, a recipe (see README.md, Recipes):\n"
        f"  name: {name}\n"
        f"  domain: {name}\n"
        f'  source: {{kind: image_folder, path: "{out}", entity_from: parent}}\n'
        f"then: groundforge run RECIPE.yaml --out runs/{name}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
