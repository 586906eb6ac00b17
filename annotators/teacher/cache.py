"""A persistent, content-addressed store of successful chat replies.

Entries are keyed by :func:`~groundforge.annotators.teacher.types.request_key` (a sha256 hex
digest) and live one small JSON file each under ``root/<first two hex chars>/<key>.json``. An
entry holds the reply text, its token counts and the item that first paid for it; never the
request's images, an API key or any header.

``root`` is any Beam ``FileSystems`` path: a local folder, ``gs://`` or ``s3://`` (a run's
pipeline options say how to reach the bucket). Every entry is written all-or-nothing
(:func:`groundforge.outputs.files.atomic_create`): on a local disk through a temporary file in
the entry's folder renamed into place, on an object store in one upload that only becomes
visible when it is closed. Several processes may write the same key at once: the key is the
content's address, so whichever write lands last holds the same kind of content. A process
killed mid-write leaves at most a stray ``*.tmp`` file on a local disk (an unfinished upload on
an object store), never a partial entry. Files are not fsynced: a crash of the machine itself
may leave a truncated entry, which reads as a miss and is overwritten by the next successful
reply.
"""

from __future__ import annotations

import json
import os
import re

from apache_beam.io.filesystems import FileSystems

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.outputs.files import atomic_create, is_local, list_files, read_bytes

_KEY = re.compile(r"[0-9a-f]{64}")
_ENTRY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})\.json")
_FORMAT = 1


class ReplyCache:
    """Successful replies in a folder or bucket, one JSON file per request key."""

    def __init__(self, root: str | os.PathLike[str]):
        root = os.fspath(root)
        # Listing gives absolute local paths; the root must match them.
        self.root = os.path.abspath(root) if is_local(root) else root

    def __repr__(self) -> str:
        return f"ReplyCache({self.root!r})"

    def _path(self, key: str) -> str:
        # Keys become file names: refuse anything but a sha256 hex digest.
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"not a request key (64 lowercase hex characters): {key!r}")
        return FileSystems.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> TeacherReply | None:
        """The stored reply (``cached=True``, ``attempts=0``), or None on a miss.

        A missing, unreadable or malformed entry is a miss.
        """
        path = self._path(key)
        try:
            entry = json.loads(read_bytes(path))
        except Exception:
            # Each filesystem raises its own errors for a missing or unreadable object; any of
            # them costs a request, never the answer.
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
        """Store ``reply`` under ``key`` if it succeeded; failures are never cached.

        Raises ``OSError`` when the entry cannot be written (callers log it and go on).
        """
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
        data = json.dumps(entry).encode("utf-8")
        try:
            with atomic_create(path, "application/json") as fh:
                fh.write(data)
        except OSError:
            raise
        except Exception as exc:
            # Object-store clients raise their own types (botocore's, google.api_core's).
            raise OSError(f"could not write {path}: {type(exc).__name__}: {exc}") from exc

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_KEY.fullmatch(key)) and self.get(key) is not None

    def __len__(self) -> int:
        """The number of entry files (not validated; temporary files are not counted)."""
        prefix = self.root.rstrip("/") + "/"
        count = 0
        for path in list_files(FileSystems.join(self.root, "*", "*.json")):
            m = _ENTRY.fullmatch(path[len(prefix) :]) if path.startswith(prefix) else None
            count += bool(m and m.group(2).startswith(m.group(1)))
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
