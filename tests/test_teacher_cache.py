"""ReplyCache on disk, and OpenAIBackend resuming from it."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import time
from dataclasses import replace

import pytest
from faultproxy import FaultProxy, fail_prompts
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.client import OpenAIBackend
from groundforge.annotators.teacher.types import (
    EndpointSettings,
    Sampling,
    TeacherReply,
    TeacherRequest,
    request_key,
)


def key_of(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, "PNG")
    return buf.getvalue()


def test_round_trip(tmp_path):
    cache = ReplyCache(tmp_path)
    reply = TeacherReply(
        "item-1", text="a red flag", attempts=3, prompt_tokens=41, completion_tokens=9
    )
    key = key_of(1)
    assert cache.get(key) is None and key not in cache and len(cache) == 0
    cache.put(key, reply)

    assert cache.get(key) == replace(reply, cached=True, attempts=0)
    assert key in cache and len(cache) == 1
    assert (tmp_path / key[:2] / f"{key}.json").is_file()
    # A second handle on the same folder (another process, a later run) sees it too.
    assert ReplyCache(tmp_path).get(key).text == "a red flag"


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=()), min_size=1))
def test_any_text_round_trips(tmp_path_factory, text):
    cache = ReplyCache(tmp_path_factory.mktemp("cache"))
    cache.put(key_of(0), TeacherReply("x", text=text))
    assert cache.get(key_of(0)).text == text


def test_only_successful_replies_are_stored(tmp_path):
    cache = ReplyCache(tmp_path)
    cache.put(key_of(1), TeacherReply("a", error="timeout", detail="no answer within 1 s"))
    cache.put(key_of(2), TeacherReply("b", text=None))
    assert len(cache) == 0 and cache.get(key_of(1)) is None


def test_entries_hold_no_request_data(tmp_path):
    cache = ReplyCache(tmp_path)
    key = key_of(3)
    cache.put(key, TeacherReply("item", text="answer", detail="ignored", prompt_tokens=3))
    entry = json.loads((tmp_path / key[:2] / f"{key}.json").read_text())
    assert set(entry) == {"format", "key", "item_id", "text", "prompt_tokens", "completion_tokens"}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"format": 1, "key": "',
        b"\xff\xfe not text",
        b"[1, 2, 3]",
        b'{"format": 1, "text": "no key"}',
        b'{"format": 99, "key": "K", "item_id": "i", "text": "t"}',
        b'{"format": 1, "key": "K", "item_id": "i", "text": 5}',
        b'{"format": 1, "key": "K", "item_id": "i", "text": "t", "prompt_tokens": "many"}',
    ],
)
def test_corrupt_entry_is_a_miss_and_is_overwritten(tmp_path, content):
    cache = ReplyCache(tmp_path)
    key = key_of(4)
    path = tmp_path / key[:2] / f"{key}.json"
    path.parent.mkdir()
    path.write_bytes(content.replace(b"K", key.encode()))
    assert cache.get(key) is None and key not in cache

    cache.put(key, TeacherReply("i", text="fresh"))
    assert cache.get(key).text == "fresh"


def test_entry_under_another_key_is_a_miss(tmp_path):
    cache = ReplyCache(tmp_path)
    cache.put(key_of(5), TeacherReply("i", text="five"))
    moved = tmp_path / key_of(6)[:2] / f"{key_of(6)}.json"
    moved.parent.mkdir(exist_ok=True)
    moved.write_bytes((tmp_path / key_of(5)[:2] / f"{key_of(5)}.json").read_bytes())
    assert cache.get(key_of(6)) is None


@pytest.mark.parametrize("key", ["../../etc/passwd", "ab", key_of(7).upper(), key_of(7) + "0"])
def test_keys_must_be_sha256_hex(tmp_path, key):
    cache = ReplyCache(tmp_path)
    with pytest.raises(ValueError):
        cache.get(key)
    with pytest.raises(ValueError):
        cache.put(key, TeacherReply("i", text="t"))
    assert key not in cache


def _write_many(root: str, writer: int, rounds: int) -> None:
    cache = ReplyCache(root)
    for r in range(rounds):
        for i in range(40):
            # Overlapping keys, and texts long enough that a torn write would show.
            cache.put(key_of(i), TeacherReply(f"w{writer}", text=f"{writer}:{r}:" + "x" * 4000))


def test_concurrent_writers_leave_only_valid_entries(tmp_path):
    # fork: the writers start at once instead of each importing the test module (and openai).
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    cache = ReplyCache(tmp_path)
    # Read while they write: an entry that exists must always be whole.
    torn, reads = 0, 0
    deadline = time.monotonic() + 60
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        for i in range(40):
            if (tmp_path / key_of(i)[:2] / f"{key_of(i)}.json").exists():
                reads += 1
                torn += cache.get(key_of(i)) is None
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert reads and not torn

    assert len(cache) == 40
    for i in range(40):
        reply = cache.get(key_of(i))
        writer, _, rest = reply.text.partition(":")
        assert reply.item_id == f"w{writer}" and rest.endswith("x" * 4000)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_killed_writer_leaves_no_partial_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_write_many, args=(str(tmp_path), 0, 1000))
    proc.start()
    cache = ReplyCache(tmp_path)
    deadline = time.monotonic() + 30
    while len(cache) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # into the rewrites, so the kill is likely to land mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)

    assert len(cache) == 40
    assert all(cache.get(key_of(i)).text.endswith("x" * 4000) for i in range(40))


def test_request_key_covers_every_input():
    sampling = Sampling(temperature=0.7, top_p=1.0, max_tokens=64, seed=0)
    base = TeacherRequest("i", "where is the flag", image_ids=("a" * 64,), template_hash="t1")
    key = request_key("m", base, sampling)
    variants = [
        request_key("other-model", base, sampling),
        request_key("m", replace(base, prompt="where is the plane"), sampling),
        request_key("m", replace(base, image_ids=("b" * 64,)), sampling),
        request_key("m", replace(base, template_hash="t2"), sampling),
        request_key("m", replace(base, system="be brief"), sampling),
        request_key("m", replace(base, sample_index=1), sampling),
        request_key("m", base, replace(sampling, seed=1)),
        request_key("m", base, replace(sampling, temperature=0.0)),
        request_key("m", base, replace(sampling, max_tokens=65)),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # Not part of the key: the item it is for, and what rides along.
    assert request_key("m", replace(base, item_id="j", context=object()), sampling) == key


@pytest.fixture
def proxy(teacher_server):
    with FaultProxy(teacher_server[0], retry_after="0") as p:
        yield p


def backend_for(proxy, teacher_server, cache, seed=0) -> OpenAIBackend:
    settings = EndpointSettings(
        proxy.base_url,
        teacher_server[1],
        sampling=Sampling(max_tokens=8, seed=seed),
        max_concurrency=4,
        timeout=30.0,
        max_retries=0,
    )
    return OpenAIBackend(settings, cache)


def test_a_second_run_is_answered_from_the_cache(proxy, teacher_server, tmp_path):
    cache = ReplyCache(tmp_path)
    requests = [
        TeacherRequest(f"i{n}", f"flag {n}", images=(png((n * 20, 0, 0)),)) for n in range(6)
    ]
    first = backend_for(proxy, teacher_server, cache).answer(requests)
    assert all(r.ok and not r.cached for r in first)
    assert proxy.total == 6 and len(cache) == 6

    proxy.reset()
    backend = backend_for(proxy, teacher_server, cache)
    second = backend.answer(requests)
    assert proxy.total == 0
    assert [r.text for r in second] == [r.text for r in first]
    assert [r.item_id for r in second] == [r.item_id for r in requests]
    assert all(r.cached and r.attempts == 0 for r in second)
    assert [r.prompt_tokens for r in second] == [r.prompt_tokens for r in first]
    assert (backend.stats.cached, backend.stats.sent) == (6, 0)

    # Another seed is another request.
    backend_for(proxy, teacher_server, cache, seed=7).answer(requests[:2])
    assert proxy.total == 2 and len(cache) == 8


def test_failures_are_not_cached_and_are_asked_again(proxy, teacher_server, tmp_path):
    cache = ReplyCache(tmp_path)
    proxy.reset(fail_prompts({"refused": ("refusal", 1)}))
    requests = [TeacherRequest("a", "refused"), TeacherRequest("b", "fine")]
    first = backend_for(proxy, teacher_server, cache).answer(requests)
    assert [r.error for r in first] == ["refusal", None] and len(cache) == 1

    proxy.reset()
    second = backend_for(proxy, teacher_server, cache).answer(requests)
    assert [(r.ok, r.cached) for r in second] == [(True, False), (True, True)]
    assert proxy.total == 1


def test_images_without_ids_still_get_their_own_entries(proxy, teacher_server, tmp_path):
    # The key covers images through image_ids; the backend fills them in when missing, so two
    # requests that differ only in their image never share an answer.
    cache = ReplyCache(tmp_path)
    requests = [
        TeacherRequest(c, "same prompt", images=(png(rgb),))
        for c, rgb in [("red", (255, 0, 0)), ("blue", (0, 0, 255))]
    ]
    backend_for(proxy, teacher_server, cache).answer(requests)
    assert proxy.total == 2 and len(cache) == 2
