"""The bundled demo's entity names: written out per file, real names, one name per picture."""

from __future__ import annotations

import itertools
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from groundforge.examples import demo_recipe_path
from groundforge.pipelines.kvg import make_source
from groundforge.recipe import load_recipe

# What a name made from a file stem looks like: digits glued to a word ("Canada1"), a lone
# letter after a word ("Gijon Ast R"), an underscore, title-cased joining words ("Isle Of Man"),
# or a country prefix in front of a region ("Usa Texas", "France Alsace").
STEM_LIKE = (
    re.compile(r"[^\W\d_]\d|\d[^\W\d_]"),
    re.compile(r"\s[^\W\d_]$"),
    re.compile(r"_"),
    re.compile(r"\s(And|Of|The|De|Du|Di|La|Y)\s"),
    re.compile(
        r"^(Usa|Uk|Us|France|Germany|Spain|Canada|Australia|Belgium|Denmark|Finland)\s[A-Z]"
    ),
)
# Mean absolute difference (0..255) of two pictures at a common 32x24: the same picture saved
# twice is 0; El Salvador and Nicaragua, the closest distinct pair of the set, are 2.5 apart.
SAME_PICTURE = 1.0


@pytest.fixture(scope="module")
def demo_items():
    source = make_source(load_recipe(demo_recipe_path()))
    items = [item for part in source.partitions() for item in source.items(part)]
    return source, items


def test_every_listed_file_has_a_written_name(demo_items):
    source, items = demo_items
    named = source.metadata().by_path
    listed = {item.item_id for item in items}
    assert len(listed) > 300
    unnamed = sorted(rel for rel in listed if "entity" not in named.get(rel, {}))
    assert unnamed == []
    # A line for a file the recipe does not list is a stale name.
    assert sorted(set(named) - listed) == []
    for item in items:
        assert item.entity == named[item.item_id]["entity"]


def test_no_name_looks_like_a_file_stem(demo_items):
    _, items = demo_items
    stem_like = sorted({i.entity for i in items if any(p.search(i.entity) for p in STEM_LIKE)})
    assert stem_like == []
    assert all(i.entity == " ".join(i.entity.split()) and i.entity for i in items)


def _picture(path: str) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            # The one oversized file is skipped below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if image.width * image.height > 64_000_000:
                return None
            rgba = image.convert("RGBA")
    except Exception:  # the demo's broken files are not pictures
        return None
    ground = Image.new("RGBA", rgba.size, "white")
    ground.alpha_composite(rgba)
    small = ground.convert("RGB").resize((32, 24), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def test_one_picture_has_one_name(demo_items):
    _, items = demo_items
    pictures = [(i, p) for i in items if (p := _picture(i.location)) is not None]
    assert len(pictures) > 300
    stack = np.stack([p for _, p in pictures])
    same = []
    for i, (a, pa) in enumerate(pictures):
        close = np.abs(stack[i + 1 :] - pa).mean(axis=(1, 2, 3)) < SAME_PICTURE
        same += [
            (a.item_id, a.entity, b.item_id, b.entity)
            for (b, _) in itertools.compress(pictures[i + 1 :], close)
        ]
    # The folder holds the same picture under two file names more than once.
    assert len(same) >= 4
    assert [s for s in same if s[1] != s[3]] == []
