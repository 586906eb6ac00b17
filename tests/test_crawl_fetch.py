"""The crawler's fetcher against real HTTP servers on 127.0.0.1, and its safety rules."""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import json
import socket
import time

import pytest
from crawlservers import Route, Server, redirect, repeat, serve
from PIL import Image

from groundforge.sources.crawl.fetch import (
    Fetcher,
    FetchError,
    FetchResult,
    FetchSettings,
)
from groundforge.sources.crawl.safety import UnsafeURL, check_host, check_scheme, is_public

CONTACT = "crawler-ops@example.org"


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _image("PNG", (32, 24))
JPEG = _image("JPEG", (40, 30))


def png_route(**kwargs: object) -> Route:
    return Route(body=PNG, headers={"Content-Type": "image/png"}, **kwargs)  # type: ignore[arg-type]


def settings(**overrides: object) -> FetchSettings:
    """Settings for a local test server: 127.0.0.1 allowed, fast retries, no pacing."""
    values: dict[str, object] = {
        "contact": CONTACT,
        "allow_private_hosts": ["127.0.0.1"],
        "timeout": 2.0,
        "retries": 2,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "per_host_rate": 1000.0,
    }
    values.update(overrides)
    return FetchSettings(**values)


async def _fetch_all(fetch_settings: FetchSettings, urls: list[str]) -> list[FetchResult]:
    async with Fetcher(fetch_settings) as fetcher:
        return list(await asyncio.gather(*(fetcher.fetch_image(url) for url in urls)))


def fetch(url: str, fetch_settings: FetchSettings | None = None) -> FetchResult:
    return asyncio.run(_fetch_all(fetch_settings or settings(), [url]))[0]


def fetch_many(urls: list[str], fetch_settings: FetchSettings) -> list[FetchResult]:
    return asyncio.run(_fetch_all(fetch_settings, urls))


def get_json(url: str, params: dict | None = None, fetch_settings: FetchSettings | None = None):
    async def run():
        async with Fetcher(fetch_settings or settings()) as fetcher:
            return await fetcher.get_json(url, params)

    return asyncio.run(run())


# --- images ------------------------------------------------------------------------------------


def test_png_and_jpeg_are_fetched_and_decoded() -> None:
    routes = {
        "/a.png": png_route(),
        # The URL's extension lies; the result follows the decoded bytes.
        "/b.png": Route(body=JPEG, headers={"Content-Type": "image/jpeg"}),
    }
    with serve(routes) as server:
        png, jpeg = fetch_many([server.url("/a.png"), server.url("/b.png")], settings())
    assert png.outcome == "ok" and png.reason == ""
    assert png.data == PNG and png.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (png.mime, png.ext, png.width, png.height) == ("image/png", "png", 32, 24)
    assert png.attempts == 1 and png.final_url == server.url("/a.png")
    assert jpeg.outcome == "ok" and jpeg.data == JPEG
    assert (jpeg.mime, jpeg.ext, jpeg.width, jpeg.height) == ("image/jpeg", "jpg", 40, 30)
    assert jpeg.sha256 == hashlib.sha256(JPEG).hexdigest()


def test_html_served_as_jpeg_is_a_decode_error() -> None:
    html = b"<!doctype html><html><body>Not found</body></html>"
    with serve({"/x.jpg": Route(body=html, headers={"Content-Type": "image/jpeg"})}) as server:
        result = fetch(server.url("/x.jpg"))
    assert (result.outcome, result.reason, result.data) == ("failed", "decode_error", None)


def test_html_content_type_is_not_an_image() -> None:
    with serve({"/x.jpg": Route(body=PNG, headers={"Content-Type": "text/html"})}) as server:
        result = fetch(server.url("/x.jpg"))
    assert (result.outcome, result.reason, result.data) == ("failed", "not_an_image", None)


def test_truncated_image_is_a_decode_error() -> None:
    with serve(
        {"/t.jpg": Route(body=JPEG[: len(JPEG) // 2], headers={"Content-Type": "image/jpeg"})}
    ) as server:
        result = fetch(server.url("/t.jpg"))
    assert (result.outcome, result.reason) == ("failed", "decode_error")


def test_too_many_pixels() -> None:
    with serve({"/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"), settings(max_pixels=32 * 24 - 1))
    assert (result.outcome, result.reason, result.data) == ("failed", "too_many_pixels", None)


def test_user_agent_names_the_contact() -> None:
    with serve({"/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"))
        agents = {request.path: request.headers["user-agent"] for request in server.requests}
    assert result.outcome == "ok"
    assert set(agents) == {"/robots.txt", "/a.png"}
    assert all(CONTACT in agent and agent.startswith("groundforge/") for agent in agents.values())


# --- robots.txt --------------------------------------------------------------------------------


def test_robots_disallow_keeps_the_image_unrequested() -> None:
    robots = Route(body=b"User-agent: *\nDisallow: /private/\n")
    routes = {"/robots.txt": robots, "/private/a.png": png_route(), "/public/a.png": png_route()}
    with serve(routes) as server:
        blocked, allowed = fetch_many(
            [server.url("/private/a.png"), server.url("/public/a.png")], settings()
        )
        assert server.count("/private/a.png") == 0
        assert server.count("/robots.txt") == 1
    assert (blocked.outcome, blocked.reason, blocked.attempts) == ("robots", "robots", 0)
    assert allowed.outcome == "ok"


def test_robots_rules_for_our_agent_apply() -> None:
    robots = Route(body=b"User-agent: groundforge\nDisallow: /\n\nUser-agent: *\nAllow: /\n")
    with serve({"/robots.txt": robots, "/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"))
        assert server.count("/a.png") == 0
    assert result.outcome == "robots"


def test_robots_ignored_when_not_respected() -> None:
    robots = Route(body=b"User-agent: *\nDisallow: /\n")
    with serve({"/robots.txt": robots, "/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"), settings(respect_robots=False))
        assert server.count("/robots.txt") == 0
    assert result.outcome == "ok"


@pytest.mark.parametrize(
    ("robots", "outcome"),
    [
        (Route(status=404), "ok"),
        (Route(status=403), "ok"),
        (Route(status=500), "robots"),
        (Route(status=503), "robots"),
        (redirect("/robots.txt"), "ok"),  # a redirect loop means "unavailable", like a 4xx
    ],
)
def test_robots_status_codes(robots: Route, outcome: str) -> None:
    with serve({"/robots.txt": robots, "/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"))
        assert server.count("/a.png") == (1 if outcome == "ok" else 0)
    assert result.outcome == outcome


def test_robots_follows_redirects() -> None:
    routes = {
        "/robots.txt": redirect("/r1"),
        "/r1": redirect("/rules.txt"),
        "/rules.txt": Route(body=b"User-agent: *\nDisallow: /a.png\n"),
        "/a.png": png_route(),
    }
    with serve(routes) as server:
        result = fetch(server.url("/a.png"), settings(max_redirects=0))
    assert result.outcome == "robots"


def test_robots_unreachable_disallows() -> None:
    with serve({"/robots.txt": Route(status=200, delay=1.0), "/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"), settings(timeout=0.2, retries=0))
        assert server.count("/a.png") == 0
    assert result.outcome == "robots"


def test_concurrent_fetches_share_one_robots_request() -> None:
    robots = Route(body=b"User-agent: *\nAllow: /\n", delay=0.2)
    routes: dict[str, Route] = {"/robots.txt": robots}
    routes.update({f"/{i}.png": png_route() for i in range(5)})
    with serve(routes) as server:
        urls = [server.url(f"/{i}.png") for i in range(5)]
        results = fetch_many(urls, settings(per_host_concurrency=5))
        assert server.count("/robots.txt") == 1
    assert [result.outcome for result in results] == ["ok"] * 5


# --- retries -----------------------------------------------------------------------------------


def test_429_honours_retry_after() -> None:
    routes = {"/a.png": [Route(status=429, headers={"Retry-After": "1"}), png_route()]}
    with serve(routes) as server:
        result = fetch(server.url("/a.png"), settings(max_backoff=5.0))
        first, second = server.of("/a.png")
    assert result.outcome == "ok" and result.attempts == 2
    assert second.started - first.started >= 0.95


def test_retry_after_is_capped_by_max_backoff() -> None:
    routes = {"/a.png": [Route(status=503, headers={"Retry-After": "30"}), png_route()]}
    with serve(routes) as server:
        started = time.monotonic()
        result = fetch(server.url("/a.png"), settings(max_backoff=0.1))
    assert result.outcome == "ok" and result.attempts == 2
    assert time.monotonic() - started < 3


def test_500_then_success() -> None:
    with serve({"/a.png": [Route(status=500), Route(status=502), png_route()]}) as server:
        result = fetch(server.url("/a.png"))
    assert result.outcome == "ok" and result.attempts == 3


def test_500_forever_fails_after_all_retries() -> None:
    with serve({"/a.png": Route(status=500)}) as server:
        result = fetch(server.url("/a.png"), settings(retries=3))
        assert server.count("/a.png") == 4
    assert (result.outcome, result.reason, result.attempts) == ("failed", "http_500", 4)


def test_429_forever_fails_with_http_429() -> None:
    with serve({"/a.png": Route(status=429)}) as server:
        result = fetch(server.url("/a.png"), settings(retries=1))
    assert (result.outcome, result.reason, result.attempts) == ("failed", "http_429", 2)


def test_404_fails_at_once() -> None:
    with serve({}) as server:
        result = fetch(server.url("/missing.png"))
        assert server.count("/missing.png") == 1
    assert (result.outcome, result.reason, result.attempts) == ("failed", "http_404", 1)


def test_slow_server_times_out() -> None:
    with serve({"/a.png": png_route(delay=3.0)}) as server:
        started = time.monotonic()
        result = fetch(server.url("/a.png"), settings(timeout=0.3, retries=1))
        elapsed = time.monotonic() - started
    assert (result.outcome, result.reason, result.attempts) == ("failed", "timeout", 2)
    assert elapsed < 2.0


def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fetch(f"http://127.0.0.1:{port}/a.png", settings(respect_robots=False))
    assert (result.outcome, result.reason, result.attempts) == ("failed", "connect_error", 3)


# --- redirects ---------------------------------------------------------------------------------


def test_redirects_are_followed_and_counted() -> None:
    routes = {
        "/old.png": redirect("/mid", 301),
        "/mid": redirect("new.png"),
        "/new.png": png_route(),
    }
    with serve(routes) as server:
        result = fetch(server.url("/old.png"))
    assert result.outcome == "ok" and result.data == PNG
    assert result.final_url == server.url("/new.png")
    assert result.attempts == 3


def test_redirect_loop() -> None:
    with serve({"/a": redirect("/b"), "/b": redirect("/a")}) as server:
        result = fetch(server.url("/a"))
        assert server.count("/a") == 1 and server.count("/b") == 1
    assert (result.outcome, result.reason) == ("failed", "redirect_loop")


def test_too_many_redirects() -> None:
    routes = {f"/r{i}": redirect(f"/r{i + 1}") for i in range(10)}
    with serve(routes) as server:
        result = fetch(server.url("/r0"), settings(max_redirects=3))
        assert server.count("/r4") == 0
    assert (result.outcome, result.reason, result.attempts) == ("failed", "too_many_redirects", 4)


def test_redirect_hop_disallowed_by_robots() -> None:
    robots = Route(body=b"User-agent: *\nDisallow: /private/\n")
    routes = {
        "/robots.txt": robots,
        "/a.png": redirect("/private/a.png"),
        "/private/a.png": png_route(),
    }
    with serve(routes) as server:
        result = fetch(server.url("/a.png"))
        assert server.count("/private/a.png") == 0
    assert (result.outcome, result.final_url) == ("robots", server.url("/private/a.png"))


def test_redirect_to_another_scheme_is_refused() -> None:
    with serve({"/a.png": redirect("file:///etc/passwd")}) as server:
        result = fetch(server.url("/a.png"))
    assert (result.outcome, result.reason) == ("refused", "scheme")


def test_redirect_to_a_host_not_on_the_allow_list_is_refused() -> None:
    with serve({"/secret.png": png_route()}) as inner, serve({}) as outer:
        outer.routes["/a.png"] = redirect(f"http://localhost:{inner.port}/secret.png")
        result = fetch(outer.url("/a.png"))
        assert inner.connections == 0
    assert (result.outcome, result.reason) == ("refused", "redirect_to_private")


def test_redirect_to_a_private_address_is_refused_before_connecting() -> None:
    with serve({"/a.png": redirect("http://10.0.0.1/a.png")}) as server:
        started = time.monotonic()
        result = fetch(server.url("/a.png"), settings(timeout=5.0, retries=0))
        elapsed = time.monotonic() - started
    assert (result.outcome, result.reason) == ("refused", "redirect_to_private")
    assert result.final_url == "http://10.0.0.1/a.png"
    assert elapsed < 1.0


# --- safety ------------------------------------------------------------------------------------


def test_default_settings_refuse_loopback_before_connecting() -> None:
    with serve({"/a.png": png_route()}) as server:
        result = fetch(server.url("/a.png"), FetchSettings())
        assert server.connections == 0 and server.requests == []
    assert (result.outcome, result.reason, result.attempts) == ("refused", "private_address", 0)


def test_private_literal_address_is_refused_before_connecting() -> None:
    started = time.monotonic()
    result = fetch("http://10.0.0.1/a.png", settings(timeout=5.0, retries=0))
    assert (result.outcome, result.reason, result.attempts) == ("refused", "private_address", 0)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/a.png", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("//example.org/a.png", "scheme"),
        ("http:///a.png", "no_host"),
        ("http://[::1/a.png", "invalid_url"),
        ("http://exa mple.org/a.png", "invalid_url"),
        ("http://ex%41mple.org/a.png", "invalid_url"),
    ],
)
def test_bad_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_scheme(url)
    assert caught.value.reason == reason and url in str(caught.value)
    result = fetch(url)
    assert (result.outcome, result.reason, result.data) == ("refused", reason, None)


def test_http_and_https_pass_the_scheme_check() -> None:
    check_scheme("http://example.org/a.png")
    check_scheme("HTTPS://example.org:8443/a.png?x=1")


NOT_PUBLIC = [
    "127.0.0.1",  # loopback
    "127.8.9.10",
    "::1",
    "10.1.2.3",  # private
    "172.16.0.1",
    "192.168.1.1",
    "fc00::1",
    "169.254.169.254",  # link-local: cloud metadata
    "fe80::1",
    "224.0.0.1",  # multicast
    "ff02::1",
    "240.0.0.1",  # reserved
    "0.0.0.0",  # unspecified
    "::",
    "100.64.0.1",  # shared address space
    "::ffff:127.0.0.1",  # IPv4-mapped IPv6
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::",  # 6to4 wrapping 10.0.0.1
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_check_host_refuses_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(UnsafeURL) as caught:
        asyncio.run(check_host(address, 80, frozenset()))
    assert caught.value.reason == "private_address"


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_check_host_accepts_public_addresses(address: str) -> None:
    resolved = asyncio.run(check_host(address, 443, frozenset()))
    assert [ipaddress.ip_address(text) for text in resolved] == [ipaddress.ip_address(address)]


def test_check_host_allow_list() -> None:
    assert asyncio.run(check_host("127.0.0.1", 80, frozenset({"127.0.0.1"}))) == ["127.0.0.1"]
    assert asyncio.run(check_host("[::1]", 80, frozenset({"::1"}))) == ["::1"]
    found = asyncio.run(check_host("LocalHost", 80, frozenset({"localhost"})))
    assert {ipaddress.ip_address(a).is_loopback for a in found} == {True}
    # A name is exempt only by its own name, never by an address it resolves to.
    with pytest.raises(UnsafeURL) as caught:
        asyncio.run(check_host("localhost", 80, frozenset({"127.0.0.1", "::1"})))
    assert caught.value.reason == "private_address"


def _fake_resolver(addresses: list[str]):
    async def getaddrinfo(host, port, **kwargs):
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [
            (family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    return getaddrinfo


async def _check_with_resolver(addresses: list[str]) -> list[str]:
    loop = asyncio.get_running_loop()
    loop.getaddrinfo = _fake_resolver(addresses)  # type: ignore[method-assign]
    return await check_host("images.example.org", 443, frozenset())


def test_check_host_refuses_a_name_with_any_private_address() -> None:
    assert asyncio.run(_check_with_resolver(["93.184.215.14"])) == ["93.184.215.14"]
    with pytest.raises(UnsafeURL) as caught:
        asyncio.run(_check_with_resolver(["93.184.215.14", "10.0.0.7"]))
    assert caught.value.reason == "private_address"
    assert "images.example.org" in str(caught.value)


def test_check_host_unresolvable() -> None:
    # `.invalid` never resolves (RFC 2606): a real lookup, answered without any network.
    with pytest.raises(UnsafeURL) as caught:
        asyncio.run(check_host("nosuch.invalid", 80, frozenset()))
    assert caught.value.reason == "unresolvable"


# --- size limits -------------------------------------------------------------------------------

FIFTY_MB = 50_000_000


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_over_max_bytes_is_abandoned(declared: bool) -> None:
    headers = {"Content-Type": "image/jpeg"}
    if declared:
        headers["Content-Length"] = str(FIFTY_MB)
    route = Route(body=repeat(b"\xff" * 65536, FIFTY_MB), headers=headers)
    with serve({"/big.jpg": route}) as server:
        started = time.monotonic()
        result = fetch(server.url("/big.jpg"), settings(max_bytes=200_000))
        elapsed = time.monotonic() - started
        assert server.wait_idle()
        (request,) = server.of("/big.jpg")
    assert (result.outcome, result.reason, result.data) == ("failed", "too_large", None)
    assert result.attempts == 1
    assert elapsed < 3.0
    assert not request.completed and request.bytes_sent < FIFTY_MB


def test_body_at_max_bytes_is_accepted() -> None:
    with serve({"/a.png": png_route(chunked=True)}) as server:
        result = fetch(server.url("/a.png"), settings(max_bytes=len(PNG)))
    assert result.outcome == "ok" and result.data == PNG


# --- politeness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("concurrency", "expect_overlap"), [(1, False), (3, True)])
def test_per_host_concurrency(concurrency: int, expect_overlap: bool) -> None:
    routes = {f"/{i}.png": png_route(delay=0.15) for i in range(6)}
    with serve(routes) as server:
        urls = [server.url(f"/{i}.png") for i in range(6)]
        fetch_settings = settings(per_host_concurrency=concurrency, respect_robots=False)
        results = fetch_many(urls, fetch_settings)
    assert all(result.outcome == "ok" for result in results)
    if expect_overlap:
        assert 2 <= server.max_in_flight <= concurrency
    else:
        assert server.max_in_flight == 1


def test_per_host_rate() -> None:
    routes = {f"/{i}.png": png_route() for i in range(6)}
    with serve(routes) as server:
        urls = [server.url(f"/{i}.png") for i in range(6)]
        fetch_settings = settings(per_host_rate=5.0, per_host_concurrency=6, respect_robots=False)
        results = fetch_many(urls, fetch_settings)
        starts = sorted(request.started for request in server.requests)
    assert all(result.outcome == "ok" for result in results)
    assert starts[-1] - starts[0] >= 0.95
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.15


def test_rate_limit_covers_robots_and_retries() -> None:
    routes = {"/a.png": [Route(status=500), png_route()]}
    with serve(routes) as server:
        result = fetch(server.url("/a.png"), settings(per_host_rate=4.0))
        starts = [request.started for request in server.requests]
    assert result.outcome == "ok"
    assert [request.path for request in server.requests] == ["/robots.txt", "/a.png", "/a.png"]
    assert starts[-1] - starts[0] >= 0.45


# --- JSON --------------------------------------------------------------------------------------


def test_get_json_returns_the_document_and_merges_params() -> None:
    document = {"query": {"pages": [{"title": "File:Flag.png"}]}}
    route = Route(body=json.dumps(document).encode(), headers={"Content-Type": "application/json"})
    with serve({"/api.php": route}) as server:
        answer = get_json(server.url("/api.php?action=query"), {"titles": "File:Flag.png"})
        (request,) = server.of("/api.php")
    assert answer == document
    assert request.query == "action=query&titles=File%3AFlag.png"
    assert request.headers["accept"] == "application/json"
    assert CONTACT in request.headers["user-agent"]


def test_get_json_raises_on_a_body_that_is_not_json() -> None:
    with serve({"/api.php": Route(body=b"<html>maintenance</html>")}) as server:
        with pytest.raises(FetchError) as caught:
            get_json(server.url("/api.php"))
    assert caught.value.reason == "not_json"


def test_get_json_raises_on_http_errors_after_retries() -> None:
    with serve({"/api.php": Route(status=503)}) as server:
        with pytest.raises(FetchError) as caught:
            get_json(server.url("/api.php"), fetch_settings=settings(retries=1))
        assert server.count("/api.php") == 2
    assert caught.value.reason == "http_503"


def test_get_json_raises_on_a_refused_host() -> None:
    with serve({"/api.php": Route(body=b"{}")}) as server:
        with pytest.raises(FetchError) as caught:
            get_json(server.url("/api.php"), fetch_settings=FetchSettings())
        assert server.connections == 0
    assert caught.value.reason == "private_address"


def test_get_json_respects_robots() -> None:
    robots = Route(body=b"User-agent: *\nDisallow: /api.php\n")
    with serve({"/robots.txt": robots, "/api.php": Route(body=b"{}")}) as server:
        with pytest.raises(FetchError) as caught:
            get_json(server.url("/api.php"))
        assert server.count("/api.php") == 0
    assert caught.value.reason == "robots"


def test_settings_reject_unknown_and_invalid_values() -> None:
    with pytest.raises(ValueError):
        FetchSettings(per_host_rate=0)
    with pytest.raises(ValueError):
        FetchSettings(per_host_concurrency=0)
    with pytest.raises(ValueError):
        FetchSettings(contcat="typo@example.org")  # type: ignore[call-arg]


def test_user_agent_forms() -> None:
    assert Fetcher(FetchSettings()).user_agent.startswith("groundforge/")
    assert Fetcher(FetchSettings(contact=CONTACT)).user_agent.endswith(f"(+{CONTACT})")
    assert Fetcher(FetchSettings(user_agent="FlagBot/2.0")).user_agent == "FlagBot/2.0"


def test_server_helper_counts_connections_without_requests() -> None:
    with serve({}) as server:
        assert isinstance(server, Server)
        socket.create_connection((server.host, server.port)).close()
        deadline = time.monotonic() + 2
        while server.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections == 1 and server.requests == []
