"""How many entities a scene holds and which layout it uses, drawn from recipe weights.

Weights are relative (they need not sum to 1). Keys are visited in sorted order, so the same
rng state gives the same draw whatever order the mapping was written in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from groundforge.scenes.layout import LAYOUTS


def _uniform_k() -> Mapping[int, float]:
    return {k: 1.0 for k in range(2, 7)}


def _uniform_layouts() -> Mapping[str, float]:
    return {layout: 1.0 for layout in LAYOUTS}


@dataclass(frozen=True)
class SceneMix:
    """Weights over entity counts ``k`` (each at least 2) and over :data:`LAYOUTS`.

    The defaults are uniform over k = 2..6 and over the four layouts.

    >>> mix = SceneMix(k_weights={2: 0.7, 6: 0.3}, layout_weights={"grid": 1.0})
    >>> rng = random.Random(0)
    >>> mix.draw_k(rng) in (2, 6), mix.draw_layout(rng)
    (True, 'grid')
    """

    k_weights: Mapping[int, float] = field(default_factory=_uniform_k)
    layout_weights: Mapping[str, float] = field(default_factory=_uniform_layouts)

    def __post_init__(self) -> None:
        for k in self.k_weights:
            if isinstance(k, bool) or not isinstance(k, int) or k < 2:
                raise ValueError(f"k_weights: every k must be an int of at least 2, got {k!r}")
        unknown = sorted(set(self.layout_weights) - set(LAYOUTS))
        if unknown:
            raise ValueError(f"layout_weights: unknown layouts {unknown}; use {', '.join(LAYOUTS)}")
        _check_weights("k_weights", self.k_weights)
        _check_weights("layout_weights", self.layout_weights)
        # Read-only copies: a caller changing its dict later must not change the mix.
        object.__setattr__(self, "k_weights", MappingProxyType(dict(self.k_weights)))
        object.__setattr__(self, "layout_weights", MappingProxyType(dict(self.layout_weights)))

    def draw_k(self, rng: random.Random) -> int:
        """One entity count, with probability proportional to its weight."""
        return _draw(self.k_weights, rng)

    def draw_layout(self, rng: random.Random) -> str:
        """One layout name, with probability proportional to its weight."""
        return _draw(self.layout_weights, rng)


def _check_weights(name: str, weights: Mapping) -> None:
    for key, weight in weights.items():
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name}: weight of {key!r} must be finite and >= 0, got {weight!r}")
    if not any(weight > 0 for weight in weights.values()):
        raise ValueError(f"{name}: at least one weight must be above 0, got {dict(weights)}")


def _draw(weights: Mapping, rng: random.Random):
    keys = sorted(weights)
    return rng.choices(keys, weights=[weights[key] for key in keys])[0]
