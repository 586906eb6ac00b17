"""Where each member image of a scene goes on the canvas, in integer pixels.

Every member is resized, aspect kept, so that its longer side is one common *cell size*
(``round(w * s)``, ``round(h * s)``, each at least 1, ``s = cell / max(w, h)``), then placed by
one of :data:`LAYOUTS`:

- ``horizontal``: one row, left to right in member order, each image vertically centred.
- ``vertical``: one column, top to bottom, each image horizontally centred.
- ``grid``: ``ceil(sqrt(k))`` columns of square ``cell x cell`` cells, rows as needed, filled
  row by row; each image centred in its cell.
- ``random``: uniform random positions with no two images closer than ``margin`` (see
  :func:`plan_layout`).

``margin`` pixels separate neighbouring images and surround the whole arrangement.

When the canvas would exceed ``max_side`` on either side, the plan is redone at the largest
smaller cell size that fits, instead of resampling a finished canvas, so that every pasted size
stays an exact integer and boxes remap through exactly the scale used for pasting.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from groundforge.scenes.background import AUTO, Background, check_background
from groundforge.schemas.box import Box

LAYOUTS = ("horizontal", "vertical", "grid", "random")

# Random layout: full sequential placements tried per canvas size, the canvas growth factor
# (per side) after they all fail, and how far cells may shrink below the grid's cell size
# before falling back to shuffled grid cells.
RANDOM_ATTEMPTS = 8
RANDOM_GROWTH = 1.25
RANDOM_MIN_CELL = 0.5

Size = tuple[int, int]


@dataclass(frozen=True)
class CanvasSpec:
    """How scenes are drawn.

    ``random_slack`` is the random layout's starting canvas area as a multiple of the grid
    layout's canvas area; the free room is what lets positions vary. ``background`` is an RGB
    colour, or ``"auto"``: a colour per scene that every member's outline stands out against
    (:func:`~groundforge.scenes.background.pick_background`).

    >>> CanvasSpec(cell_size=224).max_side
    1344
    """

    cell_size: int = 336
    max_side: int = 1344
    margin: int = 8
    background: Background = AUTO
    random_slack: float = 1.5

    def __post_init__(self) -> None:
        if self.cell_size < 1:
            raise ValueError(f"cell_size must be at least 1, got {self.cell_size}")
        if self.margin < 0:
            raise ValueError(f"margin must be at least 0, got {self.margin}")
        if self.max_side < 2 * self.margin + 1:
            raise ValueError(
                f"max_side {self.max_side} leaves no room inside margins of {self.margin}"
            )
        if not self.random_slack >= 1:
            raise ValueError(f"random_slack must be at least 1, got {self.random_slack}")
        check_background(self.background)


@dataclass(frozen=True)
class Placement:
    """Member ``index`` is pasted at ``(x, y)`` (top-left) with size ``width x height``."""

    index: int
    x: int
    y: int
    width: int
    height: int

    @property
    def box(self) -> Box:
        """The pasted rectangle on the canvas."""
        return Box(self.x, self.y, self.x + self.width, self.y + self.height)


def check_layout(layout: str) -> None:
    """Raise ValueError naming :data:`LAYOUTS` unless ``layout`` is one of them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def resized_size(size: Size, cell: int) -> Size:
    """The size of an image resized, aspect kept, so its longer side is ``cell``.

    >>> resized_size((400, 100), 336), resized_size((20, 30), 336), resized_size((1000, 1), 10)
    ((336, 84), (224, 336), (10, 1))
    """
    w, h = size
    s = cell / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def plan_layout(
    sizes: Sequence[Size], layout: str, spec: CanvasSpec, rng: random.Random
) -> tuple[int, int, list[Placement]]:
    """Canvas width, height and one placement per member (in member order).

    Only the ``random`` layout draws from ``rng``; the result is a function of the inputs and
    the rng state.

    Random layout: the canvas starts at ``random_slack`` times the grid canvas's area (same
    aspect, capped at ``max_side``, at the grid's cell size). Members are placed largest first,
    each at a position drawn uniformly from *all* positions that keep it ``margin`` away from the
    border and from every member placed so far (computed exactly, not by guessing), so a
    placement fails only when no such position is left. After ``RANDOM_ATTEMPTS`` failed
    placements the canvas grows by ``RANDOM_GROWTH`` per side (up to ``max_side``); once it can
    grow no more, the cell size shrinks instead, down to ``RANDOM_MIN_CELL`` times the grid's.
    If even that fails (in practice only with margins large next to ``max_side``), members are
    dealt to the grid's cells in random order, which always fits. So the search terminates, and
    the random layout fails only where the grid layout would.

    >>> w, h, ps = plan_layout([(100, 50), (50, 100)], "horizontal", CanvasSpec(cell_size=40),
    ...                        random.Random(0))
    >>> (w, h), [(p.x, p.y, p.width, p.height) for p in ps]
    ((84, 56), [(8, 18, 40, 20), (56, 8, 20, 40)])
    """
    check_layout(layout)
    if not sizes:
        raise ValueError("a scene needs at least one member")
    for size in sizes:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"member sizes must be (width, height) of at least 1, got {size}")
    sizes = [(int(w), int(h)) for w, h in sizes]
    if layout == "random":
        return _random(sizes, spec, rng)
    arrange = _ARRANGERS[layout]
    cell = _largest_fitting_cell(sizes, arrange, spec, layout)
    return arrange([resized_size(s, cell) for s in sizes], cell, spec.margin)


def _horizontal(resized: list[Size], cell: int, m: int) -> tuple[int, int, list[Placement]]:
    row = max(h for _, h in resized)
    placements, x = [], m
    for i, (w, h) in enumerate(resized):
        placements.append(Placement(i, x, m + (row - h) // 2, w, h))
        x += w + m
    return x, row + 2 * m, placements


def _vertical(resized: list[Size], cell: int, m: int) -> tuple[int, int, list[Placement]]:
    column = max(w for w, _ in resized)
    placements, y = [], m
    for i, (w, h) in enumerate(resized):
        placements.append(Placement(i, m + (column - w) // 2, y, w, h))
        y += h + m
    return column + 2 * m, y, placements


def grid_shape(k: int) -> tuple[int, int]:
    """Columns and rows of the grid layout for ``k`` members.

    >>> [grid_shape(k) for k in (1, 2, 3, 4, 5, 6, 7)]
    [(1, 1), (2, 1), (2, 2), (2, 2), (3, 2), (3, 2), (3, 3)]
    """
    cols = math.isqrt(k - 1) + 1
    return cols, -(-k // cols)


def _grid(resized: list[Size], cell: int, m: int) -> tuple[int, int, list[Placement]]:
    cols, rows = grid_shape(len(resized))
    placements = []
    for i, (w, h) in enumerate(resized):
        row, col = divmod(i, cols)
        x = m + col * (cell + m) + (cell - w) // 2
        y = m + row * (cell + m) + (cell - h) // 2
        placements.append(Placement(i, x, y, w, h))
    return cols * (cell + m) + m, rows * (cell + m) + m, placements


_Arranger = Callable[[list[Size], int, int], tuple[int, int, list[Placement]]]
_ARRANGERS: dict[str, _Arranger] = {
    "horizontal": _horizontal,
    "vertical": _vertical,
    "grid": _grid,
}


def _largest_fitting_cell(
    sizes: list[Size], arrange: _Arranger, spec: CanvasSpec, layout: str
) -> int:
    """The largest cell size up to ``spec.cell_size`` whose canvas fits ``max_side``.

    Canvas sides never shrink as the cell grows (every resized side is a rounded, non-decreasing
    function of it), so a binary search finds it.
    """

    def fits(cell: int) -> bool:
        width, height, _ = arrange([resized_size(s, cell) for s in sizes], cell, spec.margin)
        return max(width, height) <= spec.max_side

    if fits(spec.cell_size):
        return spec.cell_size
    if not fits(1):
        raise ValueError(
            f"{len(sizes)} images in a {layout} layout with margin {spec.margin} cannot fit "
            f"max_side {spec.max_side}; raise max_side or lower margin"
        )
    lo, hi = 1, spec.cell_size  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _random(
    sizes: list[Size], spec: CanvasSpec, rng: random.Random
) -> tuple[int, int, list[Placement]]:
    m, cap = spec.margin, spec.max_side
    grid_cell = cell = _largest_fitting_cell(sizes, _grid, spec, "random")
    smallest_cell = max(1, math.ceil(grid_cell * RANDOM_MIN_CELL))
    cols, rows = grid_shape(len(sizes))
    stretch = math.sqrt(spec.random_slack)
    width = min(cap, math.ceil((cols * (cell + m) + m) * stretch))
    height = min(cap, math.ceil((rows * (cell + m) + m) * stretch))
    while True:
        resized = [resized_size(s, cell) for s in sizes]
        for _ in range(RANDOM_ATTEMPTS):
            spots = _scatter(resized, width, height, m, rng)
            if spots is not None:
                placements = [Placement(i, x, y, *resized[i]) for i, (x, y) in enumerate(spots)]
                return width, height, placements
        grown = (
            min(cap, math.ceil(width * RANDOM_GROWTH)),
            min(cap, math.ceil(height * RANDOM_GROWTH)),
        )
        if grown != (width, height):
            width, height = grown
        elif cell > smallest_cell:
            cell = max(smallest_cell, min(cell - 1, int(cell * 0.9)))
        else:
            return _shuffled_grid(sizes, grid_cell, m, rng)


def _shuffled_grid(
    sizes: list[Size], cell: int, m: int, rng: random.Random
) -> tuple[int, int, list[Placement]]:
    """The grid layout with members dealt to its cells in random order."""
    order = list(range(len(sizes)))
    rng.shuffle(order)
    width, height, slots = _grid([resized_size(sizes[i], cell) for i in order], cell, m)
    placements = [Placement(order[s.index], s.x, s.y, s.width, s.height) for s in slots]
    return width, height, sorted(placements, key=lambda p: p.index)


def _scatter(
    resized: list[Size], width: int, height: int, m: int, rng: random.Random
) -> list[tuple[int, int]] | None:
    """One sequential random placement (largest first); None when some image finds no room."""
    spots = [(0, 0)] * len(resized)
    placed: list[tuple[int, int, int, int]] = []
    for i in sorted(range(len(resized)), key=lambda i: (-resized[i][0] * resized[i][1], i)):
        w, h = resized[i]
        # Free top-left positions x = m + col, y = m + row keep the image inside the border.
        nx, ny = width - 2 * m - w + 1, height - 2 * m - h + 1
        if nx < 1 or ny < 1:
            return None
        free = np.ones((ny, nx), dtype=bool)
        for px, py, pw, ph in placed:
            # x is too close to a placed image when px - m - w < x < px + pw + m; in column
            # indices that is px - 2m - w < col < px + pw, and the same for rows.
            rows = slice(max(0, py - 2 * m - h + 1), max(0, py + ph))
            cols = slice(max(0, px - 2 * m - w + 1), max(0, px + pw))
            free[rows, cols] = False
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            return None
        row, col = divmod(int(candidates[rng.randrange(candidates.size)]), nx)
        spots[i] = (m + col, m + row)
        placed.append((m + col, m + row, w, h))
    return spots
