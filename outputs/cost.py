"""What a run's model calls cost: the recipe's prices applied to each model stage's counts."""

from __future__ import annotations

from typing import Any

_DIGITS = 6


def _per(total: float | None, samples: int) -> float | None:
    return round(total / samples, _DIGITS) if total is not None and samples else None


def cost_section(
    models: dict[str, dict[str, Any]], prices: dict[str, Any], samples: int
) -> dict[str, Any]:
    """Per model stage, in total and per accepted sample: what this run paid.

    ``prices`` maps a stage to its recipe ``price`` (a :class:`groundforge.recipe.PriceConfig`
    or None). Token prices apply to the tokens of the requests sent (a cached reply costs
    nothing); ``gpu_hour`` to the busy seconds of the batches that sent a request. A stage
    without a price has ``cost: null`` and does not count in the total, which is null when no
    stage has a price.
    """
    stages = {}
    for stage, counts in models.items():
        price = prices.get(stage)
        cost = None
        if price is not None:
            cost = round(
                price.cost(counts["prompt_tokens"], counts["completion_tokens"], counts["seconds"]),
                _DIGITS,
            )
        stages[stage] = {
            "price": price.model_dump(exclude_none=True) if price is not None else None,
            "cost": cost,
            "sent": counts["sent"],
            "cached": counts["cached"],
        }
    priced = [s["cost"] for s in stages.values() if s["cost"] is not None]
    total = round(sum(priced), _DIGITS) if priced else None
    return {
        "stages": stages,
        "total": total,
        "samples": samples,
        "per_sample": _per(total, samples),
    }
