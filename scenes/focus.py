"""Extra scenes for the entities a student fails: which images get them, and their look-alikes.

A :class:`Focus` (the recipe's ``scenes.focus``, written by ``groundforge refine``) names
entities and how many scenes each gets *on top of* the pool's usual ones, with that entity as the
only query. An entity's extra scenes are spread over its images in index order (image ``j`` of
``c`` gets ``total // c`` of them, plus one when ``j < total % c``), so the count an entity gets
does not depend on which worker plans which image. Their distractors are the entities the student
took it for, most often first, then its nearest look-alikes (with probability ``hard_fraction``;
otherwise random others), and their sizes and layouts follow the focus's own mix when it has one.

Everything here is a pure function of the focus, the pool's entity table and the rng, and it
holds nothing larger than the focus itself (bounded by the number of entities).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from groundforge.scenes.sampling import SceneMix

if TYPE_CHECKING:
    from groundforge.scenes.plan import EntityTable


@dataclass(frozen=True)
class Focus:
    """Extra scenes per entity (``scenes``), look-alikes to put first (``distractors``), how
    often those scenes use look-alikes (``hard_fraction``), their mix (None: the recipe's) and
    their seed.

    >>> focus = Focus(scenes={"Chad": 5})
    >>> [focus.scenes_for("Chad", j, 2) for j in range(2)], focus.scenes_for("Mali", 0, 1)
    ([3, 2], 0)
    """

    scenes: Mapping[str, int] = field(default_factory=dict)
    distractors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    hard_fraction: float = 1.0
    mix: SceneMix | None = None
    seed: str = "focus"

    def __post_init__(self) -> None:
        bad = {name: n for name, n in self.scenes.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise ValueError(f"focus scenes must be whole numbers >= 0, got {bad}")
        if not 0 <= self.hard_fraction <= 1:
            raise ValueError(f"focus hard_fraction must be in [0, 1], got {self.hard_fraction}")
        # Plain copies: a caller changing its dicts later must not change the focus.
        object.__setattr__(self, "scenes", dict(self.scenes))
        object.__setattr__(self, "distractors", {k: tuple(v) for k, v in self.distractors.items()})

    def scenes_for(self, entity: str, index: int, count: int) -> int:
        """How many extra scenes image ``index`` of the ``count`` images of ``entity`` gets."""
        total = self.scenes.get(entity, 0)
        if total <= 0 or count < 1:
            return 0
        return total // count + (1 if index < total % count else 0)

    def look_alikes(
        self, entity: str, count: int, table: EntityTable, rng: random.Random
    ) -> tuple[list[str], bool]:
        """``count`` distractors for ``entity``: the ones it was taken for (those in this pool),
        then its nearest look-alikes, then random others when the table has no vectors; and
        whether any was chosen for being alike (a ``hard`` scene)."""
        chosen = [
            name for name in self.distractors.get(entity, ()) if name != entity and name in table
        ]
        chosen = list(dict.fromkeys(chosen))[:count]
        hard = bool(chosen) or table.index is not None
        if len(chosen) < count and table.index is not None:
            extra = table.index.neighbours(entity, count)
            chosen += [name for name, _ in extra if name not in chosen][: count - len(chosen)]
        if len(chosen) < count:
            others = table.random_others(entity, min(len(table) - 1, count + len(chosen)), rng)
            chosen += [name for name in others if name not in chosen][: count - len(chosen)]
        return chosen, hard
