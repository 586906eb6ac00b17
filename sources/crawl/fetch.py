"""A polite, safe HTTP fetcher for images and JSON APIs.

Every request, including retries, redirect hops and robots.txt, goes through the same path:

1. the URL's scheme and host are checked (:mod:`.safety`) before anything connects;
2. robots.txt for the URL's origin is consulted (:mod:`.robots`) when ``respect_robots``;
3. the request waits for a per-host slot (at most ``per_host_concurrency`` at once) and for
   the per-host pace (request starts at least ``1 / per_host_rate`` seconds apart);
4. the whole request (connecting, the headers, the body) must end within ``timeout``;
5. the body is streamed and abandoned as soon as it passes ``max_bytes``, counted after
   decompression: gzip and deflate are inflated here in bounded pieces, so a small compressed
   body cannot grow past the limit in memory; other content codings are refused.

Requests go straight to an httpx transport, so the client's redirect handling never parses a
``Location``; redirects are followed by hand so that each hop passes steps 1 and 2 again, and a
``Location`` (or a listed URL) that does not parse is refused with reason ``invalid_url``. A hop
that leads to a non-public address is refused with reason ``redirect_to_private``
(``private_address`` is kept for a URL that was private to begin with), so a crawl log tells a
bad input from a site that bounces visitors inward.

The addresses are checked when each hop starts and the connection then resolves the name again,
so a name whose DNS answer changes in between (DNS rebinding) is not caught. Proxy settings from
the environment are ignored: through a proxy, the checked address would not be the one reached.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic
from PIL import Image

from groundforge import __version__
from groundforge.retryafter import retry_after
from groundforge.schemas.records import sha256_hex
from groundforge.sources.crawl.robots import ROBOTS_MAX_REDIRECTS, RobotsAnswer, RobotsCache
from groundforge.sources.crawl.safety import UnsafeURL, check_host, check_scheme

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Content codings inflated here, by zlib window bits; zlib's max_length bounds each piece.
_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
_ACCEPT_ENCODING = "gzip, deflate"
# Stacked codings are legal but rare; each layer holds a zlib window and one piece.
_MAX_CODINGS = 3
_PIECE = 64 * 1024

# Formats decoded in-process by Pillow alone. Pillow can open more (EPS runs Ghostscript, for
# one); anything else is a decode_error rather than a reason to run an external program.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# MPO is the multi-picture JPEG that many cameras write: the first picture is a plain JPEG.
_FORMAT_INFO = {
    "JPEG": ("image/jpeg", "jpg"),
    "MPO": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tif"),
}


class FetchSettings(pydantic.BaseModel, extra="forbid"):
    """How the fetcher identifies itself, paces requests and bounds what it accepts.

    Limits "per host" apply to a host name (or IP) whatever the port.
    """

    contact: str = pydantic.Field(
        default="", description="E-mail or URL put in the User-Agent, so sites can reach you."
    )
    user_agent: str | None = pydantic.Field(
        default=None, description="Overrides the default 'groundforge/<version> (+contact)'."
    )
    per_host_concurrency: int = pydantic.Field(
        default=2, ge=1, description="Requests in flight at once per host."
    )
    per_host_rate: float = pydantic.Field(
        default=1.0, gt=0, description="Request starts per second per host."
    )
    timeout: float = pydantic.Field(
        default=30.0,
        gt=0,
        description="Seconds allowed for one request (connecting, the headers and the whole "
        "body), and for resolving a host.",
    )
    max_redirects: int = pydantic.Field(default=5, ge=0, description="Redirect hops followed.")
    max_bytes: int = pydantic.Field(
        default=25_000_000, ge=1, description="Largest body accepted; larger ones are abandoned."
    )
    max_pixels: int = pydantic.Field(
        default=64_000_000, ge=1, description="Largest image (width x height) decoded."
    )
    retries: int = pydantic.Field(
        default=4,
        ge=0,
        description="Extra attempts after a 429, a 5xx, a timeout or a lost connection.",
    )
    backoff: float = pydantic.Field(
        default=1.0, ge=0, description="Base of the exponential wait between attempts, seconds."
    )
    max_backoff: float = pydantic.Field(
        default=60.0, ge=0, description="Longest wait between attempts, Retry-After included."
    )
    respect_robots: bool = pydantic.Field(default=True, description="Obey robots.txt.")
    allow_private_hosts: list[str] = pydantic.Field(
        default=[],
        description="Hosts or IPs exempt from the rule against non-public addresses.",
    )


@dataclass(frozen=True)
class FetchResult:
    """What happened to one URL; ``data`` is set only when ``outcome`` is ``"ok"``.

    ``outcome`` is ``ok``, ``robots`` (disallowed by robots.txt), ``refused`` (a safety rule:
    reasons ``scheme``, ``invalid_url``, ``no_host``, ``private_address``,
    ``redirect_to_private``) or ``failed`` (reasons ``http_<status>``, ``timeout``,
    ``connect_error``, ``bad_encoding`` (a content coding that is corrupt or not gzip/deflate),
    ``unresolvable``, ``too_many_redirects``,
    ``redirect_loop``, ``too_large``, ``not_an_image``, ``decode_error``, ``too_many_pixels``).
    ``mime``, ``ext`` and the size come from the decoded image, never from the URL or headers.
    ``attempts`` counts the HTTP requests sent for this URL, redirect hops and retries included.
    """

    url: str
    final_url: str
    outcome: str
    reason: str = ""
    detail: str = ""
    data: bytes | None = None
    mime: str = ""
    ext: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""
    attempts: int = 0


class FetchError(Exception):
    """A JSON request that did not succeed.

    ``reason`` is one of the :class:`FetchResult` reason codes, ``robots``, or ``not_json``.
    """

    def __init__(self, reason: str, url: str, detail: str = ""):
        super().__init__(f"{reason}: {url}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.url = url
        self.detail = detail


class _Failure(Exception):
    def __init__(self, outcome: str, reason: str, detail: str = "", status: int = 0):
        super().__init__(f"{outcome}/{reason}: {detail}")
        self.outcome = outcome
        self.reason = reason
        self.detail = detail
        self.status = status


@dataclass
class _Trace:
    final_url: str
    attempts: int = 0


@dataclass
class _Response:
    status: int
    headers: httpx.Headers
    body: bytes = b""


@dataclass(frozen=True)
class _Want:
    """What one kind of request accepts."""

    accept: str
    images_only: bool = False
    # Keep the first max_bytes of a larger body instead of failing (robots.txt).
    truncate: bool = False


_IMAGE = _Want(accept="image/*", images_only=True)
_JSON = _Want(accept="application/json")
_ROBOTS = _Want(accept="text/plain", truncate=True)


@dataclass
class _Host:
    slots: asyncio.Semaphore
    next_start: float = 0.0


class Fetcher:
    """Fetches images and JSON within the limits of one :class:`FetchSettings`.

    Use as ``async with Fetcher(settings) as fetcher:``; it owns one ``httpx.AsyncClient``.
    """

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self._allow = frozenset(settings.allow_private_hosts)
        self._transport: httpx.AsyncHTTPTransport | None = None
        self._hosts: dict[str, _Host] = {}
        self._robots = RobotsCache(self._get_robots, self.user_agent)

    @property
    def user_agent(self) -> str:
        """The User-Agent sent with every request."""
        if self.settings.user_agent:
            return self.settings.user_agent
        if self.settings.contact:
            return f"groundforge/{__version__} (+{self.settings.contact})"
        return f"groundforge/{__version__}"

    async def __aenter__(self) -> Fetcher:
        self._transport = httpx.AsyncHTTPTransport(
            # Per-host semaphores bound the connections; a pool cap would turn waiting for a
            # free connection into spurious timeouts.
            limits=httpx.Limits(max_connections=None),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._robots.close()
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def fetch_image(self, url: str) -> FetchResult:
        """Download and decode one image; never raises for a problem with this URL."""
        trace = _Trace(final_url=url)
        try:
            response = await self._get(url, _IMAGE, self.settings.max_redirects, trace)
            width, height, mime, ext = await asyncio.to_thread(
                _decode, response.body, self.settings.max_pixels
            )
        except _Failure as failure:
            return FetchResult(
                url=url,
                final_url=trace.final_url,
                outcome=failure.outcome,
                reason=failure.reason,
                detail=failure.detail,
                attempts=trace.attempts,
            )
        return FetchResult(
            url=url,
            final_url=trace.final_url,
            outcome="ok",
            data=response.body,
            mime=mime,
            ext=ext,
            width=width,
            height=height,
            sha256=sha256_hex(response.body),
            attempts=trace.attempts,
        )

    async def get_json(self, url: str, params: dict | None = None, robots: bool = True) -> Any:
        """GET a JSON document; raises :class:`FetchError` when it cannot.

        ``params`` are added to the query string already in ``url``. ``robots=False`` is for APIs
        made for programs whose site's robots.txt still disallows them for page crawlers (the
        MediaWiki API under ``/w/``); every other rule (safety, pace, limits) still applies.
        """
        try:
            full = str(httpx.URL(url).copy_merge_params(params)) if params else url
        except httpx.InvalidURL as exc:
            raise FetchError("invalid_url", url, str(exc)) from exc
        trace = _Trace(final_url=full)
        try:
            response = await self._get(
                full, _JSON, self.settings.max_redirects, trace, robots=robots
            )
        except _Failure as failure:
            raise FetchError(failure.reason, full, failure.detail) from failure
        try:
            return json.loads(response.body)
        except ValueError as exc:
            raise FetchError("not_json", full, str(exc)) from exc

    async def _get_robots(self, url: str) -> RobotsAnswer:
        try:
            response = await self._get(
                url, _ROBOTS, ROBOTS_MAX_REDIRECTS, _Trace(url), robots=False
            )
        except _Failure as failure:
            return RobotsAnswer(status=failure.status, reason=failure.reason)
        return RobotsAnswer(status=response.status, body=response.body)

    async def _get(
        self, url: str, want: _Want, max_redirects: int, trace: _Trace, robots: bool = True
    ) -> _Response:
        """Follow ``url`` through its redirects to a 2xx response, checking every hop."""
        seen: set[str] = set()
        current = url
        while True:
            trace.final_url = current
            target = await self._check(current, redirected=bool(seen))
            seen.add(str(target))
            if robots and self.settings.respect_robots and not await self._robots.allowed(current):
                raise _Failure("robots", "robots", f"robots.txt disallows {current}")
            response = await self._send_with_retries(target, want, trace)
            if response.status not in _REDIRECTS:
                return response
            location = response.headers["location"]
            try:
                following = target.join(location).copy_with(fragment=None)
            except (httpx.InvalidURL, ValueError) as exc:
                raise _Failure("refused", "invalid_url", f"Location {location!r}: {exc}") from exc
            current = str(following)
            if current in seen:
                raise _Failure("failed", "redirect_loop", f"{current} seen twice")
            if len(seen) > max_redirects:
                raise _Failure("failed", "too_many_redirects", f"more than {max_redirects}")

    async def _check(self, url: str, redirected: bool) -> httpx.URL:
        """Apply the safety rules to one hop; return its parsed URL."""
        try:
            check_scheme(url)
            target = httpx.URL(url)
            host = target.raw_host.decode("ascii")
            port = target.port or _DEFAULT_PORTS[target.scheme]
            # The system resolver has timeouts of its own, but they are not ``timeout``.
            await asyncio.wait_for(check_host(host, port, self._allow), self.settings.timeout)
        except (httpx.InvalidURL, ValueError) as exc:
            raise _Failure("refused", "invalid_url", str(exc)) from exc
        except asyncio.TimeoutError as exc:
            detail = f"resolving {url} took over {self.settings.timeout} s"
            raise _Failure("failed", "timeout", detail) from exc
        except UnsafeURL as exc:
            if exc.reason == "unresolvable":
                # A DNS failure says nothing about safety and may pass; a later run may retry.
                raise _Failure("failed", exc.reason, str(exc)) from exc
            reason = (
                "redirect_to_private"
                if redirected and exc.reason == "private_address"
                else exc.reason
            )
            raise _Failure("refused", reason, str(exc)) from exc
        return target

    async def _send_with_retries(self, target: httpx.URL, want: _Want, trace: _Trace) -> _Response:
        settings = self.settings
        attempt = 0
        while True:
            trace.attempts += 1
            wait: float | None = None
            try:
                response = await self._send(target, want)
            except httpx.TimeoutException as exc:
                failure = _Failure("failed", "timeout", f"{type(exc).__name__}: {exc}")
            except asyncio.TimeoutError:
                failure = _Failure(
                    "failed", "timeout", f"no whole answer within {settings.timeout} s"
                )
            except httpx.TransportError as exc:
                failure = _Failure("failed", "connect_error", f"{type(exc).__name__}: {exc}")
            else:
                status = response.status
                if 200 <= status < 300 or (status in _REDIRECTS and "location" in response.headers):
                    return response
                failure = _Failure("failed", f"http_{status}", str(target), status=status)
                if status in (429, 503):
                    wait = retry_after(response.headers)
                elif status < 500:
                    raise failure
            if attempt == settings.retries:
                raise failure
            if wait is None:
                wait = settings.backoff * 2**attempt * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(wait, settings.max_backoff))
            attempt += 1

    async def _send(self, target: httpx.URL, want: _Want) -> _Response:
        """One HTTP request inside the host's slot and pace, ending within ``timeout`` (waiting
        for the slot excluded); the body is read only on 2xx."""
        transport = self._transport
        if transport is None:
            raise RuntimeError("use the Fetcher as 'async with Fetcher(settings) as fetcher:'")
        request = httpx.Request(
            "GET",
            target,
            headers={
                "User-Agent": self.user_agent,
                "Accept": want.accept,
                "Accept-Encoding": _ACCEPT_ENCODING,
            },
            extensions={"timeout": httpx.Timeout(self.settings.timeout).as_dict()},
        )
        async with self._slot(target.raw_host.decode("ascii")):
            # httpx's own timeouts bound each read, not the request: a server sending one byte
            # at a time would hold the slot for as long as it liked.
            exchange = self._exchange(transport, request, want)
            return await asyncio.wait_for(exchange, self.settings.timeout)

    async def _exchange(
        self, transport: httpx.AsyncHTTPTransport, request: httpx.Request, want: _Want
    ) -> _Response:
        """Send ``request``, check the answer's headers and read its body within ``max_bytes``."""
        response = await transport.handle_async_request(request)
        try:
            return await self._receive(response, want)
        finally:
            await response.aclose()

    async def _receive(self, response: httpx.Response, want: _Want) -> _Response:
        """Check the answer's headers and read its body, decoded, within ``max_bytes``."""
        if not 200 <= response.status_code < 300:
            return _Response(response.status_code, response.headers)
        if want.images_only:
            mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not mime.startswith("image/"):
                raise _Failure("failed", "not_an_image", f"Content-Type {mime!r}")
        limit = self.settings.max_bytes
        declared = response.headers.get("content-length", "")
        if not want.truncate and declared.isdigit() and int(declared) > limit:
            raise _Failure("failed", "too_large", f"Content-Length {declared} > {limit}")
        layers = _decoders(response.headers.get("content-encoding", ""))
        body = bytearray()
        received = 0
        async for chunk in response.aiter_raw():
            for piece in _decode_layers(layers, chunk):
                room = limit - len(body)
                if len(piece) > room:
                    if want.truncate:
                        body += piece[:room]
                        return _Response(response.status_code, response.headers, bytes(body))
                    raise _Failure("failed", "too_large", f"body passed {limit} bytes")
                body += piece
            # Bytes on the wire count too: whatever follows the end of a compressed stream is
            # read but decodes to nothing.
            received += len(chunk)
            if received > limit:
                if want.truncate:
                    break
                raise _Failure("failed", "too_large", f"body passed {limit} bytes on the wire")
        return _Response(response.status_code, response.headers, bytes(body))

    @asynccontextmanager
    async def _slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of the host's concurrency slots, starting no sooner than its pace allows."""
        state = self._hosts.get(host)
        if state is None:
            state = _Host(asyncio.Semaphore(self.settings.per_host_concurrency))
            self._hosts[host] = state
        async with state.slots:
            loop = asyncio.get_running_loop()
            now = loop.time()
            start = max(now, state.next_start)
            # Reserved before sleeping, so concurrent holders queue behind one another.
            state.next_start = start + 1.0 / self.settings.per_host_rate
            await asyncio.sleep(start - now)
            yield


class _Inflater:
    """One gzip or deflate layer whose output comes in pieces of at most :data:`_PIECE` bytes."""

    def __init__(self, coding: str):
        self._coding = coding
        self._zlib = zlib.decompressobj(_CODINGS[coding])
        self._started = False

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """Inflate ``data``, yielding the output piece by piece as it is consumed."""
        while not self._zlib.eof:
            try:
                out = self._zlib.decompress(data, _PIECE)
            except zlib.error as exc:
                if self._coding == "deflate" and not self._started:
                    # Some servers send raw deflate without the zlib header the RFC asks for.
                    self._coding = "raw deflate"
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise _Failure("failed", "bad_encoding", f"{self._coding}: {exc}") from exc
            self._started = True
            data = self._zlib.unconsumed_tail
            if out:
                yield out
            # With no input left, a full piece may still leave output inside zlib: ask again.
            if not data and len(out) < _PIECE:
                return


def _decoders(header: str) -> list[_Inflater]:
    """The layers that undo a ``Content-Encoding``, in decoding order (the last coding first)."""
    codings = [
        c for c in (c.strip().lower() for c in header.split(",")) if c not in ("", "identity")
    ]
    if any(coding not in _CODINGS for coding in codings):
        raise _Failure("failed", "bad_encoding", f"unsupported Content-Encoding {header!r}")
    if len(codings) > _MAX_CODINGS:
        raise _Failure("failed", "bad_encoding", f"more than {_MAX_CODINGS} codings: {header!r}")
    return [_Inflater(coding) for coding in reversed(codings)]


def _decode_layers(layers: list[_Inflater], data: bytes) -> Iterator[bytes]:
    """Push ``data`` through ``layers``, one bounded piece at a time: however far a piece would
    expand, at most one piece per layer is held while the caller consumes the output."""
    if not layers:
        if data:
            yield data
        return
    for piece in layers[0].pieces(data):
        yield from _decode_layers(layers[1:], piece)


def _decode(data: bytes, max_pixels: int) -> tuple[int, int, str, str]:
    """Decode ``data`` fully; return width, height, MIME type and extension of the image."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _Failure(
                    "failed", "too_many_pixels", f"{width}x{height} > {max_pixels} pixels"
                )
            image.load()
            mime, ext = _FORMAT_INFO[image.format or ""]
    except Image.DecompressionBombError as exc:
        raise _Failure("failed", "too_many_pixels", str(exc)) from exc
    except _Failure:
        raise
    # Corrupt input makes Pillow's decoders raise almost anything (OSError, SyntaxError,
    # struct.error, IndexError, ...): every one of them means the bytes are not a usable image.
    except Exception as exc:
        raise _Failure("failed", "decode_error", f"{type(exc).__name__}: {exc}") from exc
    return width, height, mime, ext
