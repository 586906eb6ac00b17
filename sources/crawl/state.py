"""Resumable crawl state: one SQLite row per URL in ``DIR/crawl.sqlite``.

Each URL is ``pending`` until fetched, then ``done`` (stored, or the same bytes as a stored
image), ``failed`` (network or HTTP trouble, retried by the next run), ``robots`` (disallowed by
robots.txt) or ``refused`` (a safety rule, or an answer that fetching again would not change:
private address, invalid URL, too large, not an image; see :func:`status_for`). A rerun skips
``done``, ``robots`` and ``refused`` URLs, and with ``retry_failed`` only ``done`` ones. Every
change is committed at once in WAL mode, so a killed crawl loses at most the URLs it was
fetching.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

STATUSES = ("pending", "done", "failed", "robots", "refused")
FINAL = frozenset({"done", "robots", "refused"})
# Fetch failures about the URL or its bytes rather than the network: recorded as ``refused``.
# A 404 or 410 and a redirect chain that loops or runs too long are answers the server gives
# again on the next crawl; ``--retry-failed`` asks anyway.
FINAL_REASONS = frozenset(
    {
        "invalid_url",
        "too_large",
        "not_an_image",
        "decode_error",
        "too_many_pixels",
        "bad_encoding",
        "http_404",
        "http_410",
        "redirect_loop",
        "too_many_redirects",
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,
    entity TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'robots', 'refused')),
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
)
"""


def now() -> str:
    """The current UTC time as ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def status_for(outcome: str, reason: str) -> str:
    """The status recorded for a fetch that did not succeed, from its outcome and reason."""
    if outcome == "failed" and reason in FINAL_REASONS:
        return "refused"
    return outcome


class CrawlState:
    """The URL table of one crawl folder; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Autocommit: every statement is its own transaction, committed before the call returns.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (only a power cut can lose a commit).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(_SCHEMA)

    def __enter__(self) -> CrawlState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (every change is already committed)."""
        self._db.close()

    def claim(self, url: str, entity: str, retry_failed: bool = False) -> str:
        """Record ``url`` for ``entity`` (``pending`` when new) and return its status.

        A URL not yet finished takes the entity given now; a finished one keeps its row. With
        ``retry_failed`` only ``done`` counts as finished.
        """
        finished = ("done",) if retry_failed else tuple(sorted(FINAL))
        marks = ", ".join("?" * len(finished))
        self._db.execute(
            "INSERT INTO urls (url, entity, status, updated_at) VALUES (?, ?, 'pending', ?) "
            "ON CONFLICT(url) DO UPDATE SET entity = excluded.entity "
            f"WHERE status NOT IN ({marks})",
            (url, entity, now(), *finished),
        )
        return self._db.execute("SELECT status FROM urls WHERE url = ?", (url,)).fetchone()[0]

    def finish(
        self,
        url: str,
        status: str,
        reason: str = "",
        detail: str = "",
        sha256: str | None = None,
        attempts: int = 1,
    ) -> None:
        """Record the outcome of fetching ``url``; ``attempts`` adds to the URL's total."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._db.execute(
            "UPDATE urls SET status = ?, reason = ?, detail = ?, sha256 = ?, "
            "attempts = attempts + ?, updated_at = ? WHERE url = ?",
            (status, reason, detail, sha256, attempts, now(), url),
        )

    def get(self, url: str) -> dict | None:
        """The row of ``url`` as a dict, or None."""
        cursor = self._db.execute("SELECT * FROM urls WHERE url = ?", (url,))
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cursor.description], row, strict=True))

    def counts(self) -> Counter[str]:
        """Number of URLs by status."""
        return Counter(
            dict(self._db.execute("SELECT status, COUNT(*) FROM urls GROUP BY status").fetchall())
        )
