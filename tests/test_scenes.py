import doctest
import io
import math
import random
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from groundforge.scenes import compose as compose_module
from groundforge.scenes import layout as layout_module
from groundforge.scenes import sampling as sampling_module
from groundforge.scenes.compose import compose_scene, remap_box
from groundforge.scenes.layout import (
    LAYOUTS,
    CanvasSpec,
    Placement,
    grid_shape,
    plan_layout,
    resized_size,
)
from groundforge.scenes.sampling import SceneMix
from groundforge.schemas.box import Box
from groundforge.schemas.records import ImageRecord, sha256_hex

TILE = (40, 40, 40)
INNER = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
]

# (cell_size, max_side, margin). 600/560 always shrinks (no 600-pixel side fits in 560); the
# default 336/1344 shrinks long strips too.
SPECS = [(96, 1344, 8), (160, 1344, 3), (336, 1344, 8), (600, 560, 8)]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def tile(size, inner_box=None, inner=INNER[0]) -> Image.Image:
    """A ``TILE``-coloured image with the ``inner`` rectangle, or all ``inner`` when no box."""
    if inner_box is None:
        return Image.new("RGB", size, inner)
    image = Image.new("RGB", size, TILE)
    x1, y1, x2, y2 = (int(v) for v in inner_box.to_list())
    image.paste(inner, (x1, y1, x2, y2))
    return image


def record(image: Image.Image, box: Box | None, entity: str = "thing") -> ImageRecord:
    data = png(image)
    return ImageRecord(
        image_id=sha256_hex(data),
        image=data,
        width=image.width,
        height=image.height,
        domain="test",
        entity=entity,
        box=box,
    )


def decode(scene) -> np.ndarray:
    with Image.open(io.BytesIO(scene.image)) as image:
        assert image.size == (scene.width, scene.height)
        return np.asarray(image.convert("RGB")).astype(np.int32)


def closer_to(pixels: np.ndarray, colour, others) -> np.ndarray:
    dist = np.square(pixels - np.array(colour)).sum(axis=-1)
    return np.logical_and.reduce(
        [dist < np.square(pixels - np.array(o)).sum(axis=-1) for o in others]
    )


def check_fits(width, height, placements, spec):
    assert max(width, height) <= spec.max_side
    for p in placements:
        assert p.x >= spec.margin and p.y >= spec.margin
        assert p.x + p.width + spec.margin <= width
        assert p.y + p.height + spec.margin <= height


def check_sizes(sizes, placements, spec):
    """All members share one cell size (their longer side) and are resized exactly to it."""
    cell = max(placements[0].width, placements[0].height)
    assert 1 <= cell <= spec.cell_size
    for size, p in zip(sizes, placements, strict=True):
        assert (p.width, p.height) == resized_size(size, cell)
    return cell


def gap(a: Placement, b: Placement) -> int:
    """The larger of the horizontal and vertical gaps between two rectangles (< 0: overlap)."""
    gx = max(a.x - (b.x + b.width), b.x - (a.x + a.width))
    gy = max(a.y - (b.y + b.height), b.y - (a.y + a.height))
    return max(gx, gy)


def test_doctests():
    for module in (layout_module, compose_module, sampling_module):
        assert doctest.testmod(module).failed == 0


# --- remapping -------------------------------------------------------------------------------


def test_remap_box_exact_values():
    p = Placement(0, x=10, y=20, width=100, height=50)
    assert remap_box(Box(20, 10, 120, 60), (200, 100), p) == Box(20, 25, 70, 50)
    # Rounded pasted sizes give slightly different scales per axis: 3x7 pasted as 1x2.
    assert remap_box(Box(0, 0, 3, 7), (3, 7), Placement(0, 5, 6, 1, 2)) == Box(5, 6, 6, 8)
    assert remap_box(Box(1.5, 3.5, 3, 7), (3, 7), Placement(0, 0, 0, 1, 2)) == Box(0.5, 1, 1, 2)


@given(
    st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 2000), st.integers(1, 2000),
    st.integers(0, 3000), st.integers(0, 3000),
)  # fmt: skip
def test_whole_image_maps_to_exactly_the_pasted_rectangle(w, h, pw, ph, x, y):
    p = Placement(0, x, y, pw, ph)
    assert remap_box(Box(0, 0, w, h), (w, h), p) == p.box


@st.composite
def span(draw, n: int) -> tuple[int, int]:
    """An entity's extent along a tile side of ``n`` pixels: at least 40% of it, and each end
    either on the tile's edge or at least 15% (and 3 pixels) inside it. PIL renormalises its
    kernel where it meets the image border, which moves a colour edge closer than the kernel's
    reach to the border by about a pixel; this keeps such edges out of the pixel check."""
    least, gap = math.ceil(0.4 * n), max(3, math.ceil(0.15 * n))
    kind = draw(st.sampled_from(["full", "start", "end", "inside"]))
    if kind == "full":
        return 0, n
    if kind == "inside":
        start = draw(st.integers(gap, n - gap - least))
        return start, draw(st.integers(start + least, n - gap))
    length = draw(st.integers(least, n - gap))
    return (0, length) if kind == "start" else (n - length, n)


@st.composite
def members(draw):
    """2..6 tiles with sides 20..400 (aspect at most 3:1) whose entity is an inner rectangle
    (see ``span``) or the whole tile."""
    out = []
    for i in range(draw(st.integers(2, 6))):
        long_side = draw(st.integers(20, 400))
        short_side = max(20, round(long_side / draw(st.floats(1.0, 3.0))))
        size = (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)
        if draw(st.booleans()):
            out.append((size, None, INNER[i]))
            continue
        (x1, x2), (y1, y2) = draw(span(size[0])), draw(span(size[1]))
        out.append((size, Box(x1, y1, x2, y2), INNER[i]))
    return out


@settings(max_examples=40, deadline=None)
@given(members(), st.sampled_from(LAYOUTS), st.sampled_from(SPECS), st.integers(0, 10**6))
def test_remapped_boxes_cover_the_entity_pixels(tiles, layout, spec_args, seed):
    cell_size, max_side, margin = spec_args
    spec = CanvasSpec(cell_size=cell_size, max_side=max_side, margin=margin)
    recs = [
        record(tile(size, box, colour), Box(0, 0, *size) if box is None else box)
        for size, box, colour in tiles
    ]
    scene = compose_scene(recs, layout, spec, seed)
    pixels = decode(scene)
    check_fits(scene.width, scene.height, scene.placements, spec)
    check_sizes([size for size, _, _ in tiles], scene.placements, spec)
    if max_side < cell_size:
        assert max(max(p.width, p.height) for p in scene.placements) < cell_size

    # Resampling blurs a colour edge into a ramp, but a linear filter with a symmetric kernel
    # (LANCZOS) crosses the halfway colour at the edge's true position. So along a line across
    # the entity, the pixels closer to its colour than to what surrounds it span the true edges
    # to within half a pixel plus the kernel's ripple; a box remapped through any other scale
    # or offset misses by more than one pixel. The x edges are read along the box's middle row
    # and the y edges along its middle column: near a corner the ringing of the other axis
    # multiplies in and can shift the halfway point further. Inner rectangles are at least
    # ~5 px wide once pasted, so one edge's blur never reaches the other. Each line runs one
    # pixel past the pasted rectangle, so a tile pasted one pixel off would show.
    for (_, box, colour), p, entity in zip(tiles, scene.placements, scene.entities, strict=True):
        e = entity.box
        others = [scene.background] if box is None else [TILE, scene.background]
        row = pixels[int((e.y1 + e.y2) / 2), p.x - 1 : p.x + p.width + 1]
        column = pixels[p.y - 1 : p.y + p.height + 1, int((e.x1 + e.x2) / 2)]
        found = extent(closer_to(row, colour, others), p.x - 1)
        found += extent(closer_to(column, colour, others), p.y - 1)
        for got, want in zip(found, (e.x1, e.x2, e.y1, e.y2), strict=True):
            assert abs(got - want) <= 1, (found, e)
        if box is None:
            assert e == p.box


def extent(line: np.ndarray, offset: int) -> tuple[int, int]:
    """First and one-past-last True index of a 1-d mask, shifted by ``offset``."""
    hits = np.flatnonzero(line)
    assert hits.size and hits[-1] - hits[0] + 1 == hits.size  # one unbroken run
    return int(hits[0]) + offset, int(hits[-1]) + 1 + offset


# --- layouts ---------------------------------------------------------------------------------


def test_horizontal_exact():
    spec = CanvasSpec(cell_size=40, margin=8)
    w, h, ps = plan_layout([(100, 50), (50, 100)], "horizontal", spec, random.Random(0))
    assert (w, h) == (8 + 40 + 8 + 20 + 8, 8 + 40 + 8)
    assert ps == [Placement(0, 8, 18, 40, 20), Placement(1, 56, 8, 20, 40)]


def test_vertical_exact():
    spec = CanvasSpec(cell_size=40, margin=8)
    w, h, ps = plan_layout([(100, 50), (50, 100)], "vertical", spec, random.Random(0))
    assert (w, h) == (8 + 40 + 8, 8 + 20 + 8 + 40 + 8)
    assert ps == [Placement(0, 8, 8, 40, 20), Placement(1, 18, 36, 20, 40)]


def test_grid_exact():
    spec = CanvasSpec(cell_size=20, margin=2)
    sizes = [(10, 10), (40, 20), (10, 10), (10, 10), (5, 10)]
    w, h, ps = plan_layout(sizes, "grid", spec, random.Random(0))
    assert (w, h) == (3 * 22 + 2, 2 * 22 + 2)
    assert ps[1] == Placement(1, 24, 2 + 5, 20, 10)
    assert ps[4] == Placement(4, 24 + 5, 24, 10, 20)


def test_max_side_picks_the_largest_cell_that_fits():
    # 3 squares in a row: 4 margins of 8 + 3 * cell <= 400 gives cell 122 (123 makes 401).
    spec = CanvasSpec(cell_size=336, max_side=400, margin=8)
    w, h, ps = plan_layout([(50, 50)] * 3, "horizontal", spec, random.Random(0))
    assert (w, h) == (398, 138)
    assert [p.width for p in ps] == [122] * 3


def test_impossible_spec_raises():
    # Six 1-pixel images need 3 * (1 + 8) + 8 = 35 pixels even in a grid.
    spec = CanvasSpec(cell_size=10, max_side=34, margin=8)
    for layout in LAYOUTS:
        with pytest.raises(ValueError, match="max_side 34"):
            plan_layout([(10, 10)] * 6, layout, spec, random.Random(0))


def test_random_layout_fits_wherever_the_grid_does():
    # Canvases exactly as large as the grid at the smallest cells, where the margins leave
    # scattered placement little or no room: the random layout still places every member.
    for k in range(2, 7):
        cols, rows = grid_shape(k)
        for cell in (1, 2, 5):
            sizes = [(10, 10)] * k
            spec = CanvasSpec(cell_size=cell, max_side=max(cols, rows) * (cell + 8) + 8)
            grid = plan_layout(sizes, "grid", spec, random.Random(0))
            for seed in range(10):
                w, h, ps = plan_layout(sizes, "random", spec, random.Random(seed))
                check_fits(w, h, ps, spec)
                assert max(p.width for p in ps) >= max(p.width for p in grid[2]) / 2
                for a, b in combinations(ps, 2):
                    assert gap(a, b) >= spec.margin


def extreme_sizes(rng: random.Random, k: int) -> list[tuple[int, int]]:
    shapes = [(1000, 20), (20, 1000), (300, 300), (640, 480), (17, 23), (1, 1), (3000, 2000)]
    return [rng.choice(shapes) for _ in range(k)]


@pytest.mark.parametrize("layout", ["horizontal", "vertical", "grid"])
def test_fixed_layouts_structure(layout):
    for seed in range(60):
        rng = random.Random(seed)
        k = rng.randint(1, 6)
        spec = CanvasSpec(cell_size=rng.choice([16, 336, 600]), max_side=rng.choice([300, 1344]))
        sizes = extreme_sizes(rng, k)
        w, h, ps = plan_layout(sizes, layout, spec, rng)
        check_fits(w, h, ps, spec)
        cell = check_sizes(sizes, ps, spec)
        assert [p.index for p in ps] == list(range(k))
        if cell < spec.cell_size:  # shrunk: one pixel more would not have fit
            bigger = CanvasSpec(cell_size=cell + 1, max_side=10**6, margin=spec.margin)
            assert max(plan_layout(sizes, layout, bigger, rng)[:2]) > spec.max_side
        m = spec.margin
        if layout == "horizontal":
            row = max(p.height for p in ps)
            assert h == row + 2 * m and w == m + sum(p.width + m for p in ps)
            assert all(p.y == m + (row - p.height) // 2 for p in ps)
            assert all(b.x == a.x + a.width + m for a, b in zip(ps, ps[1:], strict=False))
        elif layout == "vertical":
            column = max(p.width for p in ps)
            assert w == column + 2 * m and h == m + sum(p.height + m for p in ps)
            assert all(p.x == m + (column - p.width) // 2 for p in ps)
            assert all(b.y == a.y + a.height + m for a, b in zip(ps, ps[1:], strict=False))
        else:
            cols, rows = grid_shape(k)
            assert cols == math.ceil(math.sqrt(k)) and rows == math.ceil(k / cols)
            assert (w, h) == (cols * (cell + m) + m, rows * (cell + m) + m)
            for p in ps:
                r, c = divmod(p.index, cols)
                assert p.x == m + c * (cell + m) + (cell - p.width) // 2
                assert p.y == m + r * (cell + m) + (cell - p.height) // 2
            assert len({p.x - (cell - p.width) // 2 for p in ps}) == min(k, cols)


def test_random_layout_never_overlaps():
    specs = [
        CanvasSpec(),
        CanvasSpec(max_side=600),
        CanvasSpec(cell_size=100, margin=0),
        CanvasSpec(cell_size=500, max_side=640, margin=20),
        CanvasSpec(max_side=64),
    ]
    for seed in range(300):
        rng = random.Random(seed)
        spec = specs[seed % len(specs)]
        sizes = extreme_sizes(rng, rng.randint(2, 6))
        state = rng.getstate()
        w, h, ps = plan_layout(sizes, "random", spec, rng)
        check_fits(w, h, ps, spec)
        check_sizes(sizes, ps, spec)
        for a, b in combinations(ps, 2):
            assert gap(a, b) >= spec.margin, (seed, a, b)
        rng.setstate(state)
        assert plan_layout(sizes, "random", spec, rng) == (w, h, ps)


def test_random_layout_varies_with_the_rng():
    sizes = [(300, 200)] * 4
    plans = {
        tuple(plan_layout(sizes, "random", CanvasSpec(), random.Random(s))[2]) for s in range(20)
    }
    assert len(plans) == 20


# --- composing -------------------------------------------------------------------------------


def scene_members(n: int = 3) -> list[ImageRecord]:
    sizes = [(120, 80), (60, 150), (200, 200), (90, 40), (33, 77), (250, 100)]
    return [
        record(tile(sizes[i], Box(5, 6, 30, 35), INNER[i]), Box(5, 6, 30, 35), f"entity {i}")
        for i in range(n)
    ]


def test_scene_fields():
    recs = scene_members(3)
    scene = compose_scene(recs, "horizontal", CanvasSpec(cell_size=100), seed=1)
    assert scene.layout == "horizontal"
    assert [e.name for e in scene.entities] == ["entity 0", "entity 1", "entity 2"]
    assert scene.source_image_ids == tuple(r.image_id for r in recs)
    assert [p.index for p in scene.placements] == [0, 1, 2]
    # 120x80 pasted as 100x67 at (8, 8 + (100 - 67) // 2): the box scales by 100/120 and 67/80.
    assert scene.placements[0] == Placement(0, 8, 24, 100, 67)
    assert scene.entities[0].box == Box(
        8 + 500 / 120, 24 + 6 * 67 / 80, 8 + 3000 / 120, 24 + 35 * 67 / 80
    )
    assert decode(scene).shape == (scene.height, scene.width, 3)


def test_compose_is_deterministic():
    recs = scene_members(5)
    for layout in LAYOUTS:
        a = compose_scene(recs, layout, CanvasSpec(), seed="scene-7")
        b = compose_scene(recs, layout, CanvasSpec(), seed="scene-7")
        assert a == b
    others = {compose_scene(recs, "random", CanvasSpec(), seed=s).placements for s in range(8)}
    assert len(others) == 8
    assert len({compose_scene(recs, "random", CanvasSpec(), seed=s).image for s in range(3)}) == 3


def test_str_seed_is_stable_across_processes():
    code = (
        "import random; from groundforge.scenes.layout import CanvasSpec, plan_layout; "
        "print(plan_layout([(300, 200)] * 4, 'random', CanvasSpec(), random.Random('abc')))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": hashseed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hashseed in ("1", "2")
    }
    here = plan_layout([(300, 200)] * 4, "random", CanvasSpec(), random.Random("abc"))
    assert outputs == {f"{here}\n"}


def test_member_errors_name_the_image():
    good = scene_members(2)
    no_box = record(tile((40, 40)), None)
    no_name = record(tile((41, 40)), Box(0, 0, 10, 10), entity=" ")
    outside = record(tile((42, 40)), Box(50, 50, 60, 60))
    for bad, what in [(no_box, "no trusted box"), (no_name, "no entity"), (outside, "no area")]:
        with pytest.raises(ValueError, match=what) as err:
            compose_scene([good[0], bad, good[1]], "grid")
        assert bad.image_id in str(err.value)


def test_unknown_layout_lists_layouts():
    for call in (
        lambda: compose_scene(scene_members(2), "diagonal"),
        lambda: plan_layout([(10, 10)], "diagonal", CanvasSpec(), random.Random(0)),
    ):
        with pytest.raises(ValueError, match="diagonal") as err:
            call()
        assert all(layout in str(err.value) for layout in LAYOUTS)


# --- sampling --------------------------------------------------------------------------------


def frequencies(draw, n: int) -> dict:
    counts: dict = {}
    for seed in range(n):
        value = draw(random.Random(seed))
        counts[value] = counts.get(value, 0) + 1
    return counts


def assert_follows(counts: dict, weights: dict, n: int) -> None:
    """Each count within 5 binomial standard deviations of n * p (false alarm odds ~ 1e-6)."""
    total = sum(weights.values())
    assert set(counts) <= {key for key, w in weights.items() if w > 0}
    for key, weight in weights.items():
        p = weight / total
        assert abs(counts.get(key, 0) - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (key, counts)


N = 5000


def test_default_mix_is_uniform():
    mix = SceneMix()
    assert dict(mix.k_weights) == {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    assert_follows(frequencies(mix.draw_k, N), dict(mix.k_weights), N)
    assert_follows(frequencies(mix.draw_layout, N), dict.fromkeys(LAYOUTS, 1.0), N)


def test_skewed_mix_is_followed():
    mix = SceneMix(
        k_weights={6: 0.3, 2: 0.7}, layout_weights={"random": 1, "grid": 3, "vertical": 0}
    )
    assert_follows(frequencies(mix.draw_k, N), {2: 0.7, 6: 0.3}, N)
    assert_follows(frequencies(mix.draw_layout, N), {"grid": 3, "random": 1, "vertical": 0}, N)


def test_draws_ignore_mapping_order():
    a = SceneMix(k_weights={2: 1, 3: 2, 9: 1})
    b = SceneMix(k_weights={9: 1, 3: 2, 2: 1})
    assert [a.draw_k(random.Random(s)) for s in range(50)] == [
        b.draw_k(random.Random(s)) for s in range(50)
    ]


def test_mix_is_read_only_copy():
    weights = {2: 1.0}
    mix = SceneMix(k_weights=weights)
    weights[3] = 5.0
    assert dict(mix.k_weights) == {2: 1.0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_weights": {1: 1.0}}, "at least 2"),
        ({"k_weights": {2.5: 1.0}}, "at least 2"),
        ({"k_weights": {2: -1.0, 3: 1.0}}, ">= 0"),
        ({"k_weights": {2: float("nan")}}, ">= 0"),
        ({"k_weights": {2: 0, 3: 0}}, "above 0"),
        ({"k_weights": {}}, "above 0"),
        ({"layout_weights": {"diagonal": 1.0}}, "unknown layouts"),
        ({"layout_weights": {"grid": 0.0}}, "above 0"),
    ],
)
def test_mix_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneMix(**kwargs)
