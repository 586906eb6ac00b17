"""Synthetic crowds: many isolated objects pasted onto one canvas, some partly hidden by others.

Each instance is the trusted-box crop of a member image (the box widened to whole pixels),
resized with :data:`~groundforge.scenes.compose.RESAMPLE`, aspect kept, so that its longer side
is a random fraction (``CrowdSpec.scale``) of the canvas's longer side, and pasted wholly inside
the canvas. Instances are painted in order; a later one hides what lies under its rectangle.
Where no instance lies, the canvas shows ``CrowdSpec.background``: with ``"auto"`` a colour that
every pasted instance's outer pixels stand out against (:mod:`groundforge.scenes.background`),
painted last, so the choice never changes where instances go.

Every instance records two boxes: its *full* box (the whole pasted rectangle, the usual ground
truth of crowd benchmarks such as CrowdHuman, and the instance's ``box``) and its *visible* box
(the bounding box of the pixels it still owns once every later instance is painted). An integer
ownership map (which instance painted each canvas pixel last) is kept while painting, so the
visible boxes and visible fractions are exact by construction, not measured from colours.

Overlap control: an instance's *covered fraction* is the share of its full box that later
instances hide. Each new instance is placed where it brings the running mean covered fraction
over the instances placed so far closest to ``CrowdSpec.overlap``. Because covering pixel ``p``
raises the covered fraction of its current owner by ``1 / area(owner)``, the rise of the
*sum* of covered fractions for every possible position is one box sum over a per-pixel weight
map, computed for all positions at once from an integral image. Positions whose rise is within
``OVERLAP_SLACK * overlap`` of the best one are equally good, and one is drawn uniformly among
them, so crowds vary while every step corrects the error left by the previous ones. With
``overlap = 0`` only positions that cover nothing qualify whenever one exists.
"""

from __future__ import annotations

import heapq
import io
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from groundforge.filters.image import PNG_COMPRESS_LEVEL
from groundforge.scenes.background import AUTO, RGB, Background, check_background, pick_background
from groundforge.scenes.background import sides as pixel_sides
from groundforge.scenes.compose import RESAMPLE, decoded_member
from groundforge.scenes.plan import PoolItem
from groundforge.schemas.box import Box, mask_box
from groundforge.schemas.records import ImageRecord, Instance, sha256_hex, stable_id

# How far (as a share of the target) a position's covered amount may miss the best position's
# and still be drawn: a larger slack gives more varied crowds, and the miss is made up by the
# next instances because each one aims at the running mean.
OVERLAP_SLACK = 0.5
# Box sums come from differences of a float integral image; smaller differences are rounding.
_ROUNDING = 1e-9


@dataclass(frozen=True)
class CrowdSpec:
    """How crowds are drawn.

    ``count`` is the inclusive range of instances per scene; ``scale`` the range of an instance's
    longer side as a fraction of the canvas's longer side; ``overlap`` the target mean share of
    an instance's full box hidden by later instances; instances less visible than ``min_visible``
    become ignore instances (too hidden to ask a model to find); ``background`` is the canvas
    colour, an RGB colour or ``"auto"`` (one per crowd). A target below the overlap
    that the crowd's density forces (many large instances on a small canvas) is missed from
    above: with the defaults, even ``overlap=0`` leaves about 0.1 covered on average.

    >>> CrowdSpec(count=(3, 5), overlap=0.2).count
    (3, 5)
    """

    width: int = 640
    height: int = 480
    count: tuple[int, int] = (8, 20)
    scale: tuple[float, float] = (0.15, 0.35)
    overlap: float = 0.3
    background: Background = AUTO
    min_visible: float = 0.1

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"canvas must be at least 1x1, got {self.width}x{self.height}")
        low, high = self.count
        if not 1 <= low <= high:
            raise ValueError(f"count must be (low, high) with 1 <= low <= high, got {self.count}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}"
            )
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")
        check_background(self.background)


DEFAULT_CROWD = CrowdSpec()


@dataclass(frozen=True)
class CrowdScene:
    """A composed crowd: PNG bytes, its size, its canvas colour, and its instances in paint
    order.

    Each instance's ``box`` and ``full`` are the whole pasted rectangle (always inside the
    canvas), ``visible`` the box of its pixels left visible (None when none are) and ``ignore``
    says it is less visible than ``CrowdSpec.min_visible``. ``visible_fraction`` (visible pixels
    / full box area) and ``source_image_ids`` are per instance, in the same order.
    """

    image: bytes
    width: int
    height: int
    instances: tuple[Instance, ...]
    visible_fraction: tuple[float, ...]
    source_image_ids: tuple[str, ...]
    background: RGB

    def to_record(self, domain: str, label: str, location: str) -> ImageRecord:
        """The crowd as an image record whose instances are the crowd's (a ``detect`` source)."""
        return ImageRecord(
            image_id=sha256_hex(self.image),
            image=self.image,
            width=self.width,
            height=self.height,
            domain=domain,
            entity=label,
            source="crowd",
            location=location,
            instances=self.instances,
        )


def compose_crowd(
    members: Sequence[ImageRecord],
    spec: CrowdSpec = DEFAULT_CROWD,
    seed: int | str = 0,
    label: str = "",
) -> CrowdScene:
    """Compose a crowd of ``spec.count`` instances drawn from ``members`` (each with a ``box``).

    Members are dealt from a shuffled deck, reshuffled when it runs out, so a member repeats
    only when the crowd has more instances than there are members. Every instance gets
    ``label``. ``seed`` seeds ``random.Random`` (a str seed is stable across processes); the
    same members, spec and seed give the same PNG bytes and instances.

    >>> crowd = compose_crowd(flags, CrowdSpec(), seed="c1", label="flag")  # doctest: +SKIP
    >>> len(crowd.instances), round(min(crowd.visible_fraction), 2)  # doctest: +SKIP
    (12, 0.19)
    """
    if not members:
        raise ValueError("a crowd needs at least one member")
    crops = [_crop(member) for member in members]
    rng = random.Random(seed)
    count = rng.randint(*spec.count)
    width, height = spec.width, spec.height
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    owner = np.full((height, width), -1, dtype=np.int32)
    # weight[p] = 1 / area of p's current owner: covering p raises that owner's covered fraction
    # by exactly this much.
    weight = np.zeros((height, width), dtype=np.float64)
    integral = np.zeros((height + 1, width + 1), dtype=np.float64)
    covered_sum = 0.0
    deck: list[int] = []
    chosen: list[int] = []
    fulls: list[Box] = []
    instance_sides: list[np.ndarray] = []
    for index in range(count):
        if not deck:
            deck = list(range(len(members)))
            rng.shuffle(deck)
        member = deck.pop()
        crop = crops[member]
        w, h = _pasted_size(crop.size, rng.uniform(*spec.scale), width, height)
        rise = _box_sums(integral, w, h)
        need = spec.overlap * (index + 1) - covered_sum
        miss = np.abs(rise - need)
        near = np.flatnonzero(miss <= miss.min() + OVERLAP_SLACK * spec.overlap + _ROUNDING)
        y, x = divmod(int(near[rng.randrange(near.size)]), width - w + 1)
        covered_sum += float(rise[y, x])
        pasted = np.asarray(crop.resize((w, h), RESAMPLE))
        canvas[y : y + h, x : x + w] = pasted
        # Copies: views would keep every pasted instance alive until the end.
        instance_sides += [side.copy() for side in pixel_sides(pasted)]
        owner[y : y + h, x : x + w] = index
        _add_to_integral(integral, 1.0 / (w * h) - weight[y : y + h, x : x + w], x, y)
        weight[y : y + h, x : x + w] = 1.0 / (w * h)
        chosen.append(member)
        fulls.append(Box(x, y, x + w, y + h))

    background = pick_background(instance_sides, spec.background)
    canvas[owner < 0] = background
    visible_pixels = np.bincount(owner[owner >= 0], minlength=count)
    fractions = tuple(float(visible_pixels[i]) / fulls[i].area for i in range(count))
    instances = tuple(
        Instance(
            box=full,
            label=label,
            full=full,
            visible=mask_box(owner == i) if visible_pixels[i] else None,
            ignore=fractions[i] < spec.min_visible,
        )
        for i, full in enumerate(fulls)
    )
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return CrowdScene(
        image=buf.getvalue(),
        width=width,
        height=height,
        instances=instances,
        visible_fraction=fractions,
        source_image_ids=tuple(members[m].image_id for m in chosen),
        background=background,
    )


def _crop(member: ImageRecord) -> Image.Image:
    """The member's trusted box, widened to whole pixels, cut out of its decoded image."""
    image, box = decoded_member(member, "crowd")
    return image.crop(
        (math.floor(box.x1), math.floor(box.y1), math.ceil(box.x2), math.ceil(box.y2))
    )


def _pasted_size(
    size: tuple[int, int], fraction: float, width: int, height: int
) -> tuple[int, int]:
    """``size`` scaled, aspect kept, to a longer side of ``fraction`` of the canvas's longer
    side, shrunk further when needed to fit the canvas; each side at least 1."""
    w, h = size
    s = min(fraction * max(width, height) / max(w, h), width / w, height / h)
    return max(1, round(w * s)), max(1, round(h * s))


def _box_sums(integral: np.ndarray, w: int, h: int) -> np.ndarray:
    """From the integral image of some values, their sum under a ``w x h`` rectangle at every
    top-left position that keeps it inside: shape ``(rows - h + 1, cols - w + 1)``.

    >>> values = np.arange(6.0).reshape(2, 3)
    >>> integral = np.zeros((3, 4))
    >>> _add_to_integral(integral, values, 0, 0)
    >>> _box_sums(integral, 2, 2).tolist()
    [[8.0, 12.0]]
    """
    return integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]


def _add_to_integral(integral: np.ndarray, change: np.ndarray, x: int, y: int) -> None:
    """Update ``integral`` in place for ``change`` added to the values at top-left ``(x, y)``.

    Only the rectangle's own cumulative sums are computed; below and to the right of it the
    integral rises by its last row, last column or total, which is far cheaper than summing the
    whole canvas again after every paste.

    >>> values = np.zeros((3, 4)); values[1:, 1:3] = [[1, 2], [3, 4]]
    >>> integral = np.zeros((4, 5))
    >>> _add_to_integral(integral, values[1:, 1:3], 1, 1)
    >>> bool((integral[1:, 1:] == values.cumsum(axis=0).cumsum(axis=1)).all())
    True
    """
    h, w = change.shape
    partial = change.cumsum(axis=0).cumsum(axis=1)
    integral[y + 1 : y + h + 1, x + 1 : x + w + 1] += partial
    integral[y + 1 : y + h + 1, x + w + 1 :] += partial[:, -1:]
    integral[y + h + 1 :, x + 1 : x + w + 1] += partial[-1:, :]
    integral[y + h + 1 :, x + w + 1 :] += partial[-1, -1]


@dataclass(frozen=True)
class CrowdPlan:
    """One crowd to compose: the pool item keys it may draw from (in a stable order); its
    ``scene_id`` seeds the composition."""

    scene_id: str
    domain: str
    split: str
    members: tuple[str, ...]


# How many candidates a crowd is offered beyond the ``count[1]`` it keeps, in standard
# deviations of the offer: a crowd falls short of ``count[1]`` members about once in 300.
_OFFER_SPREAD = 3


def crowds_in_pool(pool_size: int, per_image: float) -> int:
    """How many crowds a pool of ``pool_size`` images makes: ``round(per_image x size)``, at
    least one."""
    return max(1, round(per_image * pool_size))


def offer_share(pool_size: int, most: int) -> float:
    """The chance that an image is offered to one crowd of its pool: enough for the crowd to
    gather ``most`` candidates with a margin, or every image when the pool is small."""
    wanted = most + _OFFER_SPREAD * math.sqrt(most) + _OFFER_SPREAD
    return min(1.0, wanted / pool_size)


def crowd_offers(
    item: PoolItem, pool_size: int, spec: CrowdSpec, per_image: float, seed: str
) -> list[tuple[int, str]]:
    """The crowds of its pool that ``item`` is offered to, each with the rank it has there.

    An image is offered to each of the pool's :func:`crowds_in_pool` crowds independently with
    probability :func:`offer_share`; the offered crowds are found by geometric skips, so the
    work is the number of offers (``per_image`` times a little over ``count[1]`` on average),
    not the number of crowds.
    A crowd keeps the ``count[1]`` candidates of lowest rank: a uniform draw without
    replacement. Everything comes from seeded hashes of the item's key.

    >>> item = PoolItem("k", "i", "flag", "sft", "e")
    >>> [n for n, _ in crowd_offers(item, 6, CrowdSpec(count=(2, 4)), 0.5, "s")]
    [0, 1, 2]
    """
    crowds = crowds_in_pool(pool_size, per_image)
    share = offer_share(pool_size, spec.count[1])
    if share >= 1.0:
        chosen = range(crowds)
    else:
        rng = random.Random(stable_id("crowd-offers", seed, item.domain, item.split, item.key))
        skip = math.log1p(-share)
        chosen, n = [], -1
        while True:
            # 1 - random() lies in (0, 1]: a gap of floor(log(u) / log(1 - share)) crowds.
            n += 1 + int(math.log(1.0 - rng.random()) / skip)
            if n >= crowds:
                break
            chosen.append(n)
    return [
        (n, stable_id("crowd-rank", seed, item.domain, item.split, n, item.key)) for n in chosen
    ]


def crowd_plan(
    crowd: tuple[str, str, int], candidates: Iterable[tuple[str, str]], seed: str
) -> CrowdPlan:
    """The plan of crowd ``(domain, split, n)`` from its kept ``(rank, key)`` candidates."""
    domain, split, n = crowd
    keys = [key for _, key in sorted(candidates)]
    return CrowdPlan(stable_id("crowd", seed, domain, split, n, keys), domain, split, tuple(keys))


def plan_crowds(
    items: Sequence[PoolItem], spec: CrowdSpec, per_image: float, seed: str
) -> list[CrowdPlan]:
    """Crowds for a run, in memory (the pipeline runs the same steps, :func:`crowd_offers` and
    :func:`crowd_plan`): per (domain, split), ``round(per_image x items)`` crowds (at least
    one), each of up to ``spec.count[1]`` distinct items, so held-out entities never mix with
    training ones. The same items and seed give the same plans whatever their order.

    >>> items = [PoolItem(f"k{i}", f"i{i}", "flag", "sft", f"e{i}") for i in range(6)]
    >>> [len(p.members) for p in plan_crowds(items, CrowdSpec(count=(2, 4)), 0.5, "s")]
    [4, 4, 4]
    """
    sizes = Counter(item.pool for item in items)
    offers: dict[tuple[str, str, int], list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        for n, rank in crowd_offers(item, sizes[item.pool], spec, per_image, seed):
            offers[(*item.pool, n)].append((rank, item.key))
    plans = [
        crowd_plan(crowd, heapq.nsmallest(spec.count[1], offered), seed)
        for crowd, offered in offers.items()
    ]
    return sorted(plans, key=lambda p: (p.domain, p.split, p.scene_id))
