"""Which evaluation categories count as *seen* (trained on) and which as *unseen*.

``groundforge eval`` reports Acc@0.5 and mean IoU for the seen, the unseen and all items. The
split comes from one of three places, and the report says which (:attr:`SeenUnseen.source`):

- **a categories file** (``--categories FILE``, YAML or JSON)::

      seen: [aircraft, bird, flag]        # categories the model was trained on
      unseen: [dog, flower]               # categories it never saw
      map:                                # optional: a run's domain or entity -> its category
        airliner: aircraft
        Flag of Chad: flag

  An item's category is ``map[entity]``, else ``map[domain]``, else its own category (the
  benchmark's ``category`` column, a shard sample's ``domain``). Unknown keys, a category in
  both lists, an empty name or a file that marks nothing are errors naming the file and field.
- **KVG-Bench's published split** (:data:`~groundforge.trainer.kvgbench_score.SEEN_CATEGORIES`
  and ``UNSEEN_CATEGORIES``), the default for ``--bench``;
- **the run itself**, the default for a run's shards (:func:`run_split`): the recipe in its
  ``manifest.json`` holds out every entity of the domains in ``split.val_domains`` (unseen) and
  trains on the other domains (seen; their ``val`` items are held-out entities of a trained
  domain). A training split (``sft``, ``grpo``) is seen throughout. A shards folder without a
  manifest (or a manifest without the recipe's split) cannot say: both rows stay empty and the
  report names ``--categories``.

:func:`explain` adds the reasons a seen or unseen row is empty and the categories that count in
``all`` only, so an empty row is never a silent one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from groundforge.trainer.kvgbench_score import SEEN_CATEGORIES, UNSEEN_CATEGORIES
from groundforge.yamlfile import describe_errors, read_yaml

TRAINING_SPLITS = ("sft", "grpo")
_FIX = "give --categories FILE (seen: [...], unseen: [...]) to fill them"

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class CategoriesError(ValueError):
    """A categories file that cannot be used; the message names the file and the field."""


class CategoriesFile(BaseModel):
    """The fields of a categories file (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seen: list[Name] = Field(default_factory=list)
    unseen: list[Name] = Field(default_factory=list)
    map: dict[Name, Name] = Field(default_factory=dict)


@dataclass(frozen=True)
class SeenUnseen:
    """The seen and unseen categories, the ``mapping`` that puts an item in a category, and
    ``source``: one line saying where the split came from."""

    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    source: str
    mapping: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    def category_of(self, category: str, entity: str = "") -> str:
        """The category an item is scored under: its entity's, else its own one's mapping,
        else its own."""
        return self.mapping.get(entity.strip()) or self.mapping.get(category) or category

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": list(self.seen),
            "unseen": list(self.unseen),
            "source": self.source,
            "map": dict(self.mapping),
        }


def kvg_bench_split() -> SeenUnseen:
    """KVG-Bench's published split: five seen and five unseen domains."""
    return SeenUnseen(SEEN_CATEGORIES, UNSEEN_CATEGORIES, "KVG-Bench's published split")


def load_categories(path: str | os.PathLike) -> SeenUnseen:
    """Read and check a categories file (YAML or JSON, see the module doc)."""
    path = Path(path)
    data = read_yaml(path, CategoriesError, "categories file")
    if not isinstance(data, dict):
        raise CategoriesError(
            f"{path}: a categories file is a mapping with seen: [...] and unseen: [...], "
            f"got {type(data).__name__}"
        )
    try:
        parsed = CategoriesFile.model_validate(data)
    except ValidationError as err:
        raise CategoriesError(f"{path}: invalid categories file\n{describe_errors(err)}") from None
    if not parsed.seen and not parsed.unseen:
        raise CategoriesError(f"{path}: seen and unseen are both empty: list at least one category")
    for name in ("seen", "unseen"):
        values = getattr(parsed, name)
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise CategoriesError(f"{path}: {name}: listed more than once: {', '.join(twice)}")
    both = sorted(set(parsed.seen) & set(parsed.unseen))
    if both:
        raise CategoriesError(
            f"{path}: seen and unseen both list {', '.join(both)}: a category is one or the other"
        )
    return SeenUnseen(
        tuple(parsed.seen),
        tuple(parsed.unseen),
        f"the categories file {path}",
        dict(parsed.map),
        str(path),
    )


def manifest_path(shards_dir: str) -> str | None:
    """The ``manifest.json`` of the run a shards folder belongs to (the folder itself or its
    parent when it is a run's ``shards/``), or ``None``."""
    from apache_beam.io.filesystems import FileSystems

    root = shards_dir.rstrip("/")
    candidates = [FileSystems.join(root, "manifest.json")]
    head, tail = FileSystems.split(root)
    if tail == "shards" and head:
        candidates.append(FileSystems.join(head, "manifest.json"))
    return next((c for c in candidates if FileSystems.exists(c)), None)


def run_split(shards_dir: str | os.PathLike, split: str, categories: Iterable[str]) -> SeenUnseen:
    """Seen / unseen of the evaluated ``categories`` of one ``split`` of a run's shards, from
    the run's manifest (see the module doc); both empty, with the reason in ``source``, when the
    run cannot tell."""
    from groundforge.outputs.manifest import read_manifest

    shards_dir = os.fspath(shards_dir)
    evaluated = sorted(set(categories))
    path = manifest_path(shards_dir)
    if path is None:
        return SeenUnseen((), (), f"unknown: {shards_dir} has no manifest.json to tell")
    manifest = read_manifest(path)
    recipe = manifest.get("recipe") if isinstance(manifest, dict) else None
    holdout = recipe.get("split") if isinstance(recipe, dict) else None
    if not isinstance(holdout, dict):
        return SeenUnseen((), (), f"unknown: {path} records no recipe split")
    if split in TRAINING_SPLITS:
        return SeenUnseen(
            tuple(evaluated), (), f"{path}: split {split} is training data, so every item is seen"
        )
    held_out = [str(d) for d in holdout.get("val_domains") or []]
    unseen = tuple(c for c in evaluated if c in held_out)
    counts = manifest.get("splits") or {}
    trained = sum(int(counts.get(s, 0)) for s in TRAINING_SPLITS)
    if held_out:
        rule = f"split.val_domains ({', '.join(held_out)}) are unseen"
        what = "the other domains are trained on (their val items are held-out entities)"
    else:
        rule = "the recipe holds out no domain (split.val_domains is empty)"
        what = "every domain is trained on (its val items are held-out entities)"
    seen = tuple(c for c in evaluated if c not in held_out)
    if not trained:
        seen, what = (), "the run has no training samples, so nothing is seen"
    return SeenUnseen(seen, unseen, f"{path}: {rule}; {what}")


def explain(split: SeenUnseen, categories: Sequence[str]) -> list[str]:
    """Lines for the report: why the seen or unseen row is empty, and which evaluated
    categories are in neither list (they count in ``all`` only)."""
    present = set(categories)
    fix = f"list categories under seen / unseen in {split.path}" if split.path else _FIX
    if not split.seen and not split.unseen:
        return [f"the seen and unseen rows are empty; {fix}"]
    notes = []
    for name in ("seen", "unseen"):
        listed = getattr(split, name)
        if not present & set(listed):
            why = f"no evaluated category is among {', '.join(listed)}"
            if not listed:
                why = f"no category is marked {name}"
            notes.append(f"the {name} row is empty: {why}; {fix}")
    neither = sorted(present - set(split.seen) - set(split.unseen))
    if neither:
        notes.append(f"in neither seen nor unseen (counted in all only): {', '.join(neither)}")
    return notes
