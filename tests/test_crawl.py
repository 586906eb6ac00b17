"""The crawl: ENTITIES.yaml, the Commons and manifest adapters, resumable state, the image folder
it writes (read back by a pipeline run), and the ``crawl`` command. Every server is local."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import yaml
from click.testing import CliRunner
from crawlservers import Route, serve
from PIL import Image, ImageDraw

from groundforge.outputs.shards import read_samples
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.sources.crawl.cli import crawl as crawl_command
from groundforge.sources.crawl.entities import (
    CrawlConfigError,
    entity_slug,
    load_crawl_config,
    parse_crawl_config,
)
from groundforge.sources.crawl.manifest import ManifestError, read_manifest
from groundforge.sources.crawl.run import Crawl, CrawlBusyError, run_crawl
from groundforge.sources.crawl.state import CrawlState

FETCH = {
    "contact": "tests@example.org",
    "allow_private_hosts": ["127.0.0.1"],
    "per_host_rate": 1000.0,
    "per_host_concurrency": 4,
    "timeout": 5.0,
    "retries": 1,
    "backoff": 0.01,
    "max_backoff": 0.05,
}
PNG = {"Content-Type": "image/png"}
JPEG = {"Content-Type": "image/jpeg"}
JSON = {"Content-Type": "application/json"}


def picture(i: int, fmt: str = "PNG") -> bytes:
    """A white 64x48 image with one rectangle whose colour and place depend on ``i``."""
    image = Image.new("RGB", (64, 48), "white")
    colour = ((70 * i) % 200, (130 * i + 60) % 200, (50 * i + 120) % 200)
    x, y = 4 + (5 * i) % 24, 4 + (3 * i) % 16
    ImageDraw.Draw(image).rectangle([x, y, x + 28, y + 22], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def metadata_lines(out: Path) -> list[dict]:
    text = (out / "metadata.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def image_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "images").rglob("*") if p.is_file())


def state_rows(out: Path) -> dict[str, dict]:
    with sqlite3.connect(out / "crawl.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {row["url"]: dict(row) for row in db.execute("SELECT * FROM urls")}


# ---------------------------------------------------------------- Commons, recorded replies


def _search(titles: list[str], cont: dict | None = None) -> dict:
    reply = {
        "batchcomplete": True,
        "query": {
            "searchinfo": {"totalhits": 40},
            "search": [
                {"ns": 6, "title": t, "pageid": 1000 + i, "size": 2048, "wordcount": 12}
                for i, t in enumerate(titles)
            ],
        },
    }
    if cont:
        reply["continue"] = {**cont, "continue": "-||"}
    return reply


def _members(titles: list[str], cont: dict | None = None) -> dict:
    reply = {
        "batchcomplete": True,
        "query": {
            "categorymembers": [
                {"pageid": 2000 + i, "ns": 6, "title": t} for i, t in enumerate(titles)
            ]
        },
    }
    if cont:
        reply["continue"] = {**cont, "continue": "-||"}
    return reply


def _page(title: str, url: str, mime: str, licence: str, artist: str) -> dict:
    return {
        "pageid": abs(hash(title)) % 100000,
        "ns": 6,
        "title": title,
        "imagerepository": "local",
        "imageinfo": [
            {
                "size": 2048,
                "width": 64,
                "height": 48,
                "url": url,
                "descriptionurl": "https://commons.wikimedia.org/wiki/" + title.replace(" ", "_"),
                "descriptionshorturl": "https://commons.wikimedia.org/w/index.php?curid=1",
                "mime": mime,
                "extmetadata": {
                    "LicenseShortName": {
                        "value": licence,
                        "source": "commons-desc-page",
                        "hidden": "",
                    },
                    "Artist": {"value": artist, "source": "commons-desc-page"},
                },
            }
        ],
    }


def _pages(pages: list[dict], cont: dict | None = None) -> dict:
    reply: dict = {"batchcomplete": True, "query": {"pages": pages}}
    if cont:
        reply["continue"] = {**cont, "continue": "||"}
    return reply


JANE = '<a href="//commons.wikimedia.org/wiki/User:Jane" title="User:Jane">Jane &amp; Co</a>'


@pytest.fixture(scope="module")
def commons_crawl(tmp_path_factory):
    """A crawl of two entities from a recorded Commons API, with the images it names."""
    tmp = tmp_path_factory.mktemp("commons")
    with serve() as server:
        img = server.url
        a1, a2, a3, a4 = "File:757 a1.png", "File:757 a2.png", "File:757 a3.png", "File:757 a4.png"
        a5, b1, b2, b3, b4, b5 = (
            "File:757 a5.svg",
            "File:767 b1.jpg",
            "File:767 b2.png",
            "File:767 b3.png",
            "File:767 b4.png",
            "File:767 b5.png",
        )
        # (expected request parameters, reply), in the order the adapter asks.
        cassette = [
            (
                {"list": "search", "srsearch": "Boeing 757 aircraft", "srnamespace": "6"},
                _search([a1, a2], cont={"sroffset": 2}),
            ),
            ({"list": "search", "sroffset": "2"}, _search([a3])),
            (
                {"list": "categorymembers", "cmtitle": "Category:Boeing 757", "cmtype": "file"},
                _members([a2, a4], cont={"cmcontinue": "file|757 A4|2001"}),
            ),
            ({"list": "categorymembers", "cmcontinue": "file|757 A4|2001"}, _members([a5])),
            (
                {"prop": "imageinfo", "titles": "|".join([a1, a2, a3, a4, a5])},
                _pages(
                    [
                        _page(a2, img("/img/a2.png"), "image/png", "CC0", "Someone"),
                        _page(a1, img("/img/a1.png"), "image/png", "CC BY-SA 4.0", JANE),
                        _page(a3, img("/img/a3.png"), "image/png", "CC BY-NC 4.0", "Nope"),
                    ],
                    cont={"iicontinue": "757_a4.png|20200101"},
                ),
            ),
            (
                {"prop": "imageinfo", "iicontinue": "757_a4.png|20200101"},
                _pages(
                    [
                        _page(a4, img("/img/a4.png"), "image/png", "public domain", ""),
                        _page(a5, img("/img/a5.svg"), "image/svg+xml", "CC0", "Vector"),
                        {"ns": 6, "title": "File:Gone.png", "missing": True},
                    ]
                ),
            ),
            (
                {"list": "search", "srsearch": "Boeing 767"},
                _search([b1, a1, b2, b3, b4, b5]),
            ),
            (
                {"prop": "imageinfo", "titles": "|".join([b1, a1, b2, b3, b4, b5])},
                _pages(
                    [
                        _page(b1, img("/img/b1.jpg"), "image/jpeg", "CC BY 4.0", "Bo"),
                        _page(a1, img("/img/a1.png"), "image/png", "CC BY-SA 4.0", JANE),
                        _page(b2, img("/img/b2.png"), "image/png", "CC BY 4.0", "Copier"),
                        _page(b3, img("/private/b3.png"), "image/png", "CC BY 4.0", "Hidden"),
                        _page(b4, img("/img/b4.png"), "image/png", "CC BY 4.0", "Lost"),
                        _page(b5, img("/img/b5.png"), "image/png", "CC BY 4.0", "Spare"),
                    ]
                ),
            ),
        ]
        server.routes = {
            "/w/api.php": [Route(body=json.dumps(r).encode(), headers=JSON) for _, r in cassette]
            + [Route(status=500, body=b"the cassette ran out")],
            # As on Wikimedia sites: the API path is closed to page crawlers.
            "/robots.txt": Route(body=b"User-agent: *\nDisallow: /private/\nDisallow: /w/\n"),
            "/img/a1.png": Route(body=picture(1), headers=PNG),
            "/img/a2.png": Route(body=picture(2), headers=PNG),
            "/img/a3.png": Route(body=picture(3), headers=PNG),
            "/img/a4.png": Route(body=picture(4), headers=PNG),
            "/img/b1.jpg": Route(body=picture(5, "JPEG"), headers=JPEG),
            # the same bytes as a2 under another URL and entity: stored once
            "/img/b2.png": Route(body=picture(2), headers=PNG),
            "/private/b3.png": Route(body=picture(6), headers=PNG),
            "/img/b5.png": Route(body=picture(7), headers=PNG),
        }
        entities = write_yaml(
            tmp / "entities.yaml",
            {
                "domain": "aircraft",
                "entities": [
                    {
                        "name": "Boeing 757",
                        "aliases": ["B757"],
                        "search": ["Boeing 757 aircraft"],
                        "categories": ["Boeing 757"],
                    },
                    {"name": "Boeing 767"},
                ],
                "commons": {"api_url": server.url("/w/api.php"), "per_entity": 4},
                "fetch": FETCH,
            },
        )
        out = tmp / "crawl"
        summary = run_crawl(entities, out)
        api = [parse_qs(r.query) for r in server.of("/w/api.php")]
        counts = Counter(request.path for request in server.requests)
    return {"out": out, "summary": summary, "api": api, "cassette": cassette, "counts": counts}


def test_commons_queries_follow_the_documented_api_and_its_continuations(commons_crawl):
    api, cassette = commons_crawl["api"], commons_crawl["cassette"]
    assert len(api) == len(cassette)
    for params, (expected, _) in zip(api, cassette, strict=True):
        assert params["action"] == ["query"]
        assert params["format"] == ["json"] and params["formatversion"] == ["2"]
        for key, value in expected.items():
            assert params[key] == [value], (key, params)
    resolve = api[4]
    assert resolve["iiprop"] == ["url|size|mime|extmetadata"]
    # the continuation repeats the original request
    assert api[5]["titles"] == resolve["titles"] and api[1]["srsearch"] == api[0]["srsearch"]


def test_commons_candidates_are_licensed_raster_images_once_each(commons_crawl):
    out, summary, counts = commons_crawl["out"], commons_crawl["summary"], commons_crawl["counts"]
    lines = {Path(line["url"]).name: line for line in metadata_lines(out)}
    assert sorted(lines) == ["a1.png", "a2.png", "a4.png", "b1.jpg"]
    a1 = lines["a1.png"]
    assert (a1["entity"], a1["license"], a1["author"], a1["domain"]) == (
        "Boeing 757",
        "CC BY-SA 4.0",
        "Jane & Co",
        "aircraft",
    )
    assert a1["source_page"] == "https://commons.wikimedia.org/wiki/File:757_a1.png"
    assert (a1["width"], a1["height"], a1["mime"]) == (64, 48, "image/png")
    assert lines["a4.png"]["license"] == "public domain" and lines["a4.png"]["author"] is None
    b1 = lines["b1.jpg"]
    assert b1["path"] == f"images/boeing_767/{b1['sha256']}.jpg" and b1["mime"] == "image/jpeg"
    for line in lines.values():
        data = (out / line["path"]).read_bytes()
        assert line["path"].startswith(f"images/{entity_slug(line['entity'])}/")
        assert Path(line["path"]).stem == line["sha256"]
        assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert len(image_files(out)) == 4

    # off the allow list, not raster, or listed twice: never requested
    assert counts["/img/a3.png"] == counts["/img/a5.svg"] == 0
    assert counts["/img/a1.png"] == 1
    assert summary.source_skipped == Counter({"license": 1, "mime": 1, "duplicate_url": 1})
    # per_entity is 4: the fifth licensed file of the 767 is never even recorded
    assert counts["/img/b5.png"] == 0
    assert not any(url.endswith("/b5.png") for url in state_rows(out))
    assert (summary.listed, summary.fetched, summary.duplicates, summary.skipped) == (7, 4, 1, 0)
    assert summary.outcomes == Counter({"ok": 5, "robots": 1, "failed": 1})
    assert summary.reasons == {"robots": Counter({"robots": 1}), "failed": Counter({"http_404": 1})}
    assert counts["/private/b3.png"] == 0
    assert summary.images == 4 and not summary.source_errors

    rows = state_rows(out)
    by_name = {Path(url).name: row for url, row in rows.items()}
    assert by_name["b2.png"]["status"] == "done" and by_name["b2.png"]["reason"] == "duplicate"
    assert by_name["b3.png"]["status"] == "robots"
    # A 404 is what the server will say again: the URL is not asked on the next crawl.
    assert (by_name["b4.png"]["status"], by_name["b4.png"]["reason"]) == ("refused", "http_404")
    assert by_name["a1.png"]["sha256"] == lines["a1.png"]["sha256"]


def test_crawl_folder_feeds_a_pipeline_with_provenance(commons_crawl, tmp_path):
    out = commons_crawl["out"]
    recipe = {
        "name": "crawled",
        "domain": "aircraft",
        "source": {"kind": "image_folder", "path": str(out), "entity_from": "parent"},
        "boxes": {"method": "foreground", "min_area_fraction": 0.0},
        "images": {"min_side": 8},
    }
    run_recipe(parse_recipe(recipe, tmp_path), str(tmp_path / "run"))
    samples = read_samples(str(tmp_path / "run" / "shards"))
    by_url = {s.provenance.urls[0]: s for s in samples}
    expected = {line["url"]: line for line in metadata_lines(out)}
    assert set(by_url) == set(expected)
    for url, line in expected.items():
        sample = by_url[url]
        assert sample.target == line["entity"] and sample.domain == "aircraft"
        assert sample.provenance.licenses == (line["license"] or "",)
        assert sample.provenance.authors == (line["author"] or "",)
    jane = next(s for u, s in by_url.items() if u.endswith("/a1.png"))
    assert jane.provenance.authors == ("Jane & Co",)
    assert jane.provenance.licenses == ("CC BY-SA 4.0",)


# ---------------------------------------------------------------- ENTITIES.yaml


def _entities(**extra) -> dict:
    return {
        "domain": "aircraft",
        "entities": [{"name": "Boeing 757", "aliases": ["B757"]}, {"name": "Airbus A321"}],
        **extra,
    }


def test_entities_file_resolves_the_manifest_and_defaults(tmp_path):
    path = write_yaml(tmp_path / "e.yaml", _entities(manifest="urls.csv"))
    config = load_crawl_config(path)
    assert config.manifest == str((tmp_path / "urls.csv").resolve())
    assert config.entities[0].search_terms == ["Boeing 757"]
    assert config.folders() == {"Boeing 757": "boeing_757", "Airbus A321": "airbus_a321"}
    assert config.entity_names()["b757"] == "Boeing 757"
    example = Path(__file__).parents[1] / "examples" / "crawl" / "aircraft.yaml"
    commons = load_crawl_config(example).commons
    assert commons.api_url == "https://commons.wikimedia.org/w/api.php"
    assert commons.per_entity == 20 and "CC BY-SA 4.0" in commons.licenses


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_entities(), "give at least one image source"),
        (_entities(commons={}), "fetch.contact: Wikimedia requires"),
        (_entities(manifest="u.csv", fetch={"per_host_rat": 2}), r"fetch\.per_host_rat: Extra"),
        (_entities(commons={"per_entity": 0}, fetch=FETCH), r"commons\.per_entity"),
        (
            {**_entities(manifest="u.csv"), "entities": [{"name": "A"}, {"name": "A"}]},
            "listed twice",
        ),
        (
            {
                **_entities(manifest="u.csv"),
                "entities": [{"name": "A", "aliases": ["X"]}, {"name": "B", "aliases": ["x"]}],
            },
            "'x' names both 'A' and 'B'",
        ),
        ({**_entities(manifest="u.csv"), "entities": []}, r"entities: List should have at least"),
        ({**_entities(manifest="u.csv"), "entities": [{"name": " "}]}, r"entities\.0\.name"),
    ],
)
def test_entities_errors_name_the_file_and_field(tmp_path, data, message):
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(CrawlConfigError, match=message) as err:
        load_crawl_config(path)
    assert str(path) in str(err.value)


def test_entity_folders_are_safe_and_distinct():
    assert entity_slug("Boeing 757") == "boeing_757"
    assert entity_slug("Ælfred's ../../etc") == "lfred_s_etc"
    assert entity_slug("東京").startswith("entity_")
    config = parse_crawl_config(
        _entities(manifest="u.csv", entities=[{"name": "F-16"}, {"name": "F 16"}]), Path(".")
    )
    folders = config.folders()
    assert len(set(folders.values())) == 2 and all(f.startswith("f_16_") for f in folders.values())


# ---------------------------------------------------------------- URL manifests

NAMES = {"boeing 757": "Boeing 757", "b757": "Boeing 757", "airbus a321": "Airbus A321"}


def test_csv_and_jsonl_manifests(tmp_path):
    csv_path = tmp_path / "urls.csv"
    csv_path.write_text(
        "url,entity,license,author\n"
        'https://example.org/a.jpg,Boeing 757,CC0,"Doe, J."\n'
        "\n"
        "https://example.org/b.jpg,b757,,\n"
        "https://example.org/a.jpg,BOEING 757,CC0,\n"
        "http://example.org/c.png,Airbus A321\n",
        encoding="utf-8",
    )
    found = read_manifest(csv_path, NAMES)
    assert [(c.url[-5:], c.entity, c.license, c.author) for c in found] == [
        ("a.jpg", "Boeing 757", "CC0", "Doe, J."),
        ("b.jpg", "Boeing 757", "", ""),
        ("c.png", "Airbus A321", "", ""),
    ]
    jsonl = tmp_path / "urls.jsonl"
    jsonl.write_text(
        json.dumps({"url": "https://example.org/a.jpg", "entity": "B757", "author": None})
        + "\n\n"
        + json.dumps(
            {
                "url": "https://example.org/d.jpg",
                "entity": "Airbus A321",
                "license": "CC BY 4.0",
                "source_page": "https://example.org/d",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    found = read_manifest(jsonl, NAMES)
    assert [(c.entity, c.license, c.source_page) for c in found] == [
        ("Boeing 757", "", ""),
        ("Airbus A321", "CC BY 4.0", "https://example.org/d"),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("u.csv", "", r"u\.csv: empty"),
        ("u.csv", "link,entity\nx,y\n", r"u\.csv, line 1: the header lacks url"),
        ("u.csv", "url,entity,licence\nhttps://e.org/a,B757,CC0\n", r"line 2: unknown column"),
        ("u.csv", "url,entity\nhttps://e.org/a,B757,extra\n", r"line 2: more values"),
        ("u.csv", "url,entity\nhttps://e.org/a,\n", r"line 2: 'entity' is missing"),
        ("u.csv", "url,entity\nftp://e.org/a,B757\n", r"line 2: 'ftp://e.org/a' is not an http"),
        (
            "u.csv",
            "url,entity\nhttps://e.org/a,B757\nhttps://e.org/a,Airbus A321\n",
            r"line 3: https://e.org/a is listed for 'Airbus A321' here and for 'Boeing 757' on "
            "line 2",
        ),
        (
            "u.csv",
            "url,entity\nhttps://e.org/a,B747\nhttps://e.org/b,Concorde\nhttps://e.org/c,B747\n",
            r"u\.csv: entities not in the entities file: 'B747' \(line 2\), 'Concorde' \(line 3\)",
        ),
        ("u.jsonl", '{"url": "https://e.org/a", "entity": "B757"}\n[1]\n', r"line 2: expected a"),
        ("u.jsonl", "{nope\n", r"u\.jsonl, line 1: not JSON"),
        ("u.jsonl", '{"url": "https://e.org/a", "entity": 5}\n', r"line 1: 'entity' must be a"),
        ("u.txt", "https://e.org/a\n", r"u\.txt: a manifest is a \.csv or a \.jsonl"),
    ],
)
def test_manifest_errors_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path, NAMES)


def test_missing_manifest_fails_before_anything_is_written(tmp_path):
    path = write_yaml(tmp_path / "e.yaml", _entities(manifest="absent.csv"))
    with pytest.raises(ManifestError, match=r"absent\.csv: cannot read the manifest"):
        run_crawl(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- state, resuming, stopping


def test_state_skips_finished_urls_and_retries_failed_ones(tmp_path):
    with CrawlState(tmp_path / "s.sqlite") as state:
        assert state.claim("u1", "A") == "pending"
        state.finish("u1", "failed", "timeout", attempts=3)
        assert state.claim("u1", "B") == "failed"
        state.finish("u1", "done", sha256="ab", attempts=1)
        assert state.claim("u1", "C") == "done"
        row = state.get("u1")
        assert (row["entity"], row["attempts"], row["sha256"]) == ("B", 4, "ab")
        with pytest.raises(ValueError, match="status must be one of"):
            state.finish("u1", "lost")
    with CrawlState(tmp_path / "s.sqlite") as state:
        assert state.counts() == Counter({"done": 1})
        journal = state._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def _manifest_crawl(tmp: Path, server, n: int, delay: float, duplicate: bool = True) -> Path:
    """An entities file with a manifest of ``n`` slow images on ``server`` (the last one the
    same bytes as the first when ``duplicate``)."""
    rows = ["url,entity,license,author"]
    for i in range(n):
        path = f"/slow/{i}.png"
        body = picture(0 if duplicate and i == n - 1 else i)
        server.routes[path] = Route(body=body, headers=PNG, delay=delay)
        rows.append(f"{server.url(path)},{'Boeing 757' if i % 2 else 'Airbus A321'},CC0,P{i}")
    (tmp / "urls.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return write_yaml(
        tmp / "entities.yaml",
        _entities(manifest="urls.csv", fetch=FETCH, concurrency=2),
    )


def _wait_for_done(out: Path, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "crawl.sqlite").exists():
            try:
                done = sum(r["status"] == "done" for r in state_rows(out).values())
            except sqlite3.OperationalError:
                done = 0
            if done >= at_least:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} URLs were done after {timeout} s")


def _assert_complete(out: Path, n: int) -> None:
    lines = metadata_lines(out)
    paths = [line["path"] for line in lines]
    assert len(paths) == len(set(paths)) == n - 1  # the last image repeats the first
    assert sorted(str(p.relative_to(out).as_posix()) for p in image_files(out)) == sorted(paths)
    assert not list(out.rglob("*.part"))
    assert Counter(row["status"] for row in state_rows(out).values()) == Counter({"done": n})


def test_killed_crawl_resumes_without_fetching_finished_urls_again(tmp_path):
    n = 10
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, n, delay=0.25)
        out = tmp_path / "out"
        code = (
            "import sys\n"
            "from groundforge.sources.crawl.run import run_crawl\n"
            "run_crawl(*sys.argv[1:])\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(entities), str(out)])
        try:
            _wait_for_done(out, 3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        done_before = {url for url, row in state_rows(out).items() if row["status"] == "done"}
        assert 3 <= len(done_before) < n
        # What a kill in the middle of a write would leave behind.
        (out / "images" / "boeing_757" / ".deadbeef.png.part").write_bytes(b"half an ima")
        with open(out / "metadata.jsonl", "a", encoding="utf-8") as fh:
            fh.write('{"path": "images/boeing_757/dead')

        summary = run_crawl(entities, out)

        assert summary.skipped == len(done_before)
        assert summary.listed == n and not summary.interrupted
        for url in done_before:
            assert server.count(url.removeprefix(server.base_url)) == 1, url
        _assert_complete(out, n)

        again = run_crawl(entities, out)
        assert (again.skipped, again.fetched, again.outcomes.total()) == (n, 0, 0)
        assert server.count("/slow/0.png") == 1
        _assert_complete(out, n)


def test_cancelled_crawl_keeps_what_finished(tmp_path):
    n = 8
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, n, delay=0.2)
        out = tmp_path / "out"
        job = Crawl(load_crawl_config(entities), out)

        async def cancel_after_some() -> None:
            task = asyncio.create_task(job.run())
            while job.summary.fetched < 2:
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_after_some())
        rows = state_rows(out)
        done = [row for row in rows.values() if row["status"] == "done"]
        assert len(done) == job.summary.fetched + job.summary.duplicates < n
        assert {row["sha256"] for row in done} == {line["sha256"] for line in metadata_lines(out)}
        assert len(image_files(out)) == len(metadata_lines(out))
        assert not list(out.rglob("*.part"))
        # the lock went with the crawl: the folder can be crawled again at once
        assert run_crawl(entities, out).skipped == len(done)
        _assert_complete(out, n)


def test_one_crawl_per_folder(tmp_path):
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, 4, delay=0.3)
        out = tmp_path / "out"
        config = load_crawl_config(entities)

        async def two_at_once() -> None:
            first = asyncio.create_task(Crawl(config, out).run())
            while not (out / "crawl.sqlite").exists():
                await asyncio.sleep(0.01)
            with pytest.raises(CrawlBusyError, match="another crawl is writing"):
                await Crawl(config, out).run()
            await first

        asyncio.run(two_at_once())
        _assert_complete(out, 4)


# ---------------------------------------------------------------- the command


def test_crawl_command_prints_the_summary_and_the_recipe_hint(tmp_path):
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, 4, delay=0.0)
        server.routes["/slow/gone.png"] = Route(status=410)
        with open(tmp_path / "urls.csv", "a", encoding="utf-8") as fh:
            fh.write(f"{server.url('/slow/gone.png')},B757,,\n")
        out = tmp_path / "out"
        result = CliRunner().invoke(crawl_command, [str(entities), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("fetched", "skipped (done before)", "failed (retried next run)", "http_410 1"):
        assert text in result.output
    assert "3 images in" in result.output
    assert f'source: {{kind: image_folder, path: "{out.resolve()}"' in result.output
    assert "groundforge run RECIPE.yaml" in result.output


def test_crawl_command_limit_caps_urls_per_entity(tmp_path):
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, 6, delay=0.0, duplicate=False)
        out = tmp_path / "out"
        result = CliRunner().invoke(
            crawl_command, [str(entities), "--out", str(out), "--limit", "2"]
        )
    assert result.exit_code == 0, result.output
    assert Counter(line["entity"] for line in metadata_lines(out)) == Counter(
        {"Boeing 757": 2, "Airbus A321": 2}
    )
    assert "over_limit 2" in result.output


def test_crawl_command_reports_a_bad_entities_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", _entities(commons={"per_entity": "many"}))
    result = CliRunner().invoke(crawl_command, [str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "bad.yaml" in result.output and "commons.per_entity" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_the_command_cleanly(tmp_path):
    n = 8
    with serve() as server:
        entities = _manifest_crawl(tmp_path, server, n, delay=0.3)
        out = tmp_path / "out"
        code = "from groundforge.sources.crawl.cli import crawl; crawl()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(entities), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            _wait_for_done(out, 2)
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "run the same command again to resume" in output
    assert "Traceback" not in output
    done = [row for row in state_rows(out).values() if row["status"] == "done"]
    assert 2 <= len(done) and len(metadata_lines(out)) == len(image_files(out))
    assert not list(out.rglob("*.part"))
