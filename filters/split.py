"""Which split a sample belongs to."""

from __future__ import annotations

import hashlib


def entity_bucket(entity: str, seed: str) -> float:
    """A stable number in [0, 1) for an entity name; the same name always lands in one bucket."""
    digest = hashlib.sha256(f"{seed}\x00{entity.strip().casefold()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def holdout_split(entity: str, val_fraction: float, seed: str, default: str = "sft") -> str:
    """``val`` for a stable ``val_fraction`` share of entities, else ``default``.

    Splitting by entity, not by image, keeps every image of a held-out entity out of training,
    so the val split measures generalisation to unseen entities.

    >>> holdout_split("Chad", 0.0, "s")
    'sft'
    >>> holdout_split("Chad", 0.999999, "s")
    'val'
    """
    return "val" if entity_bucket(entity, seed) < val_fraction else default
