"""Limits that hold whatever a server or a URL list sends (URLs that do not parse, answers that
trickle in, compression bombs), and what a rerun does with failures that would repeat."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from crawlservers import Route, redirect, serve
from PIL import Image

from groundforge.sources.crawl.cli import crawl as crawl_command
from groundforge.sources.crawl.fetch import Fetcher, FetchResult, FetchSettings
from groundforge.sources.crawl.run import run_crawl
from groundforge.sources.crawl.state import CrawlState, status_for


def _png(colour: tuple[int, int, int] = (20, 140, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
IMAGE = {"Content-Type": "image/png"}


def settings(**overrides: object) -> FetchSettings:
    values: dict[str, object] = {
        "contact": "tests@example.org",
        "allow_private_hosts": ["127.0.0.1"],
        "timeout": 5.0,
        "retries": 0,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "per_host_rate": 1000.0,
    }
    values.update(overrides)
    return FetchSettings(**values)


def fetch(url: str, fetch_settings: FetchSettings) -> FetchResult:
    async def run() -> FetchResult:
        async with Fetcher(fetch_settings) as fetcher:
            return await fetcher.fetch_image(url)

    return asyncio.run(run())


# --- URLs that do not parse --------------------------------------------------------------------


@pytest.mark.parametrize("robots", [True, False], ids=["robots", "no-robots"])
@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("javascript:alert(1)", "scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme"),
        ("mailto:x@y", "scheme"),
        ("about:blank", "scheme"),
        ("https://[::1/a.png", "invalid_url"),
        ("http://127.0.0.1:70000/a.png", "invalid_url"),
        ("http://example.org:99999/a.png", "invalid_url"),
    ],
)
def test_redirect_to_a_location_without_a_usable_host_is_refused(
    location: str, reason: str, robots: bool
) -> None:
    with serve({"/a.png": redirect(location)}) as server:
        result = fetch(server.url("/a.png"), settings(respect_robots=robots, retries=2))
        assert server.count("/a.png") == 1
    assert (result.outcome, result.reason, result.attempts) == ("refused", reason, 1)


@pytest.mark.parametrize("robots", [True, False], ids=["robots", "no-robots"])
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:70000/a.png",
        "http://example.org:99999/a.png",
        "http://[::1/a",
        "http://images..example.org/a.png",  # an empty label cannot be encoded for DNS
        f"http://{'a' * 64}.example.org/a.png",  # nor one over 63 characters
    ],
)
def test_listed_url_that_does_not_parse_is_refused(url: str, robots: bool) -> None:
    result = fetch(url, settings(respect_robots=robots))
    assert (result.outcome, result.reason, result.attempts) == ("refused", "invalid_url", 0)


def test_relative_location_with_a_scheme_stays_on_the_host() -> None:
    # "http:foo.png" is a relative reference with a scheme (RFC 3986, 5.2.2, non-strict).
    routes = {"/a/b.png": redirect("http:c.png"), "/a/c.png": Route(body=PNG, headers=IMAGE)}
    with serve(routes) as server:
        result = fetch(server.url("/a/b.png"), settings())
    assert (result.outcome, result.final_url) == ("ok", server.url("/a/c.png"))


# --- a deadline for the whole request ----------------------------------------------------------


def _one_byte_at_a_time(data: bytes, gap: float):
    def chunks():
        for byte in data:
            time.sleep(gap)
            yield bytes([byte])

    return chunks


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_answer_ends_at_the_deadline_as_a_timeout(part: str) -> None:
    # Each byte comes well within the read timeout; only a deadline on the whole request ends it.
    if part == "headers":
        route = Route(body=PNG, headers=IMAGE, trickle=0.05)
    else:
        route = Route(body=_one_byte_at_a_time(PNG, 0.05), headers=IMAGE)
    with serve({"/slow.png": route}) as server:
        result = fetch(server.url("/slow.png"), settings(timeout=0.5, respect_robots=False))
        assert server.wait_idle(timeout=30)
        (request,) = server.of("/slow.png")
    assert (result.outcome, result.reason, result.attempts) == ("failed", "timeout", 1)
    assert not request.completed and request.bytes_sent < len(PNG)


def test_a_resolver_that_never_answers_ends_at_the_deadline_as_a_timeout() -> None:
    # A fake resolver: no real one can be made to hang on demand.
    async def hang(*args: object, **kwargs: object) -> list:
        await asyncio.Event().wait()
        return []

    async def run() -> FetchResult:
        asyncio.get_running_loop().getaddrinfo = hang  # type: ignore[method-assign]
        async with Fetcher(settings(timeout=0.3)) as fetcher:
            # Bounded here too, so that a fetcher without a deadline fails this test, not hangs.
            return await asyncio.wait_for(
                fetcher.fetch_image("http://images.example.org/a.png"), 60
            )

    result = asyncio.run(run())
    assert (result.outcome, result.reason, result.attempts) == ("failed", "timeout", 0)


def test_a_timeout_is_retried() -> None:
    slow = Route(body=PNG, headers=IMAGE, trickle=0.05)
    with serve({"/a.png": [slow, Route(body=PNG, headers=IMAGE)]}) as server:
        result = fetch(server.url("/a.png"), settings(timeout=0.5, retries=1))
    assert (result.outcome, result.attempts, result.data) == ("ok", 2, PNG)


# --- compressed bodies -------------------------------------------------------------------------

BOMB = 256 * 1024 * 1024  # decompressed size of each bomb
LIMIT = 1_000_000  # max_bytes while fetching them
GREW_AT_MOST = 64 * 1024  # KiB of peak RSS a bomb may add to the fetching process


def _compressed_zeros(compressor, total: int) -> bytes:
    """``total`` zero bytes through ``compressor`` (a zlib or zstandard compressobj)."""
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(total // len(block))]
    return b"".join(parts) + compressor.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, Route]:
    """Small compressed bodies that expand to :data:`BOMB` bytes, served as images."""
    once = _compressed_zeros(zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16), BOMB)
    routes = {
        "/gzip.png": Route(body=once, headers={**IMAGE, "Content-Encoding": "gzip"}),
        "/gzip-gzip.png": Route(
            body=gzip.compress(once, 9), headers={**IMAGE, "Content-Encoding": "gzip, gzip"}
        ),
        "/small.png": Route(body=gzip.compress(PNG), headers={**IMAGE, "Content-Encoding": "gzip"}),
    }
    try:
        import zstandard
    except ImportError:
        return routes
    routes["/zstd.png"] = Route(
        body=_compressed_zeros(zstandard.ZstdCompressor().compressobj(), BOMB),
        headers={**IMAGE, "Content-Encoding": "zstd"},
    )
    return routes


# Runs in its own process, so that ru_maxrss (the peak resident size) is the fetch's alone.
_MEASURE = """
import asyncio, json, resource, sys
from groundforge.sources.crawl.fetch import Fetcher, FetchSettings

async def main(warm_up, url, limit):
    settings = FetchSettings(
        allow_private_hosts=["127.0.0.1"], respect_robots=False, retries=0, max_bytes=limit,
        timeout=120,
    )
    async with Fetcher(settings) as fetcher:
        warm = await fetcher.fetch_image(warm_up)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = await fetcher.fetch_image(url)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"warm": warm.outcome, "outcome": result.outcome, "reason": result.reason,
                      "grew_kib": grew}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/gzip.png", "too_large"), ("/gzip-gzip.png", "too_large"), ("/zstd.png", "bad_encoding")],
)
def test_a_compression_bomb_stays_within_max_bytes(bombs, path: str, reason: str) -> None:
    if path not in bombs:
        pytest.skip("making a zstd body needs the zstandard package")
    with serve(bombs) as server:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEASURE,
                server.url("/small.png"),
                server.url(path),
                str(LIMIT),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        headers = server.of(path)[0].headers
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    assert measured["warm"] == "ok"
    assert (measured["outcome"], measured["reason"]) == ("failed", reason)
    assert measured["grew_kib"] < GREW_AT_MOST, measured
    # zstd is never asked for: a server that follows Accept-Encoding sends gzip or deflate.
    assert headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(PNG)),
        ("x-gzip", gzip.compress(PNG)),
        ("deflate", zlib.compress(PNG)),
        ("deflate", zlib.compress(PNG)[2:-4]),  # raw deflate, as some servers send it
        ("gzip, deflate", zlib.compress(gzip.compress(PNG))),
        ("identity, GZIP", gzip.compress(PNG)),
    ],
)
def test_compressed_images_are_decoded(encoding: str, body: bytes) -> None:
    route = Route(body=body, headers={**IMAGE, "Content-Encoding": encoding})
    with serve({"/a.png": route}) as server:
        result = fetch(server.url("/a.png"), settings(respect_robots=False))
    assert (result.outcome, result.data) == ("ok", PNG)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("br", b"\x0b\x01\x80hello\x03"),
        ("compress", b"\x1f\x9d"),
        ("gzip, gzip, gzip, gzip", gzip.compress(PNG)),
        ("gzip", b"this is not gzip at all"),
    ],
)
def test_other_or_corrupt_codings_are_bad_encoding(encoding: str, body: bytes) -> None:
    route = Route(body=body, headers={**IMAGE, "Content-Encoding": encoding})
    with serve({"/a.png": route}) as server:
        result = fetch(server.url("/a.png"), settings(respect_robots=False))
    assert (result.outcome, result.reason, result.data) == ("failed", "bad_encoding", None)


def test_bytes_after_a_compressed_stream_count_towards_max_bytes() -> None:
    body = gzip.compress(PNG) + bytes(100_000)
    route = Route(body=body, headers={**IMAGE, "Content-Encoding": "gzip"}, chunked=True)
    with serve({"/a.png": route}) as server:
        result = fetch(server.url("/a.png"), settings(respect_robots=False, max_bytes=50_000))
    assert (result.outcome, result.reason) == ("failed", "too_large")


def test_compressed_robots_txt_is_read() -> None:
    rules = gzip.compress(b"User-agent: *\nDisallow: /private/\n")
    routes = {
        "/robots.txt": Route(body=rules, headers={"Content-Encoding": "gzip"}),
        "/private/a.png": Route(body=PNG, headers=IMAGE),
    }
    with serve(routes) as server:
        result = fetch(server.url("/private/a.png"), settings())
        assert server.count("/private/a.png") == 0
    assert result.outcome == "robots"


# --- reruns ------------------------------------------------------------------------------------


def test_failures_that_would_repeat_are_recorded_as_refused(tmp_path):
    assert status_for("failed", "too_large") == status_for("failed", "invalid_url") == "refused"
    assert status_for("failed", "timeout") == status_for("failed", "http_503") == "failed"
    assert status_for("failed", "http_404") == status_for("failed", "http_410") == "refused"
    assert status_for("failed", "redirect_loop") == "refused"
    assert status_for("robots", "robots") == "robots"
    with CrawlState(tmp_path / "s.sqlite") as state:
        state.claim("u", "A")
        state.finish("u", status_for("failed", "not_an_image"), "not_an_image")
        assert state.claim("u", "B") == "refused"
        assert state.get("u")["entity"] == "A"
        # Asked to retry, the URL is claimed again, for the entity listed now.
        assert state.claim("u", "B", retry_failed=True) == "refused"
        assert state.get("u")["entity"] == "B"


def _rows(out: Path) -> dict[str, dict]:
    with sqlite3.connect(out / "crawl.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {row["url"]: dict(row) for row in db.execute("SELECT * FROM urls")}


@pytest.fixture
def bad_list(tmp_path):
    """A URL list whose every URL but one fails, most of them in ways a rerun would repeat."""
    paths = {
        "/ok.png": Route(body=PNG, headers=IMAGE),
        "/js.png": redirect("javascript:alert(1)"),
        "/v6.png": redirect("http://[::1/a.png"),
        "/port.png": redirect("http://127.0.0.1:70000/a.png"),
        "/big.png": Route(body=bytes(5000), headers=IMAGE),
        "/bomb.png": Route(
            body=gzip.compress(gzip.compress(bytes(1_000_000))),
            headers={**IMAGE, "Content-Encoding": "gzip, gzip"},
        ),
        "/page.png": Route(body=b"<html></html>", headers={"Content-Type": "text/html"}),
        "/junk.png": Route(body=b"not an image", headers=IMAGE),
        "/down.png": Route(status=503),
    }
    with serve(paths) as server:
        urls = [server.url(p) for p in paths] + ["http://127.0.0.1:99999/x.png", "http://[::1/x"]
        (tmp_path / "urls.csv").write_text(
            "url,entity\n" + "".join(f"{url},Boeing 757\n" for url in urls), encoding="utf-8"
        )
        fetch_settings = settings(max_bytes=4000, retries=1).model_dump()
        entities = tmp_path / "entities.yaml"
        entities.write_text(
            yaml.safe_dump(
                {
                    "domain": "aircraft",
                    "entities": [{"name": "Boeing 757"}],
                    "manifest": "urls.csv",
                    "fetch": fetch_settings,
                }
            ),
            encoding="utf-8",
        )
        yield server, entities, tmp_path / "out"


GIVEN_UP = {
    "/js.png": "scheme",
    "/v6.png": "invalid_url",
    "/port.png": "invalid_url",
    "/big.png": "too_large",
    "/bomb.png": "too_large",
    "/page.png": "not_an_image",
    "/junk.png": "decode_error",
    ":99999/x.png": "invalid_url",
    "[::1/x": "invalid_url",
}


def _by_suffix(rows: dict[str, dict]) -> dict[str, dict]:
    suffixes = [*GIVEN_UP, "/ok.png", "/down.png"]
    return {next(s for s in suffixes if url.endswith(s)): row for url, row in rows.items()}


def test_bad_urls_end_as_final_outcomes_and_are_not_fetched_again(bad_list):
    server, entities, out = bad_list
    first = run_crawl(entities, out)
    assert (first.listed, first.fetched) == (11, 1)
    rows = _by_suffix(_rows(out))
    assert {s: (r["status"], r["reason"]) for s, r in rows.items()} == {
        **{s: ("refused", reason) for s, reason in GIVEN_UP.items()},
        "/ok.png": ("done", ""),
        "/down.png": ("failed", "http_503"),
    }
    requests = Counter(request.path for request in server.requests)

    again = run_crawl(entities, out)
    assert (again.skipped, again.outcomes) == (10, Counter({"failed": 1}))
    retried = Counter(request.path for request in server.requests) - requests
    # Each run reads robots.txt once; of the listed URLs only the one that may recover is asked.
    assert retried == Counter({"/robots.txt": 1, "/down.png": 2})

    server.routes["/big.png"] = Route(body=_png((200, 10, 10)), headers=IMAGE)
    forced = run_crawl(entities, out, retry_failed=True)
    assert forced.skipped == 1 and forced.fetched == 1
    rows = _by_suffix(_rows(out))
    assert (rows["/big.png"]["status"], rows["/big.png"]["attempts"]) == ("done", 2)
    assert rows["/js.png"]["status"] == "refused"
    assert server.count("/js.png") == server.count("/page.png") == 2


def test_retry_failed_option(bad_list):
    server, entities, out = bad_list
    runner = CliRunner()
    assert "--retry-failed" in runner.invoke(crawl_command, ["--help"]).output
    first = runner.invoke(crawl_command, [str(entities), "--out", str(out)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "failed for good (--retry-failed)" in first.output
    assert "too_large 2" in first.output and "invalid_url 4" in first.output
    runner.invoke(crawl_command, [str(entities), "--out", str(out)])
    assert server.count("/big.png") == 1
    forced = runner.invoke(crawl_command, [str(entities), "--out", str(out), "--retry-failed"])
    assert forced.exit_code == 0, forced.output
    assert server.count("/big.png") == 2 and server.count("/ok.png") == 1
