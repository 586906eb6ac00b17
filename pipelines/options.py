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
    """Flags no imported Beam options class defines: usually a typo, worth a warning.

    Not an error: a runner may define options in a module that is not imported yet.
    """
    given = options.get_all_options(retain_unknown_options=True, drop_default=True)
    known = set(PipelineOptions([]).get_all_options(drop_default=False))
    return sorted("--" + k for k in given if k not in known)


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
