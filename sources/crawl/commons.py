"""Wikimedia Commons: image candidates for each entity through the MediaWiki Action API.

For an entity, file titles come from ``list=search`` in the File namespace (one query per search
term) and then ``list=categorymembers`` (``cmtype=file``, one query per category), each followed
through its ``continue`` token. Titles are resolved in batches of up to 50 with
``prop=imageinfo`` (``url|size|mime|extmetadata``): the image URL, the description page, the
licence (``LicenseShortName``) and the author (``Artist``, HTML stripped). Only raster images
whose licence is on the allow list are kept, each URL once across all entities, at most
``per_entity`` per entity. Listing stops as soon as an entity has enough, so no more API requests
are made than needed.

Every request goes through the ``get_json(url, params)`` coroutine it is given (the Fetcher's),
so API calls share its politeness, retries and safety checks.
"""

from __future__ import annotations

import html
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from groundforge.sources.crawl.entities import Candidate, CommonsConfig, EntityConfig
from groundforge.sources.crawl.fetch import FetchError

log = logging.getLogger(__name__)

GetJson = Callable[..., Awaitable[Any]]

BATCH = 50
# Formats the pipeline can decode; SVG, PDF, DjVu and video are listed as files too.
RASTER_MIMES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/webp", "image/tiff", "image/bmp"}
)
_TAG = re.compile(r"<[^>]*>")


class CommonsError(RuntimeError):
    """The API answered with an error or with something that is not a MediaWiki reply."""


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment such as ``extmetadata.Artist``."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def _meta(extmetadata: dict[str, Any], key: str) -> str:
    entry = extmetadata.get(key)
    value = entry.get("value") if isinstance(entry, dict) else None
    return strip_html(value) if isinstance(value, str) else ""


class CommonsAdapter:
    """Candidates from Commons for each entity of a crawl.

    ``skipped`` counts files left out (``license``, ``mime``, ``missing``, ``duplicate_url``) and
    ``errors`` holds one line per failed listing; a failed query costs that query's titles only.
    """

    def __init__(self, config: CommonsConfig, get_json: GetJson):
        self.config = config
        self.get_json = get_json
        self.licenses = {" ".join(lic.split()).casefold() for lic in config.licenses}
        self.skipped: Counter[str] = Counter()
        self.errors: list[str] = []
        self._seen_urls: set[str] = set()

    async def entity_candidates(
        self, entity: EntityConfig, limit: int | None = None
    ) -> AsyncIterator[Candidate]:
        """At most ``limit`` (default: ``per_entity``) licensed image candidates for one entity."""
        wanted = self.config.per_entity if limit is None else limit
        found = 0
        batch: list[str] = []
        seen_titles: set[str] = set()
        async with aclosing(self._titles(entity)) as titles:
            async for title in titles:
                if title in seen_titles:
                    continue
                seen_titles.add(title)
                batch.append(title)
                if len(batch) < BATCH:
                    continue
                async for candidate in self._resolve(entity, batch, wanted - found):
                    found += 1
                    yield candidate
                batch = []
                if found >= wanted:
                    return
        if batch:
            async for candidate in self._resolve(entity, batch, wanted - found):
                yield candidate

    async def _titles(self, entity: EntityConfig) -> AsyncIterator[str]:
        queries = [
            (
                f"search {term!r}",
                "search",
                {"list": "search", "srsearch": term, "srnamespace": 6, "srlimit": BATCH},
            )
            for term in entity.search_terms
        ] + [
            (
                f"category {category!r}",
                "categorymembers",
                {
                    "list": "categorymembers",
                    "cmtitle": f"Category:{category}",
                    "cmtype": "file",
                    "cmlimit": BATCH,
                },
            )
            for category in entity.categories
        ]
        for label, key, params in queries:
            try:
                async for query in self._query(params):
                    for page in query.get(key, []):
                        if isinstance(page, dict) and isinstance(page.get("title"), str):
                            yield page["title"]
            except (FetchError, CommonsError) as err:
                self._failed(f"{entity.name}: {label}: {err}")

    async def _resolve(
        self, entity: EntityConfig, titles: list[str], wanted: int
    ) -> AsyncIterator[Candidate]:
        params = {
            "prop": "imageinfo",
            "titles": "|".join(titles),
            "iiprop": "url|size|mime|extmetadata",
            "iiextmetadatafilter": "LicenseShortName|Artist",
        }
        infos: dict[str, dict[str, Any]] = {}
        try:
            async for query in self._query(params):
                for page in query.get("pages", []):
                    if not isinstance(page, dict) or not isinstance(page.get("title"), str):
                        continue
                    info = page.get("imageinfo")
                    if isinstance(info, list) and info and isinstance(info[0], dict):
                        infos[page["title"]] = info[0]
        except (FetchError, CommonsError) as err:
            self._failed(f"{entity.name}: imageinfo of {len(titles)} files: {err}")
            return
        # The API returns pages in its own order; keep the listing's (search relevance first).
        for title in titles:
            if wanted <= 0:
                return
            candidate = self._candidate(entity, title, infos.get(title, {}))
            if candidate is not None:
                wanted -= 1
                yield candidate

    def _candidate(
        self, entity: EntityConfig, title: str, info: dict[str, Any]
    ) -> Candidate | None:
        url = info.get("url")
        if not isinstance(url, str) or not url:
            self.skipped["missing"] += 1
            return None
        if info.get("mime") not in RASTER_MIMES:
            self.skipped["mime"] += 1
            return None
        extmetadata = info.get("extmetadata") or {}
        license_name = _meta(extmetadata, "LicenseShortName")
        if license_name.casefold() not in self.licenses:
            self.skipped["license"] += 1
            return None
        if url in self._seen_urls:
            self.skipped["duplicate_url"] += 1
            return None
        self._seen_urls.add(url)
        page = info.get("descriptionurl")
        return Candidate(
            url=url,
            entity=entity.name,
            license=license_name,
            author=_meta(extmetadata, "Artist"),
            source_page=page if isinstance(page, str) else "",
            title=title,
        )

    async def _query(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The ``query`` part of each reply, following ``continue`` until the last page."""
        base = {"action": "query", "format": "json", "formatversion": 2, **params}
        cont: dict[str, Any] = {}
        while True:
            reply = await self.get_json(self.config.api_url, params={**base, **cont})
            if not isinstance(reply, dict):
                raise CommonsError(f"expected a JSON object, got {type(reply).__name__}")
            if isinstance(reply.get("error"), dict):
                error = reply["error"]
                raise CommonsError(f"{error.get('code', 'error')}: {error.get('info', '')}")
            query = reply.get("query")
            if isinstance(query, dict):
                yield query
            cont = reply.get("continue")
            if not isinstance(cont, dict) or not cont:
                return

    def _failed(self, message: str) -> None:
        log.warning("commons: %s", message)
        self.errors.append(message)
