"""``manifest.json``: what a run produced and how, enough to check and reproduce it."""

from __future__ import annotations

import json
import platform
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from groundforge import __version__
from groundforge.outputs.cost import cost_section
from groundforge.outputs.files import file_sha256, read_text, write_text
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
    cost: dict[str, Any] | None = None,
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
        "cost": cost or cost_section({}, {}, sum(splits.values())),
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


class BrokenRun(ValueError):
    """A folder that is not a complete run: no manifest, a damaged one, or missing shards."""


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest at ``path``; a file that is not JSON is an error naming it."""
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        raise BrokenRun(
            f"{path} is damaged ({err}); rebuild the run with `groundforge run RECIPE --out "
            f"{folder} --force`"
        ) from None


def check_run(run_dir: str, contents: bool = True, verify: bool = True) -> dict[str, Any]:
    """The manifest of the finished run in ``run_dir``, after checking that every file it lists
    is there (with ``contents``, of the recorded size; with ``verify`` too, of the recorded
    sha256). Raises :class:`BrokenRun` naming the first file that is not."""
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(run_dir, "manifest.json")
    if not FileSystems.exists(path):
        raise BrokenRun(f"{path} does not exist: is {run_dir} the --out folder of a finished run?")
    manifest = read_manifest(path)
    keys = manifest if isinstance(manifest, dict) else {}
    missing = [k for k in ("format", "samples", "shards", "rejections") if k not in keys]
    if missing:
        raise BrokenRun(f"{path} is not a groundforge run manifest (it lacks {', '.join(missing)})")
    listed = [(s["path"], s.get("bytes"), s.get("sha256")) for s in manifest["shards"]]
    listed.append((manifest["rejections"].get("path", REJECTIONS_FILE), None, None))
    for rel, size, sha in listed:
        file = FileSystems.join(run_dir, rel)
        found = FileSystems.match([file])[0].metadata_list
        if not found:
            raise BrokenRun(f"{file} is missing ({path} lists it); run the recipe again")
        if contents and size is not None and found[0].size_in_bytes != size:
            raise BrokenRun(
                f"{file} has {found[0].size_in_bytes} bytes, {path} says {size}: the file is "
                "damaged; run the recipe again"
            )
        if contents and verify and sha is not None and file_sha256(file)[0] != sha:
            raise BrokenRun(
                f"{file} does not match its sha256 in {path}: the file is damaged; run the "
                "recipe again"
            )
    return manifest
