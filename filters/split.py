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


def entity_split(
    entity: str,
    domain: str,
    val_fraction: float,
    seed: str,
    val_domains: tuple[str, ...] | list[str] = (),
    default: str = "sft",
) -> str:
    """The split of an entity: ``val`` for every entity of a held-out domain and for a stable
    ``val_fraction`` share of the others, else ``default``.

    >>> entity_split("Boeing 757", "aircraft", 0.0, "s", val_domains=["aircraft"])
    'val'
    """
    if domain in val_domains:
        return "val"
    return holdout_split(entity, val_fraction, seed, default)
