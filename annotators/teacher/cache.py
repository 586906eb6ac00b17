"""A persistent, content-addressed store of successful chat replies.

Entries are keyed by :func:`~groundforge.annotators.teacher.types.request_key` (a sha256 hex
digest) and live one small JSON file each under ``root/<first two hex chars>/<key>.json``. An
entry holds the reply text, its token counts and the item that first paid for it; never the
request's images, an API key or any header.

Writes go to a temporary file in the entry's folder and are renamed into place with
``os.replace``, which is atomic within one filesystem: several processes may write the same key at
once (the last rename wins, and both wrote the same kind of content), and a process killed
mid-write leaves at most a stray ``.*.tmp`` file, never a partial entry. Files are not fsynced: a
crash of the machine itself may leave a truncated entry, which reads as a miss and is overwritten
by the next successful reply.

The store is meant for a local filesystem (or one with atomic same-folder rename, such as a
shared POSIX volume); object stores such as ``gs://`` are not supported.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from groundforge.annotators.teacher.types import TeacherReply

_KEY = re.compile(r"[0-9a-f]{64}")
_FORMAT = 1


class ReplyCache:
    """Successful replies on disk, one JSON file per request key."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ReplyCache({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        # Keys become file names: refuse anything but a sha256 hex digest.
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"not a request key (64 lowercase hex characters): {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TeacherReply | None:
        """The stored reply (``cached=True``, ``attempts=0``), or None on a miss.

        A missing, unreadable or malformed entry is a miss.
        """
        path = self._path(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        if not _valid(entry, key):
            return None
        return TeacherReply(
            item_id=entry["item_id"],
            text=entry["text"],
            cached=True,
            attempts=0,
            prompt_tokens=entry.get("prompt_tokens"),
            completion_tokens=entry.get("completion_tokens"),
        )

    def put(self, key: str, reply: TeacherReply) -> None:
        """Store ``reply`` under ``key`` if it succeeded; failures are never cached."""
        if not reply.ok:
            return
        path = self._path(key)
        entry = {
            "format": _FORMAT,
            "key": key,
            "item_id": reply.item_id,
            "text": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        }
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_KEY.fullmatch(key)) and self.get(key) is not None

    def __len__(self) -> int:
        """The number of entry files (not validated; stray temporary files are not counted)."""
        count = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and len(folder.name) == 2:
                count += sum(
                    1 for p in folder.iterdir() if p.suffix == ".json" and _KEY.fullmatch(p.stem)
                )
        return count


def _valid(entry: object, key: str) -> bool:
    # The stored key guards against a file copied or renamed into the wrong place.
    if not isinstance(entry, dict) or entry.get("format") != _FORMAT or entry.get("key") != key:
        return False
    if not isinstance(entry.get("text"), str) or not isinstance(entry.get("item_id"), str):
        return False
    return all(
        entry.get(name) is None or (isinstance(entry[name], int) and entry[name] >= 0)
        for name in ("prompt_tokens", "completion_tokens")
    )
