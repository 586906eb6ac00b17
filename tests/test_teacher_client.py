"""OpenAIBackend against a real ``transformers serve`` process, through a fault-injecting proxy."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from faultproxy import FaultProxy, fail_prompts
from PIL import Image

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.client import (
    BatchStats,
    OpenAIBackend,
    min_prompt_tokens,
    public_url,
)
from groundforge.annotators.teacher.serve import free_port
from groundforge.annotators.teacher.types import (
    EndpointSettings,
    Sampling,
    TeacherReply,
    TeacherRequest,
    request_seed,
)
from groundforge.retryafter import retry_after

KEY_ENV = "GROUNDFORGE_TEST_TEACHER_KEY"
# Distinctive, so a search for it cannot match anything by chance.
SECRET = "sk-gf-test-9f3b27c1d4e8a6057b2c4d9e1f03a8b7"


def png(colour=(200, 20, 20), size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def proxy(teacher_server):
    base_url, _ = teacher_server
    with FaultProxy(base_url, retry_after="0") as p:
        yield p


def backend_for(proxy, teacher_server, cache=None, **overrides) -> OpenAIBackend:
    # Fast backoff and a generous timeout: only the timeout test wants a short one (the tiny
    # server answers one request at a time, so a busy batch queues for a while).
    options = dict(
        sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=8, seed=1),
        max_concurrency=4,
        timeout=30.0,
        max_retries=2,
        backoff=0.01,
        max_backoff=2.0,
    )
    options.update(overrides)
    return OpenAIBackend(EndpointSettings(proxy.base_url, teacher_server[1], **options), cache)


def requests_for(prompts, image=True) -> list[TeacherRequest]:
    images = (png(),) if image else ()
    return [TeacherRequest(f"item-{p}", p, images=images) for p in prompts]


def test_request_carries_image_system_and_sampling(proxy, teacher_server):
    backend = backend_for(proxy, teacher_server)
    with_image = TeacherRequest("a", "describe the flag", images=(png(),), system="be brief")
    without = TeacherRequest("b", "describe the flag", system="be brief")
    replies = backend.answer([with_image, without])

    assert [r.item_id for r in replies] == ["a", "b"]
    assert all(r.ok for r in replies)
    # The server counts image tokens in the prompt: the image arrived and was used.
    assert replies[0].prompt_tokens > replies[1].prompt_tokens
    assert len(proxy.requests) == 2
    body = next(s.json for s in proxy.requests if len(s.json["messages"][1]["content"]) == 2)
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    image_part, text_part = body["messages"][1]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert text_part == {"type": "text", "text": "describe the flag"}
    assert {k: body[k] for k in ("temperature", "top_p", "max_tokens", "seed")} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 8,
        "seed": request_seed(with_image, 1),
    }
    assert body["model"] == teacher_server[1]


def test_answers_come_back_in_order_with_text(proxy, teacher_server):
    backend = backend_for(proxy, teacher_server)
    # Each prompt is longer than the one before: the prompt token counts the server reports
    # show which reply answered which prompt.
    prompts = ["question" + " more" * (3 * i) for i in range(6)]
    replies = backend.answer(requests_for(prompts))

    assert [r.item_id for r in replies] == [f"item-{p}" for p in prompts]
    tokens = [r.prompt_tokens for r in replies]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    for reply in replies:
        assert reply.ok and isinstance(reply.text, str) and reply.text.strip()
        assert (reply.attempts, reply.cached, reply.error, reply.detail) == (1, False, None, "")
        assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert backend.stats == BatchStats.from_replies(replies)
    assert (backend.stats.requests, backend.stats.sent, backend.stats.ok) == (6, 6, 6)
    assert backend.stats.attempts == 6 and backend.stats.retries == 0


def test_rate_limit_is_retried_after_the_retry_after_delay(proxy, teacher_server):
    proxy.reset(fail_prompts({"slow down": ("rate_limited", 1)}))
    proxy.retry_after = "1"
    backend = backend_for(proxy, teacher_server, backoff=0.01, max_backoff=2.0)
    [reply] = backend.answer(requests_for(["slow down"]))

    assert reply.ok and reply.attempts == 2
    first, second = proxy.seen_for("slow down")
    assert (first.status, second.status) == (429, 200)
    # Honouring the header, not a performance bound: the retry may not come sooner.
    assert second.arrived - first.arrived >= 1.0


def test_retry_after_is_capped_at_max_backoff(proxy, teacher_server):
    proxy.reset(fail_prompts({"much later": ("rate_limited", 1)}))
    proxy.retry_after = "3600"
    backend = backend_for(proxy, teacher_server, max_backoff=0.2)
    [reply] = backend.answer(requests_for(["much later"]))

    assert reply.ok and reply.attempts == 2
    first, second = proxy.seen_for("much later")
    assert second.arrived - first.arrived < 60


def test_retry_after_header_forms():
    # One parser serves the chat client and the crawler.
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after": "1.5"}) == 1.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "-3"}) == 0.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= retry_after({"retry-after": format_datetime(later, usegmt=True)}) <= 31
    earlier = datetime.now(timezone.utc) - timedelta(seconds=30)
    assert retry_after({"retry-after": format_datetime(earlier, usegmt=True)}) == 0.0


def test_server_error_is_retried_then_succeeds(proxy, teacher_server):
    proxy.reset(fail_prompts({"flaky": ("server_error", 2)}))
    backend = backend_for(proxy, teacher_server, max_retries=2)
    [reply] = backend.answer(requests_for(["flaky"]))

    assert reply.ok and reply.attempts == 3
    assert [s.status for s in proxy.seen_for("flaky")] == [500, 500, 200]
    assert backend.stats.retries == 2


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("rate_limited", "rate_limited"),
        ("server_error", "server_error"),
        ("drop", "connection"),
        ("invalid_json", "invalid_response"),
        ("not_completion", "invalid_response"),
    ],
)
def test_retryable_faults_stop_at_the_budget(proxy, teacher_server, fault, kind):
    proxy.reset(fail_prompts({"always": (fault, None)}))
    backend = backend_for(proxy, teacher_server, max_retries=2)
    [reply] = backend.answer(requests_for(["always"]))

    assert reply.error == kind and reply.text is None and not reply.ok
    assert reply.attempts == 3
    assert proxy.counts[fault] == 3 and proxy.total == 3
    assert reply.detail


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("bad_request", "bad_request"),
        ("no_choices", "no_choices"),
        ("empty", "empty"),
        ("refusal", "refusal"),
        ("content_filter", "refusal"),
    ],
)
def test_final_faults_are_not_retried(proxy, teacher_server, fault, kind):
    proxy.reset(fail_prompts({"once": (fault, None)}))
    backend = backend_for(proxy, teacher_server, max_retries=3)
    [reply] = backend.answer(requests_for(["once"]))

    assert reply.error == kind and reply.text is None
    assert reply.attempts == 1 and proxy.total == 1
    if fault != "bad_request":
        # The server did answer: its token counts are kept for cost accounting.
        assert reply.prompt_tokens > 0


def test_timeouts_are_retried_and_reported(proxy, teacher_server):
    proxy.reset(fail_prompts({"hangs once": ("timeout", 1), "hangs always": ("timeout", None)}))
    proxy.hang = 5.0
    backend = backend_for(proxy, teacher_server, timeout=1.5, max_retries=1)
    once, always = backend.answer(requests_for(["hangs once", "hangs always"]))

    assert once.ok and once.attempts == 2
    assert always.error == "timeout" and always.attempts == 2
    assert "1.5 s" in always.detail
    assert proxy.counts["timeout"] == 3


def test_connection_refused_is_a_connection_failure(teacher_server):
    settings = EndpointSettings(
        f"http://127.0.0.1:{free_port()}/v1", teacher_server[1], max_retries=1, backoff=0.01
    )
    [reply] = OpenAIBackend(settings).answer(requests_for(["nobody home"]))
    assert reply.error == "connection" and reply.attempts == 2


def test_endpoint_down_names_the_base_url_never_the_key(teacher_server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    settings = EndpointSettings(
        base_url, teacher_server[1], api_key_env=KEY_ENV, max_retries=0, backoff=0.01
    )
    with caplog.at_level(logging.WARNING):
        [reply] = OpenAIBackend(settings).answer(requests_for(["anyone there"]))

    assert reply.error == "connection"
    assert reply.detail.startswith(f"cannot reach {base_url}: APIConnectionError")
    [warning] = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert base_url in warning and "connection=1" in warning
    assert SECRET not in warning + reply.detail


def test_base_url_credentials_stay_out_of_details():
    assert (
        public_url("https://user:pw@example.org:8443/v1?key=abc") == "https://example.org:8443/v1"
    )
    assert public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_rejection_keeps_the_servers_own_message(teacher_server):
    base_url, model = teacher_server
    settings = EndpointSettings(base_url, "no-such-model", max_retries=2, backoff=0.01)
    [reply] = OpenAIBackend(settings).answer(requests_for(["who serves this"]))

    assert reply.error == "bad_request" and reply.attempts == 1
    # transformers serve's 400 body: {"detail": "Server is pinned to '<model>'; requested ..."}
    assert reply.detail.startswith("HTTP 400: Server is pinned to")
    assert "requested 'no-such-model'" in reply.detail


def test_min_prompt_tokens_counts_words_and_image_area():
    small, large = png(size=(56, 56)), png(size=(320, 240))
    assert min_prompt_tokens(TeacherRequest("t", "one two  three")) == 3
    assert (
        min_prompt_tokens(TeacherRequest("s", "a b", images=(small,), system="be brief")) == 4 + 3
    )
    # 320x240 is 75 tiles of 32x32: capped at 32 tokens per image.
    assert min_prompt_tokens(TeacherRequest("l", "a b", images=(large, large))) == 2 + 64


def test_one_batch_keeps_every_good_answer_when_some_fail(proxy, teacher_server):
    prompts = [f"item {i}" for i in range(12)]
    broken = {
        "item 1": ("bad_request", None),
        "item 4": ("server_error", None),
        "item 7": ("empty", None),
        "item 10": ("refusal", None),
    }
    proxy.reset(fail_prompts(broken))
    backend = backend_for(proxy, teacher_server, max_retries=1)
    replies = backend.answer(requests_for(prompts))

    assert len(replies) == len(prompts)
    assert [r.item_id for r in replies] == [f"item-{p}" for p in prompts]
    failed = {r.item_id: r.error for r in replies if not r.ok}
    assert failed == {
        "item-item 1": "bad_request",
        "item-item 4": "server_error",
        "item-item 7": "empty",
        "item-item 10": "refusal",
    }
    assert sum(r.ok for r in replies) == 8
    stats = backend.stats
    assert stats.ok + sum(stats.failed.values()) == stats.sent == 12
    assert stats.failed == {"bad_request": 1, "server_error": 1, "empty": 1, "refusal": 1}


def test_retries_never_exceed_the_budget(proxy, teacher_server):
    prompts = [f"doomed {i}" for i in range(6)]
    proxy.reset(fail_prompts({p: ("server_error", None) for p in prompts}))
    backend = backend_for(proxy, teacher_server, max_retries=3)
    replies = backend.answer(requests_for(prompts))

    assert all(r.error == "server_error" and r.attempts == 4 for r in replies)
    assert all(len(proxy.seen_for(p)) == 4 for p in prompts)
    assert proxy.total == 24
    assert (backend.stats.attempts, backend.stats.retries) == (24, 18)


def test_concurrency_never_exceeds_the_bound(proxy, teacher_server):
    # Every request is held at the proxy for a while, so the batch piles up against the bound.
    proxy.reset(lambda number, body: "slow")
    proxy.slow = 0.2
    backend = backend_for(proxy, teacher_server, max_concurrency=3)
    replies = backend.answer(requests_for([f"busy {i}" for i in range(12)]))

    assert all(r.ok for r in replies)
    assert proxy.max_in_flight == 3


def test_unknown_image_format_is_rejected_without_a_request(proxy, teacher_server):
    backend = backend_for(proxy, teacher_server)
    request = TeacherRequest("odd", "what is this", images=(b"BM not a format we send",))
    [reply] = backend.answer([request])
    assert reply.error == "bad_request" and reply.attempts == 0
    assert "image 0" in reply.detail
    assert proxy.total == 0


def test_api_key_is_sent_but_never_leaks(
    proxy, teacher_server, tmp_path, monkeypatch, caplog, capfd
):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    proxy.reset(fail_prompts({"who am i": ("unauthorized", None), "five": ("server_error", 1)}))
    cache = ReplyCache(tmp_path / "cache")
    backend = backend_for(proxy, teacher_server, cache=cache, api_key_env=KEY_ENV)
    replies = backend.answer(requests_for(["who am i", "five", "plain"]))

    assert [r.error for r in replies] == ["bad_request", None, None]
    assert all(s.headers["authorization"] == f"Bearer {SECRET}" for s in proxy.requests)
    # The proxy echoed the key in its 401 message, as some hosted APIs do.
    assert "Incorrect API key provided: ***" in replies[0].detail
    out, err = capfd.readouterr()
    leaks = {
        "log": caplog.text,
        "stdout": out,
        "stderr": err,
        "replies": repr(replies),
        "backend": repr(backend) + repr(vars(backend)),
    }
    for path in tmp_path.rglob("*"):
        if path.is_file():
            leaks[str(path)] = path.read_text(errors="replace")
    assert len(cache) == 2
    assert not [where for where, text in leaks.items() if SECRET in text]


def test_missing_key_variable_is_named_in_the_error(proxy, teacher_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        backend_for(proxy, teacher_server, api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, SECRET)
    backend = backend_for(proxy, teacher_server, api_key_env=KEY_ENV)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV) as info:
        backend.answer(requests_for(["anything"]))
    assert SECRET not in str(info.value)


def test_stats_add_up_from_replies():
    replies = [
        TeacherReply("a", text="x", cached=True, prompt_tokens=5),
        TeacherReply("b", text="y", attempts=2, prompt_tokens=7, completion_tokens=3),
        TeacherReply("c", error="timeout", attempts=3),
        TeacherReply("d", error="timeout", attempts=3),
        TeacherReply("e", error="bad_request", attempts=0),
    ]
    stats = BatchStats.from_replies(replies)
    assert stats == BatchStats(
        requests=5,
        cached=1,
        sent=4,
        ok=1,
        failed={"timeout": 2, "bad_request": 1},
        attempts=8,
        retries=5,
        prompt_tokens=7,
        completion_tokens=3,
    )
