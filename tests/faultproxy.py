"""A scriptable HTTP proxy that injects faults between a client and an OpenAI-compatible server.

Every request is numbered (from 1), recorded (path, headers, body, arrival time, fault) and
passed to ``rule(number, body_json)``, which names a fault from :data:`FAULTS` or returns None to
forward it untouched::

    with FaultProxy(upstream_base_url, rule=fail_prompts({"q3": ("server_error", 2)})) as proxy:
        backend = OpenAIBackend(EndpointSettings(proxy.base_url, model))
        ...
        assert proxy.counts["server_error"] == 2

Faults answered by the proxy alone: ``rate_limited`` (429 with ``Retry-After: retry_after``),
``server_error`` (500), ``bad_request`` (400), ``unauthorized`` (401 whose message echoes the
bearer token, as some hosted APIs do), ``timeout`` (no answer for ``hang`` seconds, then
the connection is closed), ``drop`` (connection closed at once), ``invalid_json`` (200, truncated
JSON), ``not_completion`` (200, JSON that is not a completion). Faults that forward first and
then alter the server's real completion: ``slow`` (forwarded after ``slow`` seconds),
``no_choices``, ``empty``, ``refusal`` (``refusal`` set, content null), ``content_filter``.

``max_in_flight`` is the most requests being handled at once (a hung ``timeout`` request counts
until its ``hang`` ends, even though its client has given up).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = (
    "rate_limited",
    "server_error",
    "bad_request",
    "unauthorized",
    "timeout",
    "drop",
    "invalid_json",
    "not_completion",
    "slow",
    "no_choices",
    "empty",
    "refusal",
    "content_filter",
)

Rule = Callable[[int, Any], str | None]

# Not forwarded: they describe one hop, or (Accept-Encoding) would let the server compress a body
# the proxy has to edit.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "host",
    "accept-encoding",
    "content-encoding",
}


@dataclass
class Seen:
    """One request as the proxy received it."""

    number: int
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes
    json: Any
    fault: str | None
    arrived: float  # time.monotonic()
    status: int | None = None  # None when no response was sent


def prompt_text(body: Any) -> str | None:
    """The text part of the last user turn of a chat-completion body."""
    try:
        content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, str):
        return content
    texts = [part.get("text") for part in content if part.get("type") == "text"]
    return texts[-1] if texts else None


def fail_prompts(plan: dict[str, tuple[str, int | None]]) -> Rule:
    """A rule failing the request whose prompt is a key of ``plan`` with ``(fault, times)``:
    its first ``times`` requests get the fault (every one when ``times`` is None)."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def rule(number: int, body: Any) -> str | None:
        prompt = prompt_text(body)
        if prompt not in plan:
            return None
        fault, times = plan[prompt]
        with lock:
            seen[prompt] += 1
            return fault if times is None or seen[prompt] <= times else None

    return rule


class FaultProxy:
    """Forwards requests to ``upstream`` (a base URL such as ``http://127.0.0.1:8000/v1``)."""

    def __init__(
        self,
        upstream: str,
        rule: Rule | None = None,
        *,
        retry_after: str = "1",
        hang: float = 3.0,
        slow: float = 0.3,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.rule = rule
        self.retry_after = retry_after
        self.hang = hang
        self.slow = slow
        self.requests: list[Seen] = []
        # GET /models (a run's pre-flight check): forwarded, never faulted, not in `requests`.
        self.listings = 0
        self.counts: Counter[str] = Counter()  # per fault, "forwarded" for none
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.prefix}"

    @property
    def total(self) -> int:
        return len(self.requests)

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        # Idle keep-alive connections must not hold up stop().
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def reset(self, rule: Rule | None = None) -> None:
        """Forget what was seen and install ``rule``."""
        with self._lock:
            self.rule = rule
            self.requests.clear()
            self.listings = 0
            self.counts.clear()
            self.max_in_flight = 0

    def seen_for(self, prompt: str) -> list[Seen]:
        """The requests carrying ``prompt``, in arrival order."""
        with self._lock:
            return [s for s in self.requests if prompt_text(s.json) == prompt]

    def _arrive(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Seen:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        with self._lock:
            number = len(self.requests) + 1
            rule = self.rule
        # The rule runs outside the lock: it may be slow or take its own locks.
        fault = rule(number, parsed) if rule is not None else None
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        seen = Seen(number, method, path, headers, body, parsed, fault, time.monotonic())
        with self._lock:
            self.requests.append(seen)
            self.counts[fault or "forwarded"] += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return seen

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _forward(self, seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in seen.headers.items() if k not in _HOP_HEADERS}
            conn.request(seen.method, seen.path, body=seen.body or None, headers=headers)
            response = conn.getresponse()
            body = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            return response.status, kept, body
        finally:
            conn.close()


def _error(status: int, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps({"error": {"message": message, "type": "injected", "code": status}})
    return status, [("Content-Type", "application/json")], body.encode()


def _edit_completion(fault: str, body: bytes) -> bytes:
    data = json.loads(body)
    if fault == "no_choices":
        data["choices"] = []
    else:
        choice = data["choices"][0]
        if fault == "empty":
            choice["message"]["content"] = ""
        elif fault == "refusal":
            choice["message"]["content"] = None
            choice["message"]["refusal"] = "I cannot help with that request."
        elif fault == "content_filter":
            choice["finish_reason"] = "content_filter"
    return json.dumps(data).encode()


def _handler_class(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, like the real server; every response below carries Content-Length.
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one stderr line per request would drown test output

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.command == "GET" and self.path.endswith("/models"):
                with proxy._lock:
                    proxy.listings += 1
                listing = Seen(0, "GET", self.path, headers, body, None, None, time.monotonic())
                self._respond(listing)
                return
            seen = proxy._arrive(self.command, self.path, headers, body)
            try:
                self._respond(seen)
            finally:
                proxy._leave()

        def _respond(self, seen: Seen) -> None:
            fault = seen.fault
            if fault in ("timeout", "drop"):
                if fault == "timeout":
                    proxy._stop.wait(proxy.hang)
                self.close_connection = True
                return
            if fault == "rate_limited":
                status, headers, body = _error(429, "injected rate limit")
                headers.append(("Retry-After", proxy.retry_after))
            elif fault == "server_error":
                status, headers, body = _error(500, "injected server error")
            elif fault == "bad_request":
                status, headers, body = _error(400, "injected bad request")
            elif fault == "unauthorized":
                token = seen.headers.get("authorization", "").removeprefix("Bearer ")
                status, headers, body = _error(401, f"Incorrect API key provided: {token}")
            elif fault == "invalid_json":
                status, headers = 200, [("Content-Type", "application/json")]
                body = b'{"id": "x", "choices": [{"message": {"content": "trunc'
            elif fault == "not_completion":
                status, headers = 200, [("Content-Type", "application/json")]
                body = json.dumps({"object": "list", "data": []}).encode()
            else:
                if fault == "slow":
                    proxy._stop.wait(proxy.slow)
                status, headers, body = proxy._forward(seen)
                if status == 200 and fault in ("no_choices", "empty", "refusal", "content_filter"):
                    body = _edit_completion(fault, body)
            seen.status = status
            try:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (its timeout)

    return Handler
