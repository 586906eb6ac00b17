"""A crawl: candidates from the adapters, fetched politely, stored as an image folder.

The output folder ``DIR`` is an image folder the ``image_folder`` source reads as it is::

    DIR/
      images/<entity folder>/<sha256>.<ext>   one file per distinct image (name from its bytes)
      metadata.jsonl                          one line per stored image: path (relative to DIR),
                                              entity, domain, url, license, author, source_page,
                                              sha256, width, height, mime, fetched_at
      crawl.sqlite                            the state of every URL (see state.py)

A recipe's ``source: {kind: image_folder, path: DIR}`` then gives every image its entity, licence,
author and URL. The same bytes reached through two URLs are stored once, under the entity of the
first; the second URL is marked done with reason ``duplicate``.

Candidates are listed (the manifest first, then Commons, entity by entity) while earlier ones are
being fetched, at most ``concurrency`` at a time; per-host limits, robots.txt and the safety
rules are the Fetcher's.

A rerun skips URLs that are finished (``done``, ``robots``, ``refused``) and retries ``failed``
ones; with ``retry_failed`` it fetches every URL that is not ``done``. Images are written under
a hidden temporary name and renamed into place, the metadata line is appended next, and the URL
is marked done last; a crawl stopped at any point (Ctrl-C or a killed process) therefore leaves
no partial file in sight, and the rerun completes what was missing without writing any image or
metadata line twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from groundforge.sources.crawl.commons import CommonsAdapter
from groundforge.sources.crawl.entities import Candidate, CrawlConfig, load_crawl_config
from groundforge.sources.crawl.fetch import Fetcher, FetchResult
from groundforge.sources.crawl.manifest import read_manifest
from groundforge.sources.crawl.state import FINAL, CrawlState, now, status_for
from groundforge.sources.image_folder import METADATA_FILE

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
STATE_FILE = "crawl.sqlite"
LOCK_FILE = ".crawl.lock"
PART_SUFFIX = ".part"

Progress = Callable[[int, int], None]


class CrawlBusyError(RuntimeError):
    """Another crawl is writing to the same folder."""


@dataclass
class CrawlSummary:
    """What one crawl did.

    ``listed``: candidate URLs this run; ``skipped``: those an earlier run finished; ``fetched``:
    images stored now; ``duplicates``: fetched, but the same bytes as an image already stored;
    ``outcomes`` and ``reasons``: fetch outcomes (``ok``, ``robots``, ``refused``, ``failed``)
    and their reasons; ``source_skipped``: files the adapters left out by reason
    (``license``, ``mime``, ``missing``, ``duplicate_url``, ``over_limit``); ``source_errors``:
    listing queries that failed; ``images``: images in the folder afterwards.
    """

    out_dir: str
    domain: str = ""
    listed: int = 0
    skipped: int = 0
    fetched: int = 0
    duplicates: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)
    source_skipped: Counter[str] = field(default_factory=Counter)
    source_errors: list[str] = field(default_factory=list)
    images: int = 0
    interrupted: bool = False

    @property
    def images_dir(self) -> str:
        """The folder holding one sub-folder of images per entity."""
        return os.path.join(self.out_dir, IMAGES_DIR)

    @property
    def metadata_path(self) -> str:
        """The ``metadata.jsonl`` the image-folder source reads."""
        return os.path.join(self.out_dir, METADATA_FILE)


class CrawlInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_crawl`; ``summary`` counts what was finished."""

    def __init__(self, summary: CrawlSummary):
        super().__init__("crawl interrupted")
        self.summary = summary


@dataclass(frozen=True)
class _Stored:
    path: str
    url: str


class ImageStore:
    """The images and ``metadata.jsonl`` of a crawl folder, deduplicated by content hash."""

    def __init__(self, out_dir: str | Path, domain: str, folders: dict[str, str]):
        self.root = Path(out_dir)
        self.domain = domain
        self.folders = folders
        (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.metadata_path = self.root / METADATA_FILE
        for part in (self.root / IMAGES_DIR).rglob(f".*{PART_SUFFIX}"):
            part.unlink()
        self.by_sha = self._load()
        self._fh = open(self.metadata_path, "a", encoding="utf-8")

    def close(self) -> None:
        """Close ``metadata.jsonl`` (every line is already flushed)."""
        self._fh.close()

    def _load(self) -> dict[str, _Stored]:
        if not self.metadata_path.exists():
            return {}
        with open(self.metadata_path, "rb+") as fh:
            data = fh.read()
            # A process killed while appending leaves a line without its newline: drop it; its
            # URL is not done yet, so the rerun fetches it again and writes the line anew.
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                fh.truncate(complete)
        stored = {}
        for lineno, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.metadata_path}, line {lineno}: not JSON ({err})") from None
            if isinstance(entry, dict) and entry.get("sha256") and entry.get("path"):
                stored[entry["sha256"]] = _Stored(entry["path"], entry.get("url", ""))
        return stored

    def store(self, candidate: Candidate, result: FetchResult) -> tuple[str, bool]:
        """Write a fetched image unless its bytes are stored already; returns its path relative
        to the folder and whether it is a duplicate of another URL's image."""
        known = self.by_sha.get(result.sha256)
        if known is not None:
            if not (self.root / known.path).exists():
                self._write(self.root / known.path, result.data)
            return known.path, known.url != candidate.url
        rel = f"{IMAGES_DIR}/{self.folders[candidate.entity]}/{result.sha256}.{result.ext}"
        self._write(self.root / rel, result.data)
        line = {
            "path": rel,
            "entity": candidate.entity,
            "domain": self.domain,
            "url": candidate.url,
            "license": candidate.license or None,
            "author": candidate.author or None,
            "source_page": candidate.source_page or None,
            "sha256": result.sha256,
            "width": result.width,
            "height": result.height,
            "mime": result.mime,
            "fetched_at": now(),
        }
        self._fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.by_sha[result.sha256] = _Stored(rel, candidate.url)
        return rel, False

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}{PART_SUFFIX}")
        part.write_bytes(data)
        os.replace(part, path)


class Crawl:
    """One crawl of ``config`` into ``out_dir``; :attr:`summary` is filled as it goes, so it is
    complete up to the point where a cancelled crawl stopped."""

    def __init__(
        self,
        config: CrawlConfig,
        out_dir: str | Path,
        progress: Progress | None = None,
        limit: int | None = None,
        retry_failed: bool = False,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.limit = limit
        self.retry_failed = retry_failed
        self.summary = CrawlSummary(out_dir=str(self.out_dir), domain=config.domain)
        self._total = 0
        self._done = 0

    async def run(self) -> CrawlSummary:
        """Crawl until every candidate is finished; returns :attr:`summary`."""
        config = self.config
        # A bad manifest fails before anything is created or fetched.
        manifest = read_manifest(config.manifest, config.entity_names()) if config.manifest else []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CrawlBusyError(
                    f"{self.out_dir}: another crawl is writing to this folder"
                ) from None
            store = ImageStore(self.out_dir, config.domain, config.folders())
            try:
                with CrawlState(self.out_dir / STATE_FILE) as state:
                    async with Fetcher(config.fetch) as fetcher:
                        await self._crawl(manifest, fetcher, state, store)
            finally:
                store.close()
                self.summary.images = len(store.by_sha)
        return self.summary

    async def _crawl(
        self, manifest: list[Candidate], fetcher: Fetcher, state: CrawlState, store: ImageStore
    ) -> None:
        queue: asyncio.Queue[Candidate | None] = asyncio.Queue(self.config.concurrency * 2)
        workers = self.config.concurrency
        tasks = [asyncio.create_task(self._produce(manifest, fetcher, state, queue, workers))]
        tasks += [
            asyncio.create_task(self._work(fetcher, state, store, queue)) for _ in range(workers)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _candidates(self, manifest: list[Candidate], fetcher: Fetcher, counts: Counter):
        for candidate in manifest:
            yield candidate
        commons = self.config.commons
        if commons is None:
            return
        # Wikimedia's robots.txt disallows /w/ (where api.php lives) to page crawlers; the API is
        # meant for programs, under its own etiquette (a User-Agent with a contact, a slow pace).
        adapter = CommonsAdapter(commons, partial(fetcher.get_json, robots=False))
        try:
            for entity in self.config.entities:
                room = None if self.limit is None else self.limit - counts[entity.name]
                if room is not None and room <= 0:
                    continue
                async with aclosing(adapter.entity_candidates(entity, room)) as found:
                    async for candidate in found:
                        yield candidate
        finally:
            self.summary.source_skipped.update(adapter.skipped)
            self.summary.source_errors.extend(adapter.errors)

    async def _produce(
        self,
        manifest: list[Candidate],
        fetcher: Fetcher,
        state: CrawlState,
        queue: asyncio.Queue,
        workers: int,
    ) -> None:
        seen: set[str] = set()
        counts: Counter[str] = Counter()
        async with aclosing(self._candidates(manifest, fetcher, counts)) as candidates:
            async for candidate in candidates:
                if candidate.url in seen:
                    self.summary.source_skipped["duplicate_url"] += 1
                    continue
                if self.limit is not None and counts[candidate.entity] >= self.limit:
                    self.summary.source_skipped["over_limit"] += 1
                    continue
                seen.add(candidate.url)
                counts[candidate.entity] += 1
                self.summary.listed += 1
                status = state.claim(candidate.url, candidate.entity, self.retry_failed)
                if status == "done" or (status in FINAL and not self.retry_failed):
                    self.summary.skipped += 1
                    continue
                self._total += 1
                self._report()
                await queue.put(candidate)
        for _ in range(workers):
            await queue.put(None)

    async def _work(
        self, fetcher: Fetcher, state: CrawlState, store: ImageStore, queue: asyncio.Queue
    ) -> None:
        while (candidate := await queue.get()) is not None:
            result = await fetcher.fetch_image(candidate.url)
            # Nothing below awaits: a cancellation cannot separate the file, its metadata line
            # and the state update.
            self._record(candidate, result, state, store)
            self._done += 1
            self._report()

    def _record(
        self, candidate: Candidate, result: FetchResult, state: CrawlState, store: ImageStore
    ) -> None:
        summary = self.summary
        summary.outcomes[result.outcome] += 1
        if result.outcome != "ok":
            summary.reasons.setdefault(result.outcome, Counter())[result.reason] += 1
            log.info("%s %s: %s %s", result.outcome, candidate.url, result.reason, result.detail)
            state.finish(
                candidate.url,
                status_for(result.outcome, result.reason),
                result.reason,
                result.detail,
                attempts=result.attempts,
            )
            return
        path, duplicate = store.store(candidate, result)
        if duplicate:
            summary.duplicates += 1
        else:
            summary.fetched += 1
        state.finish(
            candidate.url,
            "done",
            "duplicate" if duplicate else "",
            f"same bytes as {path}" if duplicate else path,
            sha256=result.sha256,
            attempts=result.attempts,
        )

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self._done, self._total)


async def crawl(
    config: CrawlConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
) -> CrawlSummary:
    """Crawl the images of ``config`` into ``out_dir`` (layout in the module docstring).

    ``progress(done, total)`` is called as URLs are listed and finished; ``limit`` caps the URLs
    per entity (overriding ``commons.per_entity``); ``retry_failed`` fetches again the URLs an
    earlier run refused or gave up on for good.
    """
    return await Crawl(config, out_dir, progress, limit, retry_failed).run()


def run_crawl(
    path: str | Path,
    out_dir: str | Path,
    progress: Progress | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
) -> CrawlSummary:
    """Load ENTITIES.yaml at ``path`` and crawl it into ``out_dir`` (see :func:`crawl`); Ctrl-C
    raises :class:`CrawlInterrupted` carrying the summary of what was finished."""
    job = Crawl(load_crawl_config(path), out_dir, progress, limit, retry_failed)
    try:
        return asyncio.run(job.run())
    except KeyboardInterrupt:
        job.summary.interrupted = True
        raise CrawlInterrupted(job.summary) from None
