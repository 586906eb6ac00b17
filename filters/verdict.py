"""The answer every filter gives: keep, or drop with a reason code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """Keep or drop, with a reason code for drops and optional measurements.

    A normalising check (decode, resize, choose a box) keeps a changed record: it returns it as
    ``value`` and the pipeline passes ``value`` on instead of the input.

    >>> Verdict.drop("too_small", width=1).reason
    'too_small'
    >>> Verdict.ok().keep
    True
    """

    keep: bool
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    value: Any = None

    @classmethod
    def ok(cls, value: Any = None, **metrics: Any) -> Verdict:
        return cls(True, None, metrics, value)

    @classmethod
    def drop(cls, reason: str, **metrics: Any) -> Verdict:
        return cls(False, reason, metrics)
