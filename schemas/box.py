"""The one box type: float pixel ``xyxy`` in the frame of the image it belongs to.

Every other frame (0..1000, 0..1, the resized frame of a processor) is rendered and parsed at the
edges by a codec (:mod:`groundforge.schemas.codecs`); nothing else is ever stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in pixels, ``x1 <= x2`` and ``y1 <= y2``.

    >>> b = Box(10, 20, 110, 70)
    >>> b.width, b.height, b.area
    (100.0, 50.0, 5000.0)
    >>> round(b.iou(Box(60, 20, 160, 70)), 3)
    0.333
    >>> Box.from_corners(110, 70, 10, 20) == b   # swapped corners are put right
    True
    >>> Box(-5, 10, 700, 30).clip(640, 480)
    Box(x1=0.0, y1=10.0, x2=640.0, y2=30.0)
    """

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_corners(cls, xa: float, ya: float, xb: float, yb: float) -> Box:
        """Build a box from two opposite corners given in any order."""
        return cls(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Build a box from its top-left corner and size (COCO order)."""
        return cls(x, y, x + w, y + h)

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Box:
        """Build a box from a stored ``[x1, y1, x2, y2]`` list."""
        if len(values) != 4:
            raise ValueError(f"a box needs 4 values, got {len(values)}: {list(values)!r}")
        return cls(*values)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    @property
    def is_degenerate(self) -> bool:
        """True when the box has no area (zero or negative width or height)."""
        return not (self.width > 0 and self.height > 0)

    def intersection(self, other: Box) -> float:
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        return w * h if w > 0 and h > 0 else 0.0

    def iou(self, other: Box) -> float:
        """Intersection over union; 0 when either box is degenerate."""
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clip(self, width: float, height: float) -> Box:
        """The part of the box inside an image of ``width`` x ``height``."""
        return Box(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
        )

    def scale(self, sx: float, sy: float | None = None) -> Box:
        """Multiply x by ``sx`` and y by ``sy`` (``sx`` when omitted)."""
        sy = sx if sy is None else sy
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)

    def shift(self, dx: float, dy: float) -> Box:
        return Box(self.x1 + dx, self.y1 + dy, self.x2 + dx, self.y2 + dy)

    def to_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


def as_array(boxes: Iterable[Box]) -> np.ndarray:
    """Boxes as an ``(n, 4)`` float64 array (``(0, 4)`` when empty)."""
    arr = np.array([b.to_list() for b in boxes], dtype=np.float64)
    return arr.reshape(-1, 4)


def mask_box(mask: np.ndarray) -> Box | None:
    """The box of the True pixels of a 2-d mask (exclusive right/bottom edges); None if none.

    >>> m = np.zeros((10, 20), dtype=bool); m[7, 5] = True
    >>> mask_box(m)
    Box(x1=5.0, y1=7.0, x2=6.0, y2=8.0)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return Box(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """Pairwise IoU, shape ``(len(a), len(b))``.

    >>> iou_matrix([Box(0, 0, 10, 10)], [Box(0, 0, 10, 10), Box(5, 0, 15, 10)]).round(3).tolist()
    [[1.0, 0.333]]
    """
    pa, pb = as_array(a), as_array(b)
    if not len(pa) or not len(pb):
        return np.zeros((len(pa), len(pb)))
    x1 = np.maximum(pa[:, None, 0], pb[None, :, 0])
    y1 = np.maximum(pa[:, None, 1], pb[None, :, 1])
    x2 = np.minimum(pa[:, None, 2], pb[None, :, 2])
    y2 = np.minimum(pa[:, None, 3], pb[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(pa[:, 2] - pa[:, 0], 0, None) * np.clip(pa[:, 3] - pa[:, 1], 0, None)
    area_b = np.clip(pb[:, 2] - pb[:, 0], 0, None) * np.clip(pb[:, 3] - pb[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def coverage_matrix(regions: Sequence[Box], boxes: Sequence[Box]) -> np.ndarray:
    """How much of each box each region covers: ``area(regions[j] n boxes[k]) / area(boxes[k])``,
    shape ``(len(regions), len(boxes))``; 0 for a box without area.

    >>> coverage_matrix([Box(0, 0, 5, 10)], [Box(0, 0, 10, 10), Box(20, 0, 30, 10)]).tolist()
    [[0.5, 0.0]]
    """
    pa, pb = as_array(regions), as_array(boxes)
    if not len(pa) or not len(pb):
        return np.zeros((len(pa), len(pb)))
    w = np.minimum(pa[:, None, 2], pb[None, :, 2]) - np.maximum(pa[:, None, 0], pb[None, :, 0])
    h = np.minimum(pa[:, None, 3], pb[None, :, 3]) - np.maximum(pa[:, None, 1], pb[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area = np.clip(pb[:, 2] - pb[:, 0], 0, None) * np.clip(pb[:, 3] - pb[:, 1], 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area[None, :] > 0, inter / area[None, :], 0.0)


def match_boxes(
    preds: Sequence[Box], truths: Sequence[Box], min_iou: float = 0.5
) -> list[tuple[int, int, float]]:
    """One-to-one matching of predicted and true boxes: ``(pred index, truth index, IoU)``.

    Only pairs with IoU >= ``min_iou`` may match. Objective: the largest number of matches, ties
    broken by the largest total IoU of the matched pairs. Solved exactly by
    ``scipy.optimize.linear_sum_assignment`` on the weight ``K + IoU`` for allowed pairs and 0 for
    the others: with ``K = min(n, m) + 1`` larger than any total IoU, one more match always
    outweighs any gain in IoU, and pairs under the threshold never displace an allowed one.
    Sorted by pred index.

    >>> match_boxes([Box(0, 0, 10, 10), Box(50, 50, 60, 60)], [Box(1, 0, 11, 10)])
    [(0, 0, 0.8181818181818182)]
    >>> match_boxes([Box(0, 0, 10, 10)], [Box(5, 0, 15, 10)])   # IoU 1/3: no match
    []
    >>> preds = [Box(30, 0, 130, 100), Box(0, 0, 90, 100)]   # a greedy pass would match 1 pair
    >>> [(p, t) for p, t, _ in match_boxes(preds, [Box(0, 0, 100, 100), Box(60, 0, 160, 100)])]
    [(0, 1), (1, 0)]
    """
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    ious = iou_matrix(preds, truths)
    allowed = ious >= min_iou
    if not allowed.any():
        return []
    from scipy.optimize import linear_sum_assignment

    big = min(ious.shape) + 1.0
    rows, cols = linear_sum_assignment(np.where(allowed, big + ious, 0.0), maximize=True)
    return sorted(
        (int(r), int(c), float(ious[r, c]))
        for r, c in zip(rows, cols, strict=True)
        if allowed[r, c]
    )
