"""``manifest.json``: what a run produced and how, enough to check and reproduce it."""

from __future__ import annotations

import json
import platform
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from groundforge import __version__
from groundforge.outputs.files import read_text, write_text
from groundforge.outputs.rejections import REJECTIONS_FILE
from groundforge.outputs.shards import ShardFile

TRACKED_PACKAGES = (
    "apache-beam",
    "pyarrow",
    "datasets",
    "transformers",
    "torch",
    "pillow",
    "numpy",
    "pydantic",
)


def package_versions() -> dict[str, str]:
    versions = {"groundforge": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


def build_manifest(
    *,
    recipe: dict[str, Any],
    recipe_hash: str,
    funnel: list[dict[str, Any]],
    shards: list[ShardFile],
    out_dir: str,
    fmt: str,
    rejection_reasons: Counter,
    runner: dict[str, Any],
    models: dict[str, Any] | None = None,
    timing: dict[str, Any] | None = None,
    provenance: dict[str, dict[str, int]] | None = None,
    aliases: dict[str, list[str]] | None = None,
    instances: dict[str, Any] | None = None,
) -> dict[str, Any]:
    splits: Counter = Counter()
    for s in shards:
        splits[s.split] += s.rows
    return {
        "groundforge_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_hash": recipe_hash,
        "format": fmt,
        "samples": sum(splits.values()),
        "splits": dict(sorted(splits.items())),
        "stages": funnel,
        "models": models or {},
        "timing": timing or {},
        "provenance": provenance or {"licenses": {}, "sources": {}},
        "aliases": aliases or {},
        **({"instances": instances} if instances is not None else {}),
        "rejections": {
            "path": REJECTIONS_FILE,
            "rows": sum(rejection_reasons.values()),
            "by_reason": dict(sorted(rejection_reasons.items())),
        },
        "shards": [
            {
                "split": s.split,
                "path": _relative(s.path, out_dir),
                "rows": s.rows,
                "bytes": s.bytes,
                "sha256": s.sha256,
            }
            for s in shards
        ],
        "runner": runner,
        "recipe": recipe,
        "versions": package_versions(),
    }


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(path: str) -> dict[str, Any]:
    return json.loads(read_text(path))
