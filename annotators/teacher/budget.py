"""A run's spending limit on chat requests, shared by every worker that sees the same folder.

The ledger is one JSON file guarded by an exclusive ``flock``: before a request is sent,
:meth:`Budget.reserve` counts it, or refuses it once a limit is reached; when its reply arrives,
:meth:`Budget.spend` adds its tokens and, for a model with token prices, its cost. A request
limit is therefore never passed; a token or cost limit is checked before each send, so only the
requests already in flight when it is reached can pass it (the overshoot, recorded). Cached
replies are never sent and cost nothing, so a rerun with a larger budget pays only for what is
missing.

Every worker process on one machine shares the ledger (the DirectRunner in any mode, the portable
runner with a LOOPBACK environment). A remote worker (Dataflow, Flink, Spark) has its own disk,
so there each worker process keeps its own ledger and enforces the whole limit alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from typing import Any

LEDGER = "budget.json"
_EMPTY = {"requests": 0, "tokens": 0, "cost": 0.0, "refused": 0}


@dataclass(frozen=True)
class BudgetLimits:
    """The limits of a run; None is no limit."""

    max_cost: float | None = None
    max_tokens: int | None = None
    max_requests: int | None = None

    def reached(self, spent: dict[str, Any]) -> bool:
        return any(
            limit is not None and spent[name] >= limit
            for name, limit in (
                ("cost", self.max_cost),
                ("tokens", self.max_tokens),
                ("requests", self.max_requests),
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("max_cost", self.max_cost),
                ("max_tokens", self.max_tokens),
                ("max_requests", self.max_requests),
            )
            if v is not None
        }


class Budget:
    """The ledger in ``folder`` (a local path) under ``limits``; picklable."""

    def __init__(self, folder: str, limits: BudgetLimits):
        self.folder, self.limits = folder, limits

    @property
    def path(self) -> str:
        return os.path.join(self.folder, LEDGER)

    @contextlib.contextmanager
    def _ledger(self):
        os.makedirs(self.folder, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            text = fh.read()
            spent = {**_EMPTY, **json.loads(text)} if text else dict(_EMPTY)
            yield spent
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(spent))
            fh.flush()

    def reserve(self) -> bool:
        """Count one request about to be sent; False (and counted as refused) once spent."""
        with self._ledger() as spent:
            if self.limits.reached(spent):
                spent["refused"] += 1
                return False
            spent["requests"] += 1
            return True

    def spend(self, prompt_tokens: int, completion_tokens: int, price=None) -> None:
        """Add what a sent request cost (``price``: the model's recipe price, if any)."""
        with self._ledger() as spent:
            spent["tokens"] += prompt_tokens + completion_tokens
            if price is not None and price.per_token:
                spent["cost"] += price.cost(prompt_tokens, completion_tokens, 0.0)

    def summary(self) -> dict[str, Any]:
        """Limits, what was spent, requests refused, and how far each limit was passed."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                spent = {**_EMPTY, **json.loads(fh.read() or "{}")}
        except FileNotFoundError:
            spent = dict(_EMPTY)
        limits = self.limits.as_dict()
        overshoot = {
            name: max(spent[name] - limit, 0)
            for name, limit in (
                ("cost", self.limits.max_cost),
                ("tokens", self.limits.max_tokens),
                ("requests", self.limits.max_requests),
            )
            if limit is not None
        }
        spent["cost"] = round(spent["cost"], 6)
        if "cost" in overshoot:
            overshoot["cost"] = round(overshoot["cost"], 6)
        return {
            "limits": limits,
            "spent": {k: spent[k] for k in ("requests", "tokens", "cost")},
            "refused": spent["refused"],
            "reached": self.limits.reached(spent),
            "overshoot": overshoot,
        }


@dataclass(frozen=True)
class BudgetGate:
    """What a backend asks before sending a request and tells when its reply arrives."""

    budget: Budget
    price: Any = None

    def reserve(self) -> bool:
        return self.budget.reserve()

    def spend(self, reply) -> None:
        self.budget.spend(reply.prompt_tokens or 0, reply.completion_tokens or 0, self.price)


def over_budget(item_id: str):
    """The reply to a request the budget did not allow (never sent)."""
    from groundforge.annotators.teacher.types import TeacherReply

    return TeacherReply(
        item_id,
        error="over_budget",
        detail="the run's budget was spent before this request; a rerun with a larger budget "
        "sends it (answers already received come from the reply cache)",
    )
