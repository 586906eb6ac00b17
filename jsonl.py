"""JSON Lines files of objects (metadata, URL lists, knowledge): one reader whose errors name the
file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_objects(
    lines: Iterable[str], origin: object, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; ``error`` says
    ``"<origin>, line N: ..."`` when a line is not JSON or not an object.

    >>> list(json_objects(['{"a": 1}', "", '{"b": 2}'], "m.jsonl"))
    [(1, {'a': 1}), (3, {'b': 2})]
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{origin}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not JSON ({err}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield number, row
