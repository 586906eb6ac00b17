"""What is asked of a chat model and what comes back, and the content address of a request."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Failure kinds a reply can carry; each becomes the rejection reason ``<stage>_<kind>``
# (e.g. ``teacher_timeout``).
FAILURE_KINDS = (
    "rate_limited",  # 429 after the retry budget
    "server_error",  # 5xx after the retry budget
    "timeout",  # no answer within the timeout, after the retry budget
    "connection",  # could not connect, after the retry budget
    "bad_request",  # 4xx other than 429: never retried
    "invalid_response",  # the body is not a chat completion (garbage, wrong JSON)
    "no_choices",  # a completion without choices
    "empty",  # a choice with no text
    "refusal",  # the model refused (``refusal`` set, or finish_reason content_filter)
    "backend_error",  # anything else the backend raised
    "over_budget",  # never sent: the run's budget was spent
)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters sent with every request (and part of its cache key).

    ``seed`` is the run's seed: each request is sent with its own seed derived from it
    (:func:`request_seed`); None sends none (the server draws as it likes).
    """

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TeacherRequest:
    """One chat request: a user turn of ``images`` then ``prompt`` text, optional ``system`` turn.

    ``image_ids`` are the sha256 of ``images`` (the key uses them, not the bytes).
    ``sample_index`` tells apart the k samples of one prompt (pass@k). ``context`` rides along
    untouched for the stage that made the request (e.g. the sample being annotated) and is not
    part of the key.
    """

    item_id: str
    prompt: str
    images: tuple[bytes, ...] = ()
    image_ids: tuple[str, ...] = ()
    template_hash: str = ""
    system: str | None = None
    sample_index: int = 0
    context: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TeacherReply:
    """The answer to one request: ``text`` on success, else ``error`` (one of FAILURE_KINDS)."""

    item_id: str
    text: str | None = None
    error: str | None = None
    detail: str = ""
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def _content(request: TeacherRequest) -> dict[str, Any]:
    """What a request asks, apart from the model and its sampling parameters."""
    image_ids = request.image_ids
    if not image_ids:
        image_ids = tuple(hashlib.sha256(image).hexdigest() for image in request.images)
    return {
        "template": request.template_hash,
        "images": list(image_ids),
        "prompt": request.prompt,
        "system": request.system,
        "sample": request.sample_index,
    }


def _digest(blob: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).digest()


def request_seed(request: TeacherRequest, seed: int | None) -> int | None:
    """The seed one request is sampled with: a hash of the run's ``seed``, the request's content
    and its sample index, so the k samples of one item (and the requests of different items)
    each draw their own answer, with the same seed on every run. None when ``seed`` is None.

    31 bits, so it fits a signed 32-bit seed field as well as a 64-bit one.

    >>> a = TeacherRequest("x", "where?", image_ids=("0" * 64,))
    >>> b = TeacherRequest("x", "where?", image_ids=("0" * 64,), sample_index=1)
    >>> request_seed(a, 0) == request_seed(a, 0) != request_seed(b, 0)
    True
    """
    if seed is None:
        return None
    digest = _digest({**_content(request), "seed": seed})
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def request_key(model: str, request: TeacherRequest, sampling: Sampling) -> str:
    """The content address of a request: the same inputs always give the same key.

    Covers the model, the prompt template's hash, the images' sha256, the rendered prompt and
    system text, the sampling parameters with the request's own seed (:func:`request_seed`),
    and the sample index. A request without ``image_ids`` is keyed by the sha256 of its image
    bytes, so two requests that differ only in their images never share a key.
    """
    sent = {**sampling.as_dict(), "seed": request_seed(request, sampling.seed)}
    return _digest({**_content(request), "model": model, "sampling": sent}).hex()


@dataclass(frozen=True)
class EndpointSettings:
    """How to reach an OpenAI-compatible chat endpoint and how hard to try.

    ``api_key_env`` is the *name* of the environment variable that holds the key; the key itself
    is read when the client is made and never stored, logged or written anywhere.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    sampling: Sampling = Sampling()
    max_concurrency: int = 16
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 60.0
