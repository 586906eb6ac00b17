"""Confusable-distractor choice: exact neighbours, uniform random picks, entity vectors."""

from __future__ import annotations

import io
import itertools
import math
import pickle
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundforge.annotators.embed import ColorHistogramEmbedder
from groundforge.scenes.distractors import DistractorIndex, entity_vectors

# Entities on the unit circle: the cosine between two is the cosine of their angle difference.
# No entity has two others at the same angular distance, so every neighbour order is strict.
ANGLES = {"t": 0, "p10": 10, "p24": 24, "p43": 43, "p71": 71, "p104": 104, "p150": 150, "p178": 178}


def circle_index(order=None) -> DistractorIndex:
    names = order or list(ANGLES)
    radians = np.radians([ANGLES[n] for n in names])
    return DistractorIndex(names, np.stack([np.cos(radians), np.sin(radians)], axis=1))


def cos_deg(a: str, b: str) -> float:
    return math.cos(math.radians(ANGLES[a] - ANGLES[b]))


@pytest.fixture(scope="module")
def index() -> DistractorIndex:
    # Shuffled, so row order says nothing about similarity.
    return circle_index(["p104", "p43", "t", "p178", "p10", "p150", "p71", "p24"])


def names_of(picks) -> list[str]:
    return [name for name, _ in picks]


# --- hard --------------------------------------------------------------------------------------


def test_hard_takes_exactly_the_nearest_in_order_with_their_similarities(index):
    picks = index.choose("t", 3, "hard", random.Random(0))
    assert names_of(picks) == ["p10", "p24", "p43"]
    for name, sim in picks:
        assert isinstance(sim, float)
        assert sim == pytest.approx(cos_deg("t", name), abs=1e-6)
    assert names_of(index.choose("p150", 2, "hard", random.Random(0))) == ["p178", "p104"]


def test_neighbours_never_include_the_entity_itself(index):
    for name in ANGLES:
        found = names_of(index.neighbours(name, len(ANGLES)))
        assert name not in found
        assert sorted(found) == sorted(set(ANGLES) - {name})
        expected = sorted(set(ANGLES) - {name}, key=lambda other: -cos_deg(name, other))
        assert found == expected
    assert index.neighbours("t", 0) == []


def test_hard_without_pool_leaves_the_rng_untouched(index):
    rng = random.Random(5)
    state = rng.getstate()
    index.choose("t", 2, "hard", rng)
    assert rng.getstate() == state


def test_hard_with_a_pool_draws_among_the_pool_nearest(index):
    pool = {"p10", "p24", "p43", "p71"}
    subsets = Counter()
    for seed in range(300):
        picks = index.choose("t", 2, "hard", random.Random(seed), pool=4)
        names = names_of(picks)
        assert set(names) <= pool and len(set(names)) == 2
        sims = [sim for _, sim in picks]
        assert sims == sorted(sims, reverse=True)
        subsets[frozenset(names)] += 1
    assert len(subsets) == math.comb(4, 2)
    # A pool smaller than the count acts as the count: exactly the nearest.
    assert names_of(index.choose("t", 3, "hard", random.Random(1), pool=1)) == [
        "p10",
        "p24",
        "p43",
    ]


def test_ties_are_broken_by_row_order():
    vectors = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    assert names_of(DistractorIndex(["a", "b", "c"], vectors).neighbours("a", 2)) == ["b", "c"]
    assert names_of(DistractorIndex(["a", "c", "b"], vectors).neighbours("a", 2)) == ["c", "b"]


# --- easy --------------------------------------------------------------------------------------


def test_easy_draws_uniformly_among_all_others(index):
    others = sorted(set(ANGLES) - {"t"})
    draws, count = 4000, 2
    singles, pairs = Counter(), Counter()
    for seed in range(draws):
        picks = index.choose("t", count, "easy", random.Random(seed))
        names = names_of(picks)
        assert "t" not in names and len(set(names)) == count
        for name, sim in picks:
            assert sim == pytest.approx(cos_deg("t", name), abs=1e-6)
        singles.update(names)
        pairs[frozenset(names)] += 1

    # Each of 7 others appears with p = 2/7, each of the 21 pairs with p = 1/21; allow 5 binomial
    # standard deviations (a wrong sampler, e.g. one that never picks the last row, fails).
    def within(observed, p):
        return abs(observed - draws * p) < 5 * math.sqrt(draws * p * (1 - p))

    assert sorted(singles) == others
    assert all(within(singles[name], count / len(others)) for name in others)
    assert len(pairs) == math.comb(len(others), count)
    assert all(within(n, 1 / math.comb(len(others), count)) for n in pairs.values())


def test_easy_reaches_the_first_and_last_rows(index):
    # The target sits in the middle of the rows; the skip-over must not lose either end.
    seen = set()
    for seed in range(200):
        seen.update(names_of(index.choose("t", 1, "easy", random.Random(seed))))
    assert seen == set(ANGLES) - {"t"}
    first = circle_index()
    assert first.names[0] == "t"
    seen = {n for s in range(200) for n in names_of(first.choose("t", 1, "easy", random.Random(s)))}
    assert seen == set(ANGLES) - {"t"}


# --- both modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hard", "easy"])
def test_a_count_beyond_the_others_returns_all_others(index, mode):
    picks = index.choose("p71", 20, mode, random.Random(3), pool=30)
    assert sorted(names_of(picks)) == sorted(set(ANGLES) - {"p71"})
    assert index.choose("p71", 0, mode, random.Random(3)) == []
    lonely = DistractorIndex(["only"], np.ones((1, 3)))
    assert lonely.choose("only", 3, mode, random.Random(0)) == []


@pytest.mark.parametrize(("mode", "pool"), [("hard", None), ("hard", 5), ("easy", None)])
def test_same_seed_same_picks(index, mode, pool):
    first = [index.choose("t", 3, mode, random.Random(seed), pool=pool) for seed in range(20)]
    again = [index.choose("t", 3, mode, random.Random(seed), pool=pool) for seed in range(20)]
    assert first == again
    rng = random.Random(11)
    sequence = [index.choose("p43", 2, mode, rng, pool=pool) for _ in range(5)]
    rng = random.Random(11)
    assert [index.choose("p43", 2, mode, rng, pool=pool) for _ in range(5)] == sequence


def test_bad_arguments(index):
    rng = random.Random(0)
    with pytest.raises(KeyError, match="nope"):
        index.choose("nope", 2, "hard", rng)
    with pytest.raises(ValueError, match="mode"):
        index.choose("t", 2, "medium", rng)
    with pytest.raises(ValueError, match="count"):
        index.choose("t", -1, "easy", rng)
    with pytest.raises(ValueError, match="pool"):
        index.choose("t", 2, "hard", rng, pool=0)
    with pytest.raises(ValueError, match="unique"):
        DistractorIndex(["a", "b", "a"], np.eye(3))
    with pytest.raises(ValueError, match="one row per name"):
        DistractorIndex(["a", "b"], np.eye(3))


def test_vectors_are_normalised_and_the_index_pickles(index):
    scaled = DistractorIndex(["a", "b"], np.array([[3.0, 0.0], [2.0, 2.0]]))
    assert scaled.similarity("a", "b") == pytest.approx(math.sqrt(0.5), abs=1e-6)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.names == index.names and len(copy) == len(index) and "t" in copy
    for seed in range(10):
        for mode in ("hard", "easy"):
            assert copy.choose("t", 3, mode, random.Random(seed), pool=5) == index.choose(
                "t", 3, mode, random.Random(seed), pool=5
            )
    # Unit rows load back bit for bit: normalising them again would move some last bits.
    vectors = np.random.default_rng(0).normal(size=(50, 16))
    names = [f"e{i}" for i in range(50)]
    original = DistractorIndex(names, vectors)
    loaded = pickle.loads(pickle.dumps(original))
    assert loaded.vectors.tobytes() == original.vectors.tobytes()
    assert [loaded.similarity("e0", n) for n in names] == [
        original.similarity("e0", n) for n in names
    ]


def test_distractors_module_imports_without_faiss():
    code = "import sys, groundforge.scenes.distractors\nprint('faiss' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- on colour histograms of generated flags ---------------------------------------------------

PALETTE = [
    (206, 17, 38),
    (0, 38, 84),
    (255, 255, 255),
    (0, 122, 61),
    (252, 209, 22),
    (0, 0, 0),
    (0, 114, 198),
    (255, 130, 0),
]


def tricolour(colors, vertical: bool, size=(90, 60)) -> bytes:
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for i, color in enumerate(colors):
        if vertical:
            draw.rectangle([i * width // 3, 0, (i + 1) * width // 3, height], fill=color)
        else:
            draw.rectangle([0, i * height // 3, width, (i + 1) * height // 3], fill=color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def flag_index() -> DistractorIndex:
    rng = random.Random(42)
    triples = list(itertools.permutations(range(len(PALETTE)), 3))
    chosen = rng.sample(triples, 60)
    images = [tricolour([PALETTE[c] for c in t], vertical=rng.random() < 0.5) for t in chosen]
    vectors = ColorHistogramEmbedder(bins=8).embed_images(images)
    return DistractorIndex([f"flag-{i:02d}" for i in range(len(images))], vectors)


def test_hard_picks_are_more_similar_than_easy_ones_on_flags(flag_index):
    hard_sims, easy_sims = [], []
    for i, target in enumerate(flag_index.names):
        hard = flag_index.choose(target, 3, "hard", random.Random(i))
        easy = flag_index.choose(target, 3, "easy", random.Random(i))
        hard_sims += [sim for _, sim in hard]
        easy_sims += [sim for _, sim in easy]
        # Nothing left out is more similar than the least similar hard pick (ties allowed).
        sims = flag_index.vectors @ flag_index.vectors[flag_index.names.index(target)]
        left_out = set(flag_index.names) - {target} - set(names_of(hard))
        worst_pick = min(sim for _, sim in hard)
        assert all(sims[flag_index.names.index(n)] <= worst_pick + 1e-6 for n in left_out)
    assert np.mean(hard_sims) > np.mean(easy_sims) + 0.3


# --- entity vectors ----------------------------------------------------------------------------


def test_entity_vectors_are_sorted_normalised_means():
    names = ["b", "a", "b", "c", "d", "d"]
    items = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.0, 0.0, 2.0],
            [0.0, 1.0, 0.0],
            [0.6, 0.8, 0.0],
            [1.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0],
        ]
    )
    entities, vectors = entity_vectors(names, items)
    assert entities == ["a", "b", "c", "d"]
    assert vectors.dtype == np.float32
    half = math.sqrt(0.5)
    np.testing.assert_allclose(
        vectors, [[0, 0, 1], [half, half, 0], [0.6, 0.8, 0], [0, 0, 0]], atol=1e-6
    )
    # Item order does not matter.
    order = [5, 3, 1, 0, 4, 2]
    again_names, again = entity_vectors([names[i] for i in order], items[order])
    assert again_names == entities
    np.testing.assert_allclose(again, vectors, atol=1e-6)
    # An entity whose items cancel out is similar to nothing.
    index = DistractorIndex(entities, vectors)
    assert index.similarity("d", "a") == 0.0
    assert names_of(index.neighbours("a", 2)) == ["b", "c"]


def test_entity_vectors_validate_and_handle_no_items():
    with pytest.raises(ValueError, match="one row per item"):
        entity_vectors(["a"], np.zeros((2, 3)))
    names, vectors = entity_vectors([], np.zeros((0, 4)))
    assert names == [] and vectors.shape == (0, 4)
