"""Beam pipeline options as the CLI passes them through, and what the manifest records of them."""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)


def pipeline_options(beam_args: list[str] | tuple[str, ...]) -> PipelineOptions:
    """Options from command-line style arguments (``--runner=...``, ``--direct_running_mode``)."""
    return PipelineOptions(list(beam_args))


def unknown_options(options: PipelineOptions) -> list[str]:
    """Flags no Beam options class defines (Beam's own, Dataflow's, Flink's, Spark's, ...)."""
    given = options.get_all_options(retain_unknown_options=True, drop_default=True)
    known = set(PipelineOptions([]).get_all_options(drop_default=False))
    return sorted("--" + k for k in given if k not in known)


# groundforge's own options, given after `--` or after the recipe, where Beam would get them.
_OWN = {
    "-v": "give it before `--` (groundforge run RECIPE --out DIR -v) or before the command",
    "--verbose": "give it before `--` (groundforge run RECIPE --out DIR -v) or before the command",
    "--force": "give it before `--`",
}


def check_beam_args(beam_args: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError naming every argument Beam would ignore: a misspelt option (with the
    nearest one Beam knows), a bare word, or one of groundforge's own options in Beam's place.
    Beam itself only logs "Discarding unparseable args" and runs on with its defaults."""
    import difflib

    problems, rest = [], []
    for i, arg in enumerate(beam_args):
        name = arg.partition("=")[0]
        after_flag = i > 0 and beam_args[i - 1].startswith("--") and "=" not in beam_args[i - 1]
        if name in _OWN:
            problems.append(f"{arg} is groundforge's option, not Beam's: {_OWN[name]}")
        elif not arg.startswith("-") and not after_flag:
            problems.append(f"{arg!r} is not an option (Beam options look like --name=value)")
        else:
            rest.append(arg)
    known = sorted(PipelineOptions([]).get_all_options(drop_default=False))
    for flag in unknown_options(pipeline_options(rest)):
        near = difflib.get_close_matches(flag[2:], known, n=1)
        hint = f"; did you mean --{near[0]}?" if near else ""
        problems.append(f"{flag} is not an option Beam knows{hint}")
    if problems:
        raise ValueError("Beam options: " + "; ".join(problems))


def is_multi_process(options: PipelineOptions) -> bool:
    return options.view_as(DirectOptions).direct_running_mode == "multi_processing"


def describe_runner(
    options: PipelineOptions, beam_args: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """What the manifest records about the runner."""
    direct = options.view_as(DirectOptions)
    return {
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "direct_running_mode": direct.direct_running_mode,
        "direct_num_workers": direct.direct_num_workers,
        "args": list(beam_args),
    }
