"""robots.txt rules, fetched once per origin and applied as RFC 9309 says."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

# RFC 9309 2.3.1.2: past five redirects a crawler may treat robots.txt as unavailable, the same
# as a 4xx answer.
ROBOTS_MAX_REDIRECTS = 5
_UNAVAILABLE = frozenset({"too_many_redirects", "redirect_loop"})


@dataclass(frozen=True)
class RobotsAnswer:
    """The outcome of fetching one robots.txt.

    ``status`` is the final HTTP status, or 0 when no HTTP answer came back (then ``reason``
    holds the fetcher's failure code, e.g. ``timeout``).
    """

    status: int
    body: bytes = b""
    reason: str = ""


RobotsGet = Callable[[str], Awaitable[RobotsAnswer]]


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_answer(answer: RobotsAnswer) -> RobotFileParser:
    """Turn a robots.txt answer into rules.

    2xx: the file's rules. 4xx, or a redirect chain too long or looping: no rules (everything
    allowed). 5xx, or the site unreachable: everything disallowed, since the site may be
    unable to say what it forbids.
    """
    parser = RobotFileParser()
    if 200 <= answer.status < 300:
        text = answer.body.decode("utf-8", errors="replace").lstrip("\ufeff")
        parser.parse(text.splitlines())
    elif 400 <= answer.status < 500 or (answer.status == 0 and answer.reason in _UNAVAILABLE):
        parser.allow_all = True
    else:
        parser.disallow_all = True
    return parser


class RobotsCache:
    """Answers whether a URL may be fetched, loading each origin's robots.txt once.

    ``get`` fetches one robots.txt URL (through the same safety checks, limits and pacing as
    every other request, following up to :data:`ROBOTS_MAX_REDIRECTS` redirects). Callers
    asking about the same origin at once share a single fetch.
    """

    def __init__(self, get: RobotsGet, user_agent: str):
        self._get = get
        self.user_agent = user_agent
        self._rules: dict[str, asyncio.Task[RobotFileParser]] = {}

    async def allowed(self, url: str) -> bool:
        """Whether the rules for ``url``'s origin let this user agent fetch it."""
        origin = _origin(url)
        task = self._rules.get(origin)
        if task is None:
            task = asyncio.ensure_future(self._load(origin))
            self._rules[origin] = task
        # Shielded so that one cancelled caller does not cancel the fetch the others await.
        rules = await asyncio.shield(task)
        return rules.can_fetch(self.user_agent, url)

    def close(self) -> None:
        """Cancel robots.txt fetches still running, e.g. when the fetcher shuts down."""
        for task in self._rules.values():
            task.cancel()

    async def _load(self, origin: str) -> RobotFileParser:
        return parse_answer(await self._get(f"{origin}/robots.txt"))
