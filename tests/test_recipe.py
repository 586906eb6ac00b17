from pathlib import Path

import pytest

from groundforge.examples import demo_recipe_path
from groundforge.recipe import RecipeError, load_recipe, parse_recipe

MINIMAL = {"name": "r", "domain": "flag", "source": {"kind": "image_folder", "path": "imgs"}}


def test_demo_recipe_loads_and_resolves_paths():
    r = load_recipe(demo_recipe_path())
    assert Path(r.source.path).is_dir()
    assert Path(r.source.path) == demo_recipe_path().parent / "data" / "flags"
    assert r.source.rename == {}  # names are written out in data/flags/metadata.jsonl


def test_relative_path_resolves_against_recipe_folder(tmp_path):
    r = parse_recipe(MINIMAL, tmp_path)
    assert r.source.path == str((tmp_path / "imgs").resolve())


def test_digest_changes_with_any_setting(tmp_path):
    a = parse_recipe(MINIMAL, tmp_path)
    b = parse_recipe({**MINIMAL, "split": {"val_fraction": 0.2}}, tmp_path)
    assert a.digest() == parse_recipe(MINIMAL, tmp_path).digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"boxes": {"method": "detector"}}, "boxes"),
        ({"boxes": {"methd": "foreground"}}, "boxes.methd"),
        ({"split": {"val_fraction": 1.5}}, "split.val_fraction"),
        ({"samples": {"question_template": "no slot"}}, "samples"),
        ({"source": {"kind": "ftp", "path": "x"}}, "source"),
        ({"boxes": {"method": "foreground", "agree_with": "foreground"}}, "boxes"),
        ({"student": {"model": "m", "k": 4, "temperature": 0}}, "student"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, patch, field):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**MINIMAL, **patch}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_every_bundled_recipe_is_valid():
    recipes = sorted(demo_recipe_path().parent.glob("*.yaml"))
    names = [p.name for p in recipes]
    assert "flags.yaml" in names and "flags-teacher.yaml" in names
    for path in recipes:
        if path.name.endswith("-knowledge.yaml") or path.name == "categories.yaml":
            continue  # not recipes: a knowledge-probe config and eval's seen / unseen file
        recipe = load_recipe(path)
        assert Path(recipe.source.path).is_dir(), path
    teacher = load_recipe(demo_recipe_path().parent / "flags-teacher.yaml").teacher
    assert Path(teacher.knowledge).is_file()
