"""Entity knowledge for teacher prompts: a short description and distinctive attributes per entity.

A knowledge file is YAML or JSONL (chosen by its suffix):

.. code-block:: yaml

    Boeing 757:
      description: A narrow-body twin-engine airliner.
      attributes: [long slender fuselage, tall landing gear]
    Airbus A321: The stretched member of the A320 family.   # description only

.. code-block:: json

    {"entity": "Boeing 757", "description": "...", "attributes": ["...", "..."]}

Lookups ignore case and surrounding whitespace, as entity names come from file names and dataset
labels written in assorted cases. Errors name the file and the line or key.

>>> kb = Knowledge({"Boeing 757": KnowledgeEntry("A twin-engine airliner.", ("long fuselage",))})
>>> kb.get("  boeing 757").description
'A twin-engine airliner.'
>>> kb.get("Airbus A321") is None
True
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

import yaml

from groundforge.jsonl import json_objects

YAML_SUFFIXES = (".yaml", ".yml")
JSONL_SUFFIXES = (".jsonl",)
_FIELDS = ("description", "attributes")


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used; the message names the file and the line or key."""


@dataclass(frozen=True)
class KnowledgeEntry:
    """What the teacher is told about one entity."""

    description: str = ""
    attributes: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.description or self.attributes)


def _key(entity: str) -> str:
    return " ".join(entity.split()).casefold()


class Knowledge(Mapping[str, KnowledgeEntry]):
    """Entries by entity name, looked up case-insensitively; iterates the names as written."""

    def __init__(self, entries: Mapping[str, KnowledgeEntry] | None = None) -> None:
        self._entries: dict[str, tuple[str, KnowledgeEntry]] = {}
        for name, entry in (entries or {}).items():
            key = _key(name)
            if key in self._entries:
                first = self._entries[key][0]
                raise KnowledgeError(f"entity {name!r} is given twice (also as {first!r})")
            self._entries[key] = (name, entry)

    def __getitem__(self, entity: str) -> KnowledgeEntry:
        return self._entries[_key(entity)][1]

    def __contains__(self, entity: object) -> bool:
        return isinstance(entity, str) and _key(entity) in self._entries

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entity: str, default: KnowledgeEntry | None = None) -> KnowledgeEntry | None:
        found = self._entries.get(_key(entity))
        return default if found is None else found[1]


def load_knowledge(path: str | os.PathLike) -> Knowledge:
    """Read a YAML (``.yaml``/``.yml``) or JSONL (``.jsonl``) knowledge file."""
    from groundforge.outputs.files import read_text

    path = str(path)
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in YAML_SUFFIXES + JSONL_SUFFIXES:
        raise KnowledgeError(
            f"{path}: unknown knowledge file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(YAML_SUFFIXES + JSONL_SUFFIXES)}"
        )
    try:
        text = read_text(path)  # through FileSystems: a knowledge file may live in a bucket
    except Exception as exc:
        raise KnowledgeError(f"{path}: cannot read knowledge file: {exc}") from exc
    if suffix in YAML_SUFFIXES:
        return _from_yaml(text, path)
    return _from_jsonl(text, path)


def _from_yaml(text: str, path: str) -> Knowledge:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise KnowledgeError(f"{path}{where}: invalid YAML: {exc}") from exc
    if data is None:
        return Knowledge()
    if not isinstance(data, dict):
        raise KnowledgeError(
            f"{path}: expected a mapping of entity -> description or "
            f"{{description, attributes}}, got {type(data).__name__}"
        )
    entries = {}
    for name, value in data.items():
        where = f"{path}: entity {name!r}"
        if not isinstance(name, str) or not name.strip():
            raise KnowledgeError(f"{where}: entity names must be non-empty text")
        if isinstance(value, str):
            value = {"description": value}
        entries[name.strip()] = _entry(value, where)
    return _collect(entries, path)


def _from_jsonl(text: str, path: str) -> Knowledge:
    entries: dict[str, KnowledgeEntry] = {}
    lines: dict[str, int] = {}
    for number, row in json_objects(text.splitlines(), path, KnowledgeError):
        where = f"{path}, line {number}"
        name = row.pop("entity", None)
        if not isinstance(name, str) or not name.strip():
            raise KnowledgeError(f'{where}: needs a non-empty "entity" string')
        name = name.strip()
        if _key(name) in lines:
            raise KnowledgeError(
                f"{where}: entity {name!r} is given twice (first on line {lines[_key(name)]})"
            )
        lines[_key(name)] = number
        entries[name] = _entry(row, f"{where}: entity {name!r}")
    return _collect(entries, path)


def _collect(entries: dict[str, KnowledgeEntry], path: str) -> Knowledge:
    try:
        return Knowledge(entries)
    except KnowledgeError as exc:
        raise KnowledgeError(f"{path}: {exc}") from None


def _entry(value: object, where: str) -> KnowledgeEntry:
    if not isinstance(value, dict):
        raise KnowledgeError(
            f"{where}: expected a description string or a mapping with "
            f"{' and/or '.join(_FIELDS)}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise KnowledgeError(
            f"{where}: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(_FIELDS)}"
        )
    description = value.get("description") or ""
    if not isinstance(description, str):
        raise KnowledgeError(f"{where}: description must be text")
    attributes = value.get("attributes") or []
    if isinstance(attributes, str) or not isinstance(attributes, list):
        raise KnowledgeError(f"{where}: attributes must be a list of short texts")
    # YAML reads bare numbers and years as numbers; they are still attribute text.
    if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in attributes):
        raise KnowledgeError(f"{where}: each attribute must be a short text")
    cleaned = tuple(str(a).strip() for a in attributes if str(a).strip())
    return KnowledgeEntry(description.strip(), cleaned)
