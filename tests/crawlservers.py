"""Small real HTTP/1.1 servers on 127.0.0.1 for crawler tests.

A server answers the paths it is given with scripted :class:`Route` responses and records every
request it sees::

    with serve({"/a.png": Route(body=png, headers={"Content-Type": "image/png"})}) as server:
        url = server.url("/a.png")
        ...
        assert server.count("/a.png") == 1

A path may map to a list of routes: the n-th request to it gets the n-th route and the last one
repeats, e.g. ``[Route(status=500), Route(body=png)]`` fails once, then succeeds. Paths are
matched without the query string; unknown paths answer 404. ``server.routes`` may be changed
while the server runs (e.g. to redirect to a second server's URL).

A route with ``trickle`` writes its whole response (status line and headers included) one byte
at a time, ``trickle`` seconds apart, as a server that stalls a client would.

A route's body is bytes or a callable returning an iterable of chunks (for large or endless
streams that must not be built in memory). A body is sent with Content-Length unless the route
sets ``chunked`` or the body is a callable; a ``Content-Length`` given in ``headers`` is sent
as is and the body is written raw after it, true or not.

Each :class:`Request` records its arrival and end times, how many body bytes were written and
whether the whole response was written (``completed`` is False when the client went away
first). ``server.max_in_flight`` is the most requests handled at once; a request counts as in
flight from its arrival until its response starts (after the route's ``delay``), so a client
cannot see a response before the server stops counting it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Body = bytes | Callable[[], Iterable[bytes]]


@dataclass(frozen=True)
class Route:
    """One scripted response: status, headers, body, and a delay before it starts."""

    status: int = 200
    body: Body = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunked: bool = False
    trickle: float = 0.0


def redirect(location: str, status: int = 302) -> Route:
    """A redirect to ``location`` (absolute, or relative to the request)."""
    return Route(status=status, headers={"Location": location})


def repeat(chunk: bytes, total: int) -> Callable[[], Iterable[bytes]]:
    """A body of ``total`` bytes made of ``chunk`` repeated, generated as it is sent."""

    def chunks() -> Iterable[bytes]:
        left = total
        while left > 0:
            piece = chunk[:left]
            left -= len(piece)
            yield piece

    return chunks


@dataclass
class Request:
    """One request the server received; header names are lower-cased."""

    path: str
    query: str
    headers: dict[str, str]
    started: float
    finished: float | None = None
    status: int = 0
    bytes_sent: int = 0
    completed: bool = False


class Server:
    """A threaded HTTP server on 127.0.0.1; use :func:`serve` to start one."""

    def __init__(self, routes: Mapping[str, Route | Sequence[Route]] | None = None):
        self.routes: dict[str, Route | Sequence[Route]] = dict(routes or {})
        self.requests: list[Request] = []
        self.connections = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _HTTPServer(self)
        self.host, self.port = self._httpd.server_address[:2]
        self.base_url = f"http://{self.host}:{self.port}"
        # A short poll interval keeps shutdown, which waits for the next poll, fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base_url + path

    def count(self, path: str) -> int:
        """How many requests asked for ``path`` (query string ignored)."""
        with self._lock:
            return sum(1 for request in self.requests if request.path == path)

    def of(self, path: str) -> list[Request]:
        """The requests for ``path``, in arrival order."""
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every recorded request has finished; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(request.finished is not None for request in self.requests):
                    return True
            time.sleep(0.01)
        return False

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _arrive(self, path: str, query: str, headers: dict[str, str]) -> tuple[Request, Route]:
        with self._lock:
            nth = sum(1 for request in self.requests if request.path == path)
            request = Request(path=path, query=query, headers=headers, started=time.monotonic())
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            script = self.routes.get(path, Route(status=404, body=b"not found"))
        if isinstance(script, Route):
            return request, script
        return request, script[min(nth, len(script) - 1)]

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A handler may sit in a keep-alive read that only the client ends; do not wait for it.
    block_on_close = False

    def __init__(self, owner: Server):
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.owner._connected()
        return True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up on a kept-alive connection is what clients do, not a server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Ends a handler thread left waiting on an idle keep-alive connection.
    timeout = 10
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        headers = {name.lower(): value for name, value in self.headers.items()}
        request, route = owner._arrive(path, query, headers)
        responding = False
        try:
            if route.delay and owner._stopping.wait(route.delay):
                self.close_connection = True
                return
            owner._leave()
            responding = True
            request.status = route.status
            self._write(route, request)
            request.completed = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            if not responding:
                owner._leave()
            request.finished = time.monotonic()

    def _write(self, route: Route, request: Request) -> None:
        if route.trickle:
            self._trickle(route, request)
            return
        if isinstance(route.body, bytes):
            chunks: Iterable[bytes] = [route.body]
            length: int | None = len(route.body)
        else:
            chunks = route.body()
            length = None
        explicit_length = any(name.lower() == "content-length" for name in route.headers)
        chunked = not explicit_length and (route.chunked or length is None)
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not explicit_length:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        for chunk in chunks:
            if not chunk:
                continue
            if chunked:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                self.wfile.write(chunk)
            request.bytes_sent += len(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _trickle(self, route: Route, request: Request) -> None:
        body = route.body if isinstance(route.body, bytes) else b"".join(route.body())
        head = [f"HTTP/1.1 {route.status} {self.responses[route.status][0]}"]
        head += [f"{name}: {value}" for name, value in route.headers.items()]
        head += [f"Content-Length: {len(body)}", "", ""]
        head_bytes = "\r\n".join(head).encode("latin-1")
        stopping = self.server.owner._stopping
        for n, byte in enumerate(head_bytes + body):
            if n and stopping.wait(route.trickle):
                raise ConnectionAbortedError("the server is stopping")
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if n >= len(head_bytes):
                request.bytes_sent += 1


def serve(routes: Mapping[str, Route | Sequence[Route]] | None = None) -> Server:
    """A server for ``routes``, to use as ``with serve(routes) as server:``."""
    return Server(routes)
