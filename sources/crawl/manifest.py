"""A URL manifest: image URLs collected by hand or by another tool, one per entity and row.

Two formats, chosen by the file's extension:

- ``.csv``: a header row, then one row per URL::

      url,entity,license,author,source_page
      https://example.org/a.jpg,Boeing 757,CC BY 4.0,A. Person,https://example.org/a

- ``.jsonl`` (or ``.ndjson``): one JSON object per line with the same keys.

``url`` (http or https) and ``entity`` are required; ``license``, ``author`` and ``source_page``
are optional. Any other column is an error, so that a misspelt ``licence`` never drops a file's
licence silently. ``entity`` must be an entity's name or one of its aliases in ENTITIES.yaml
(case-insensitively; an alias becomes the entity's name): a manifest cannot add entities, so a
typo cannot create a new class. A URL listed twice for the same entity counts once; for two
entities it is an error. Errors name the file and the line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from groundforge.jsonl import json_objects
from groundforge.sources.crawl.entities import Candidate, CrawlConfigError

COLUMNS = ("url", "entity", "license", "author", "source_page")
REQUIRED = ("url", "entity")


class ManifestError(CrawlConfigError):
    """A manifest that cannot be used; the message names the file and the line."""


def read_manifest(path: str | Path, entity_names: Mapping[str, str]) -> list[Candidate]:
    """The candidates of a manifest; ``entity_names`` maps case-folded names and aliases to
    entity names (:meth:`CrawlConfig.entity_names`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows
    else:
        raise ManifestError(f"{path}: a manifest is a .csv or a .jsonl file, got {suffix!r}")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return _candidates(path, rows(path, fh), entity_names)
    except OSError as err:
        raise ManifestError(f"{path}: cannot read the manifest ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err.reason})") from None


def _candidates(
    path: Path, rows: Iterator[tuple[int, dict]], entity_names: Mapping[str, str]
) -> list[Candidate]:
    found: dict[str, tuple[int, Candidate]] = {}
    unknown: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{path}, line {lineno}"
        extra = sorted(set(row) - set(COLUMNS))
        if extra:
            raise ManifestError(
                f"{where}: unknown column(s) {', '.join(map(repr, extra))}; "
                f"the columns are {', '.join(COLUMNS)}"
            )
        fields = {}
        for key in COLUMNS:
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"{where}: {key!r} must be a string, got {value!r}")
            fields[key] = (value or "").strip()
        for key in REQUIRED:
            if not fields[key]:
                raise ManifestError(f"{where}: {key!r} is missing")
        if not _http_url(fields["url"]):
            raise ManifestError(f"{where}: {fields['url']!r} is not an http(s) URL")
        entity = entity_names.get(" ".join(fields["entity"].split()).casefold())
        if entity is None:
            unknown.setdefault(fields["entity"], lineno)
            continue
        candidate = Candidate(
            url=fields["url"],
            entity=entity,
            license=fields["license"],
            author=fields["author"],
            source_page=fields["source_page"],
        )
        if candidate.url in found:
            first, earlier = found[candidate.url]
            if earlier.entity != entity:
                raise ManifestError(
                    f"{where}: {candidate.url} is listed for {entity!r} here and for "
                    f"{earlier.entity!r} on line {first}; an image shows one entity"
                )
            continue
        found[candidate.url] = (lineno, candidate)
    if unknown:
        listed = ", ".join(f"{name!r} (line {line})" for name, line in unknown.items())
        raise ManifestError(
            f"{path}: entities not in the entities file: {listed}; add them (or an alias) there"
        )
    return [candidate for _, candidate in found.values()]


def _http_url(url: str) -> bool:
    """Whether ``url`` names http or https and a host.

    An http(s) URL that does not parse (a broken IPv6 literal, say) passes: the fetcher records
    it as ``invalid_url``, so one bad row costs one URL, not the crawl.
    """
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return url.partition(":")[0].lower() in ("http", "https")


def _csv_rows(path: Path, fh) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(fh, restkey="\0extra", strict=True)
    try:
        header = reader.fieldnames
        if not header:
            raise ManifestError(
                f"{path}: empty; the first line is the header ({','.join(COLUMNS)})"
            )
        header = [h.strip() for h in header]
        reader.fieldnames = header
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(
                f"{path}, line 1: the header lacks {', '.join(missing)}; "
                f"it names the columns, e.g. {','.join(COLUMNS)}"
            )
        for row in reader:
            if "\0extra" in row:
                raise ManifestError(
                    f"{path}, line {reader.line_num}: more values than the header has columns"
                )
            if not any((v or "").strip() for v in row.values()):
                continue
            # A trailing comma on every line makes an unnamed, empty column: harmless.
            yield reader.line_num, {k: v for k, v in row.items() if k or (v or "").strip()}
    except csv.Error as err:
        raise ManifestError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _jsonl_rows(path: Path, fh) -> Iterator[tuple[int, dict]]:
    return json_objects(fh, path, ManifestError)
