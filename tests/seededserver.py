"""A loopback chat endpoint that samples the way a seeded server does: its reply is a function of
the request body alone, the ``seed`` included (vLLM honours the seed, so k byte-identical requests
get k identical answers). A tiny real model cannot be made to be right on some seeds and wrong on
others; this server can::

    with SeededServer(answer) as server:      # answer(body_json) -> reply text
        backend = OpenAIBackend(EndpointSettings(server.base_url, "student"))
        ...
        server.bodies                          # every request body received, in arrival order

``usage(body) -> (prompt_tokens, completion_tokens)`` sets the token counts a reply reports
(default one of each), so a test can know a run's exact token totals.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[dict[str, Any]], str]
Usage = Callable[[dict[str, Any]], tuple[int, int]]


class SeededServer:
    """``POST /v1/chat/completions`` on 127.0.0.1, answered by ``answer(body)``."""

    def __init__(self, answer: Answer, usage: Usage | None = None):
        self.answer = answer
        self.usage = usage or (lambda body: (1, 1))
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def reset(self) -> None:
        with self._lock:
            self.bodies.clear()
            self.raw.clear()

    def __enter__(self) -> SeededServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _record(self, raw: bytes) -> tuple[dict[str, Any], str]:
        body = json.loads(raw)
        with self._lock:
            self.raw.append(raw)
            self.bodies.append(body)
        return body, self.answer(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        owner = self.server.owner
        body, text = owner._record(self.rfile.read(int(self.headers["Content-Length"])))
        prompt, completion = owner.usage(body)
        self._send(
            200,
            {
                "id": "cmpl-seeded",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
