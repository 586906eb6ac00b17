"""What a run folder looks like on a terminal: the funnel, the shards, a few samples."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields the ``callback(done, total)`` that moves it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def funnel_table(
    stages: list[dict[str, Any]],
    seconds: dict[str, float] | None = None,
    title: str = "stage funnel",
) -> Table:
    """In / kept / dropped by reason per stage, and busy seconds when ``seconds`` is given."""
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("in", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("dropped", justify="right")
    if seconds:
        table.add_column("busy s", justify="right")
    table.add_column("reasons")
    for s in stages:
        dropped = sum(s["dropped"].values())
        by_count = sorted(s["dropped"].items(), key=lambda x: -x[1])
        reasons = ", ".join(f"{r} {n}" for r, n in by_count)
        counts = [s["stage"], str(s["in"]), str(s["kept"]), str(dropped)]
        if seconds:
            counts.append(f"{seconds.get(s['stage'], 0.0):.1f}")
        table.add_row(*counts, reasons)
    return table


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def models_table(models: dict[str, dict[str, Any]]) -> Table:
    """Requests per model stage: cache hits, sent, answered, failures, tokens, busy seconds,
    rate and cost (``-`` where the recipe gives no price)."""
    table = Table(title="model requests", title_justify="left")
    columns = (
        "stage",
        "requests",
        "cached",
        "sent",
        "answered",
        "attempts",
        "failed",
        "prompt tok",
        "completion tok",
        "busy s",
        "req/s",
        "cost",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("stage", "failed") else "right")
    for stage, c in models.items():
        failed = ", ".join(f"{k} {n}" for k, n in c["failed"].items()) or "-"
        rate = c.get("requests_per_second")
        table.add_row(
            stage,
            *(str(c.get(k, 0)) for k in ("requests", "cached", "sent", "answered", "attempts")),
            failed,
            str(c.get("prompt_tokens", 0)),
            str(c.get("completion_tokens", 0)),
            f"{c.get('seconds', 0.0):.1f}",
            "-" if rate is None else f"{rate:.1f}",
            _money(c.get("cost")),
        )
    return table


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"~{minutes}m{secs:02d}s" if minutes else f"~{secs}s"


def live_models_table(stages: list[dict[str, Any]]) -> Table | None:
    """The live requests of every model stage in ``stages`` (rows of
    :func:`groundforge.pipelines.progress.read_progress`), or None when no model has started."""
    rows = [(s["stage"], s["model"]) for s in stages if s.get("model")]
    if not rows:
        return None
    table = Table(title="model requests (live)", title_justify="left")
    for col in (
        "stage",
        "sent",
        "answered",
        "failed",
        "in flight",
        "cached",
        "req/s",
        "prompt tok",
        "completion tok",
        "expected",
        "ETA",
    ):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, m in rows:
        in_flight = m["sent"] - m["answered"] - m["failed"]
        expected = m.get("expected")
        table.add_row(
            stage,
            str(m["sent"]),
            str(m["answered"]),
            str(m["failed"]),
            str(max(in_flight, 0)),
            str(m["cached"]),
            f"{m['rate']:.1f}",
            str(m["prompt_tokens"]),
            str(m["completion_tokens"]),
            "?" if expected is None else f"~{expected}",
            _eta(m.get("eta")),
        )
    return table


def budget_line(budget: dict[str, Any] | None) -> str | None:
    """What the run's budget allowed and refused, or None when the recipe has none."""
    if not budget:
        return None
    limits = budget["limits"]
    if "spent" not in budget:
        shown = ", ".join(f"{k} {v}" for k, v in limits.items())
        return f"budget ({shown}): {budget['enforced']}"
    spent = budget["spent"]
    parts = [f"{name[4:]} {spent[name[4:]]} of {limit}" for name, limit in limits.items()]
    text = f"budget: spent {', '.join(parts)}; {budget['refused']} requests not sent (over_budget)"
    over = {k: v for k, v in budget["overshoot"].items() if v}
    if over:
        text += "; in flight when it was reached, beyond it: " + ", ".join(
            f"{k} {v}" for k, v in over.items()
        )
    return text


def live_view(stages: list[dict[str, Any]], title: str):
    """What the run command shows while a run goes on: the funnel, then the model requests."""
    from rich.console import Group

    models = live_models_table(stages)
    funnel = funnel_table(stages, title=title)
    return funnel if models is None else Group(funnel, models)


def cost_line(cost: dict[str, Any]) -> str | None:
    """One line on what the run's model calls cost, or None when the recipe prices none."""
    if not cost or cost.get("total") is None:
        return None
    per = cost.get("per_sample")
    per_text = (
        f"{per:.6f} per accepted sample ({cost['samples']})"
        if per is not None
        else ("no sample accepted")
    )
    return f"model cost: {cost['total']:.4f} in all, {per_text}; cached replies cost nothing"


def print_funnel(manifest: dict[str, Any], console: Console) -> None:
    timing = manifest.get("timing") or {}
    console.print(funnel_table(manifest["stages"], timing.get("stage_seconds")))
    if manifest.get("models"):
        console.print(models_table(manifest["models"]))
    line = cost_line(manifest.get("cost"))
    if line:
        console.print(line)
    line = budget_line(manifest.get("budget"))
    if line:
        console.print(line)
    if "wall_seconds" in timing:
        console.print(
            f"{timing['wall_seconds']:.1f} s in all; busy s = time spent in a stage's work, summed "
            "over workers"
        )


def _box_text(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def inspect_run(run_dir: str, console: Console, samples: int = 5, verify: bool = True) -> bool:
    """Print a run folder's funnel, shards and first samples; False if a checksum mismatches."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import file_sha256
    from groundforge.outputs.manifest import read_manifest
    from groundforge.outputs.shards import read_samples

    manifest_path = FileSystems.join(run_dir, "manifest.json")
    if not FileSystems.exists(manifest_path):
        raise FileNotFoundError(
            f"{manifest_path} does not exist: is {run_dir} the --out folder of a finished run?"
        )
    manifest = read_manifest(manifest_path)
    console.print(
        f"[bold]{manifest['recipe']['name']}[/] (recipe {manifest['recipe_hash']}, groundforge "
        f"{manifest['groundforge_version']}, {manifest['created_at']})"
    )
    print_funnel(manifest, console)

    ok = True
    shards = Table(title="shards", title_justify="left")
    for col in ("split", "file", "rows", "bytes", "sha256"):
        shards.add_column(col, justify="right" if col in ("rows", "bytes") else "left")
    for s in manifest["shards"]:
        status = s["sha256"][:12]
        if verify:
            actual, _ = file_sha256(FileSystems.join(run_dir, s["path"]))
            if actual != s["sha256"]:
                ok = False
                status = f"[red]MISMATCH {actual[:12]}[/]"
            else:
                status += " [green]ok[/]"
        shards.add_row(s["split"], s["path"], str(s["rows"]), str(s["bytes"]), status)
    console.print(shards)
    if not ok:
        return False  # a damaged shard may not even read

    if samples > 0:
        table = Table(title=f"first {samples} samples", title_justify="left")
        for col in ("split", "target", "size", "gt_boxes", "entities", "layout", "box from"):
            table.add_column(col)
        shards_dir = FileSystems.join(run_dir, "shards")
        for i, s in enumerate(read_samples(shards_dir, fmt=manifest["format"])):
            if i >= samples:
                break
            table.add_row(
                s.split,
                s.target,
                f"{s.width}x{s.height}",
                " ".join(_box_text(b.to_list()) for b in s.gt_boxes),
                str(len(s.entities)),
                s.provenance.layout,
                s.box_source,
            )
            question = s.question
        console.print(table)
        if samples and "question" in locals():
            console.print(f"question, e.g.: {question}")
    return ok
