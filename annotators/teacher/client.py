"""Teacher requests answered by an OpenAI-compatible chat endpoint (vLLM, ``transformers serve``,
a hosted API) through the ``openai`` SDK.

Rules, for every batch given to :meth:`OpenAIBackend.answer`:

- **One event loop, one connection pool, one bound per backend.** The backend runs its own event
  loop in a background thread; :meth:`OpenAIBackend.answer` hands a batch to it and waits. Beam
  shares one loaded backend between the threads of a worker, so batches from several threads
  overlap while ``max_concurrency`` still caps the requests in flight for the whole process, and
  connections are reused from one batch to the next.

- **Cache first.** A request whose :func:`request_key` is in the :class:`ReplyCache` is answered
  from it (``cached=True``, ``attempts=0``) without any HTTP request; every successful reply is
  stored as soon as it arrives, so an interrupted run resumes where it stopped.
- **Bounded concurrency.** At most ``max_concurrency`` requests are in flight at once (a backoff
  wait does not hold a slot).
- **Retries** (ours; the SDK's own are off): up to ``max_retries`` more attempts after the first,
  with exponential backoff and full jitter (``uniform(0, min(max_backoff, backoff * 2**n))``), on
  429, 408, 5xx, timeouts, connection errors and a 200 whose body is not a chat completion
  (usually a proxy or gateway fault, so worth another try). A ``Retry-After`` (or
  ``retry-after-ms``) header on a 429/5xx replaces the backoff, capped at ``max_backoff``. Other
  4xx, no choices, empty text and refusals are final at once: asking again with the same seed
  gives the same answer.
- **Per-item isolation.** Each request ends as its own reply, in request order; a failure is a
  reply with an error kind (:data:`FAILURE_KINDS`), never an exception that loses the batch.

=====================================  ====================
outcome (after the retry budget)       ``reply.error``
=====================================  ====================
HTTP 429                               ``rate_limited``
HTTP 5xx                               ``server_error``
client timeout, HTTP 408               ``timeout``
cannot connect / connection dropped    ``connection``
other HTTP 4xx (and 3xx), image of     ``bad_request``
an unknown format (never sent)
200, body not JSON or not a            ``invalid_response``
completion
``choices`` empty                      ``no_choices``
content empty, whitespace or null      ``empty``
``refusal`` set, or finish_reason      ``refusal``
``content_filter``
anything else raised                   ``backend_error``
=====================================  ====================

A failure's ``detail`` names the endpoint (its ``base_url``, without any user info or query) for
connection faults and timeouts, and keeps the server's own message for HTTP errors (the
``message`` of an OpenAI-style error body, FastAPI's ``detail``, or the raw body), cut to
:data:`_EXCERPT` characters. The API key is read from the environment variable named by
``api_key_env`` when the backend's SDK client is made and lives only in that client (held out of
the backend's ``repr``); it is masked in every ``detail`` text (a server may echo it in an error
message).

**Images the server did not see.** A server without an image processor for its model (a bare
``transformers serve`` of a folder whose processor transformers cannot load) answers image
requests text-only, silently. The backend warns once when a reply's ``prompt_tokens`` are fewer
than the request must cost if its images were read (:func:`min_prompt_tokens`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai

from groundforge.annotators.teacher.budget import over_budget
from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.types import (
    EndpointSettings,
    TeacherReply,
    TeacherRequest,
    request_key,
    request_seed,
)
from groundforge.retryafter import retry_after

log = logging.getLogger(__name__)

# Local servers ignore the key, but the SDK refuses to start without one.
_NO_KEY = "unused"
_EXCERPT = 300
# The floor an image adds to a prompt, for min_prompt_tokens: one token per 32x32 pixels, at most
# IMAGE_TOKEN_CAP per image.
IMAGE_PIXELS_PER_TOKEN = 32 * 32
IMAGE_TOKEN_CAP = 32
# Raw details are clipped generously first and cut to _EXCERPT only after the key is masked, so
# a key straddling the cut can never leak in part.
_RAW = 4000


@dataclass
class BatchStats:
    """What one batch cost; ``requests == cached + sent`` and ``sent == ok + sum(failed)``.

    ``sent`` counts requests not answered from the cache (including any rejected before sending),
    ``attempts`` their HTTP attempts and ``retries`` the attempts after each one's first.
    """

    requests: int = 0
    cached: int = 0
    sent: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_replies(cls, replies: Sequence[TeacherReply]) -> BatchStats:
        # Derived from the replies alone, so callers sharing a backend across threads can compute
        # their own batch's numbers instead of reading ``OpenAIBackend.stats``.
        stats = cls(requests=len(replies))
        for reply in replies:
            if reply.cached:
                stats.cached += 1
                continue
            stats.sent += 1
            stats.attempts += reply.attempts
            stats.retries += max(0, reply.attempts - 1)
            stats.prompt_tokens += reply.prompt_tokens or 0
            stats.completion_tokens += reply.completion_tokens or 0
            if reply.ok:
                stats.ok += 1
            else:
                stats.failed[reply.error] = stats.failed.get(reply.error, 0) + 1
        return stats


class _Session:
    """The SDK client (which holds the key), the concurrency bound, and the key for masking."""

    def __init__(self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, secret: str):
        self.client = client
        self.slots = slots
        self.secret = secret

    def __repr__(self) -> str:
        return "_Session(<connection pool>)"


@dataclass
class _Outcome:
    """One HTTP attempt's result: text, or an error kind and whether another attempt may help."""

    text: str | None = None
    error: str | None = None
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class OpenAIBackend:
    """Answers :class:`TeacherRequest` batches with one chat completion each."""

    def __init__(self, settings: EndpointSettings, cache: ReplyCache | None = None):
        if settings.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {settings.max_concurrency}")
        if settings.max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, not {settings.max_retries}")
        _api_key(settings)  # a missing variable fails here, not in the middle of a pipeline
        self.settings = settings
        self.model = settings.model
        self.cache = cache
        self.stats = BatchStats()
        self.where = public_url(settings.base_url)
        self._lock = threading.Lock()
        self._warned_unseen = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Made inside the loop on first use: asyncio objects belong to the loop that made them.
        self._session: _Session | None = None

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"OpenAIBackend(base_url={s.base_url!r}, model={s.model!r}, "
            f"api_key_env={s.api_key_env!r}, cache={self.cache!r})"
        )

    def answer(
        self, requests: Sequence[TeacherRequest], meter=None, gate=None
    ) -> list[TeacherReply]:
        """One reply per request, same order; sets :attr:`stats` for this batch.

        ``meter``, when given, is told of each request as it is sent (``meter.sent()``) and of
        each reply as it arrives (``meter.reply(reply)``; a cache hit at once), from the
        backend's event loop thread: it must be thread-safe. ``gate`` (a
        :class:`~groundforge.annotators.teacher.budget.BudgetGate`), when given, must allow each
        request before it is sent (else its reply is ``over_budget``) and is told what it cost.

        Safe to call from several threads at once: their batches share the backend's connection
        pool and concurrency bound. When threads share a backend, :attr:`stats` holds whichever
        batch ended last (use :meth:`BatchStats.from_replies` on a batch's own replies).
        """
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(
            self._answer(list(requests), meter, gate), loop
        ).result()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name=f"chat-{self.model}", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def _answer(
        self, requests: list[TeacherRequest], meter=None, gate=None
    ) -> list[TeacherReply]:
        replies: list[TeacherReply | None] = [None] * len(requests)
        todo = []
        for i, request in enumerate(requests):
            key = request_key(self.model, request, self.settings.sampling)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                replies[i] = replace(hit, item_id=request.item_id)
                if meter is not None:
                    meter.reply(replies[i])
            else:
                todo.append((i, request, key))

        if todo:
            session = self._session_in_loop()
            results = await asyncio.gather(
                *(self._metered(session, r, key, meter, gate) for _, r, key in todo),
                return_exceptions=True,
            )
            for (i, request, _), result in zip(todo, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    result = TeacherReply(
                        request.item_id,
                        error="backend_error",
                        detail=_finish_detail(_describe(result), session.secret),
                    )
                replies[i] = result

        self.stats = BatchStats.from_replies(replies)
        if self.stats.failed:
            log.warning(
                "%d of %d requests to %s at %s failed: %s",
                sum(self.stats.failed.values()),
                len(requests),
                self.model,
                self.where,
                ", ".join(f"{kind}={n}" for kind, n in sorted(self.stats.failed.items())),
            )
        return replies

    def _session_in_loop(self) -> _Session:
        if self._session is None:
            secret = _api_key(self.settings)
            client = openai.AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=secret,
                max_retries=0,
                timeout=self.settings.timeout,
            )
            self._session = _Session(
                client, asyncio.Semaphore(self.settings.max_concurrency), secret
            )
        return self._session

    def close(self) -> None:
        """Close the connection pool and stop the backend's event loop (it restarts on use)."""
        with self._lock:
            loop, thread, session = self._loop, self._thread, self._session
            self._loop = self._thread = self._session = None
        if loop is None:
            return
        if session is not None:
            asyncio.run_coroutine_threadsafe(session.client.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __getstate__(self) -> dict:
        # A loop, a thread and open connections cannot travel: a copy starts its own on use.
        state = {**self.__dict__, "_loop": None, "_thread": None, "_session": None}
        state["_warned_unseen"] = False
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    async def _metered(
        self, session: _Session, request: TeacherRequest, key: str, meter, gate
    ) -> TeacherReply:
        """:meth:`_answer_one` within the budget (``gate``), telling ``meter`` of the reply as
        soon as it is known."""
        if gate is not None and not gate.reserve():
            reply = over_budget(request.item_id)
        else:
            reply = await self._answer_one(
                session, request, key, meter.sent if meter is not None else None
            )
            if gate is not None:
                gate.spend(reply)
            if meter is not None and not reply.attempts:
                meter.sent()  # refused before sending (an unreadable image): still one request
        if meter is not None:
            meter.reply(reply)
        return reply

    async def _answer_one(
        self, session: _Session, request: TeacherRequest, key: str, on_sent=None
    ) -> TeacherReply:
        secret = session.secret
        attempts = 0
        try:
            try:
                body = self._body(request)
            except ValueError as exc:
                return TeacherReply(
                    request.item_id, error="bad_request", detail=_finish_detail(str(exc), secret)
                )
            while True:
                attempts += 1
                async with session.slots:
                    if attempts == 1 and on_sent is not None:
                        on_sent()
                    outcome = await self._attempt(session.client, body)
                if (
                    outcome.error is None
                    or not outcome.retryable
                    or attempts > self.settings.max_retries
                ):
                    break
                delay = self._delay(attempts, outcome.retry_after)
                log.debug(
                    "%s: attempt %d failed (%s), retrying in %.2f s",
                    request.item_id,
                    attempts,
                    outcome.error,
                    delay,
                )
                await asyncio.sleep(delay)
        except Exception as exc:
            return TeacherReply(
                request.item_id,
                error="backend_error",
                detail=_finish_detail(_describe(exc), secret),
                attempts=attempts,
            )

        reply = TeacherReply(
            request.item_id,
            text=outcome.text,
            error=outcome.error,
            detail=_finish_detail(outcome.detail, secret),
            attempts=attempts,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
        )
        if request.images and reply.prompt_tokens is not None:
            self._check_images_seen(request, reply.prompt_tokens)
        if reply.ok and self.cache is not None:
            try:
                self.cache.put(key, reply)
            except (OSError, ValueError) as exc:
                # A full or read-only disk costs the resume, not the answer.
                log.warning("could not cache the reply to %s: %s", request.item_id, exc)
        return reply

    def _check_images_seen(self, request: TeacherRequest, prompt_tokens: int) -> None:
        """Warn (once per backend) when the server reports fewer prompt tokens than the request's
        text and images must cost: it answered without reading the images."""
        floor = min_prompt_tokens(request)
        if prompt_tokens >= floor or self._warned_unseen:
            return
        with self._lock:
            if self._warned_unseen:
                return
            self._warned_unseen = True
        log.warning(
            "%s at %s did not see the images of %s: it counted %d prompt tokens for a request "
            "that costs at least %d with its %d image(s) (sizes %s). The server answers "
            "text-only; serve the model with `groundforge serve-teacher MODEL_DIR` or "
            "`vllm serve MODEL` (this warning is shown once)",
            self.model,
            self.where,
            request.item_id,
            prompt_tokens,
            floor,
            len(request.images),
            ", ".join(f"{w}x{h}" for w, h in _image_sizes(request.images)) or "unknown",
        )

    def _body(self, request: TeacherRequest) -> dict:
        """The chat-completion arguments: optional system turn, then images and text, and the
        request's own seed (the k samples of one item must not share one)."""
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": _data_url(image, i)}}
            for i, image in enumerate(request.images)
        ]
        content.append({"type": "text", "text": request.prompt})
        messages: list[dict] = []
        if request.system is not None:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": content})
        sampling = self.settings.sampling
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        seed = request_seed(request, sampling.seed)
        if seed is not None:
            body["seed"] = seed
        return body

    async def _attempt(self, client: openai.AsyncOpenAI, body: dict) -> _Outcome:
        """One HTTP request; SDK errors become outcomes, anything else propagates."""
        try:
            # The SDK's generic POST returning the raw response: we judge the body ourselves (for a
            # malformed 200 the typed call hands back a bare string or a half-built model), and
            # it skips the typed call's per-request parameter transform, a tenth of its CPU.
            raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        except openai.APITimeoutError:
            return _Outcome(
                error="timeout",
                detail=f"no answer from {self.where} within {self.settings.timeout:g} s",
                retryable=True,
            )
        except openai.APIConnectionError as exc:
            return _Outcome(
                error="connection",
                detail=f"cannot reach {self.where}: {_describe(exc)}",
                retryable=True,
            )
        except openai.APIStatusError as exc:
            return _status_outcome(exc)
        return _completion_outcome(raw.content)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.max_backoff)
        # Full jitter spreads the retries of a whole batch that failed at the same moment.
        return random.uniform(0.0, min(s.max_backoff, s.backoff * 2 ** (attempt - 1)))


def public_url(url: str) -> str:
    """``url`` without user info and query, the parts that may carry a credential."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _image_sizes(images: Sequence[bytes]) -> list[tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for image in images:
        try:
            with Image.open(io.BytesIO(image)) as opened:  # reads the header only
                sizes.append(opened.size)
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    return sizes


def min_prompt_tokens(request: TeacherRequest) -> int:
    """The fewest prompt tokens a server that reads the request's images can report.

    The rule, a lower bound for the chat models this client targets:

    - **text**: one token per whitespace-separated word of the system turn and the prompt (the
      byte-level BPE and SentencePiece tokenizers of these models never merge across
      whitespace); the chat template's own tokens are not counted, which leaves slack;
    - **images**: one token per 32x32 pixels of each image, at most 32 per image. Qwen2-VL and
      Qwen2.5-VL spend one token per 28x28 pixels (sides rounded to multiples of 28, at least 4
      tokens), Qwen3-VL one per 32x32 (at least 64 at its default budget); LLaVA, Gemma 3,
      InternVL, Idefics3 and hosted APIs spend 64 or more on any image. The cap stays below the
      pixel budget a server may be given.

    An image of 181x181 pixels or more adds 32 tokens; a small one only a few, so a text-only
    answer to a request with small images and a short prompt may go unnoticed. Models whose
    images bypass the token sequence (cross-attention, e.g. Llama 3.2 Vision) report fewer tokens
    than this and trigger the warning without cause.
    """
    words = sum(len(text.split()) for text in (request.system or "", request.prompt))
    image_tokens = sum(
        min(w * h // IMAGE_PIXELS_PER_TOKEN, IMAGE_TOKEN_CAP)
        for w, h in _image_sizes(request.images)
    )
    return words + image_tokens


def _api_key(settings: EndpointSettings) -> str:
    if not settings.api_key_env:
        return _NO_KEY
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ValueError(
            f"the environment variable {settings.api_key_env} (the API key for "
            f"{settings.base_url}) is not set or empty"
        )
    return key


def _data_url(image: bytes, index: int) -> str:
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif image.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        mime = "image/webp"
    elif image[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    else:
        raise ValueError(f"image {index} is not PNG, JPEG, WEBP or GIF")
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own error text: the designated message of a JSON error body (OpenAI's
    ``error.message``, FastAPI's ``detail``, a top-level ``message``), else the raw body."""
    try:
        text = exc.response.text.strip()
    except Exception:  # a body that cannot be read any more: the SDK's message is all there is
        return exc.message
    try:
        data = json.loads(text)
    except ValueError:
        return text or exc.message
    if isinstance(data, dict):
        error = data.get("error")
        candidates = (
            error.get("message") if isinstance(error, dict) else error,
            data.get("detail"),
            data.get("message"),
        )
        for value in candidates:
            if isinstance(value, str) and value.strip():
                return value
    return text


def _status_outcome(exc: openai.APIStatusError) -> _Outcome:
    status = exc.status_code
    detail = f"HTTP {status}: {_server_message(exc)[:_RAW]}"
    if status == 429:
        kind, retryable = "rate_limited", True
    elif status >= 500:
        kind, retryable = "server_error", True
    elif status == 408:
        kind, retryable = "timeout", True
    else:
        kind, retryable = "bad_request", False
    wait = retry_after(exc.response.headers) if retryable else None
    if wait is not None:
        detail = f"retry after {wait:g} s; {detail}"
    return _Outcome(error=kind, detail=detail, retryable=retryable, retry_after=wait)


def _completion_outcome(content: bytes) -> _Outcome:
    """Judge a 200 body: the first choice's text, or why there is none."""
    try:
        data = json.loads(content)
    except ValueError:
        return _Outcome(
            error="invalid_response",
            detail=f"the body is not JSON: {content[:_RAW].decode('utf-8', 'replace')}",
            retryable=True,
        )
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        return _Outcome(
            error="invalid_response",
            detail=f"not a chat completion: {json.dumps(data)[:_RAW]}",
            retryable=True,
        )
    usage = data.get("usage")
    tokens = {
        name: value
        for name in ("prompt_tokens", "completion_tokens")
        if isinstance(usage, dict) and isinstance(value := usage.get(name), int)
    }
    if not choices:
        return _Outcome(error="no_choices", detail="the completion has no choices", **tokens)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or not (text is None or isinstance(text, str)):
        return _Outcome(
            error="invalid_response",
            detail=f"malformed choice: {json.dumps(choice)[:_RAW]}",
            retryable=True,
        )
    finish = choice.get("finish_reason")
    refusal = message.get("refusal")
    if refusal or finish == "content_filter":
        detail = f"refused: {str(refusal)[:_RAW]}" if refusal else "finish_reason content_filter"
        return _Outcome(error="refusal", detail=detail, **tokens)
    if not text or not text.strip():
        return _Outcome(error="empty", detail=f"no text (finish_reason {finish})", **tokens)
    return _Outcome(text=text, **tokens)


def _describe(exc: BaseException) -> str:
    # The SDK's connection errors say only "Connection error."; the cause says which.
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return text[:_RAW]


def _finish_detail(text: str, secret: str) -> str:
    """Mask the key, then cut to a one-line excerpt."""
    if secret != _NO_KEY:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."
