"""The alias table: entities whose every image was a copy of another entity's."""

from __future__ import annotations

import json

from groundforge.pipelines.aliases import alias_of, resolve_aliases, twin_entities
from groundforge.schemas.records import Rejection


def dropped(entity: str, reason: str, **detail) -> Rejection:
    return Rejection("id", "dedup", reason, json.dumps(detail), "path", "", entity)


def test_only_duplicates_of_another_entity_name_a_twin():
    assert twin_entities(dropped("Tchad", "duplicate_exact", kept_entity="Chad")) == [
        ("Tchad", "Chad")
    ]
    assert twin_entities(dropped("Chad", "duplicate_layout", kept_entity="Chad")) == []
    assert twin_entities(dropped("Chad", "duplicate_exact")) == []
    assert twin_entities(dropped("Chad", "too_small", kept_entity="Mali")) == []
    assert twin_entities(dropped("", "duplicate_exact", kept_entity="Mali")) == []


def test_an_entity_is_an_alias_only_when_nothing_of_its_own_is_left():
    assert alias_of(0, {"Chad": 2, "Romania": 1}) == "Chad"
    assert alias_of(0, {"Romania": 1, "Chad": 1}) == "Chad"  # a tie goes to the first name
    assert alias_of(1, {"Chad": 5}) is None
    assert alias_of(0, {}) is None


def test_chains_end_at_an_entity_that_kept_its_images():
    assert resolve_aliases({"B": "A", "C": "B", "E": "D"}) == {"A": ["B", "C"], "D": ["E"]}
    assert resolve_aliases({}) == {}
    # A cycle cannot come from one run (a twin's image was kept), and does not hang.
    assert set(resolve_aliases({"A": "B", "B": "A"})) <= {"A", "B"}
