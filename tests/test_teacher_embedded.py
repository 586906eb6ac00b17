"""The in-process teacher backend with the tiny random Qwen2.5-VL: order, token counts,
determinism, seeded sampling, per-item failures, the cache, and batching with left padding."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.embedded import TransformersBackend
from groundforge.annotators.teacher.types import (
    Sampling,
    TeacherRequest,
    request_key,
    request_seed,
)

GREEDY = Sampling(temperature=0.0, max_tokens=8, seed=0)
SAMPLED = Sampling(temperature=1.0, top_p=1.0, max_tokens=8, seed=7)


def noise_png(seed: int, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def make_request(
    item_id: str,
    prompt: str,
    images: tuple[bytes, ...] = (),
    system: str | None = None,
    sample_index: int = 0,
) -> TeacherRequest:
    return TeacherRequest(
        item_id=item_id,
        prompt=prompt,
        images=images,
        image_ids=tuple(hashlib.sha256(data).hexdigest() for data in images),
        system=system,
        sample_index=sample_index,
    )


def mixed_requests() -> list[TeacherRequest]:
    """Different image sizes, prompt lengths, a text-only and a system-prompted request: a chunk
    of these needs real padding."""
    return [
        make_request("a", "Where is the flag?", (noise_png(0, 200, 120),)),
        make_request("b", "Find the airplane in the image, then answer.", (noise_png(1, 90, 300),)),
        make_request("c", "Romania or Chad?"),
        make_request("d", "Which flag?", (noise_png(2, 400, 400),), system="Think step by step."),
        make_request("e", "Two images: which one has red?", (noise_png(3, 60, 60),) * 2),
        make_request("f", "json bbox_2d label", (noise_png(4, 150, 100),)),
    ]


def count_generate(monkeypatch: pytest.MonkeyPatch, backend: TransformersBackend) -> list[int]:
    """Load ``backend`` and record the batch size of every ``generate`` call."""
    backend.load()
    model = backend._model
    original = model.generate
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


@pytest.fixture(scope="module")
def greedy(tiny_vlm_dir) -> TransformersBackend:
    backend = TransformersBackend(str(tiny_vlm_dir), GREEDY, batch_size=4, num_threads=2)
    yield backend
    backend.close()


def test_one_reply_per_request_in_order(greedy):
    requests = mixed_requests()
    replies = greedy.answer(requests)

    assert [r.item_id for r in replies] == [q.item_id for q in requests]
    for request, reply in zip(requests, replies, strict=True):
        assert reply.ok, reply
        assert request.prompt not in reply.text  # only the new tokens are decoded
        assert isinstance(reply.text, str) and reply.text.strip()
        assert not reply.cached and reply.attempts == 1
        assert reply.prompt_tokens > 0
        assert 1 <= reply.completion_tokens <= GREEDY.max_tokens
    # each reply belongs to its own request, whatever the position in the batch
    backwards = greedy.answer(requests[::-1])
    assert [r.item_id for r in backwards] == [q.item_id for q in requests[::-1]]
    assert [r.text for r in backwards] == [r.text for r in replies][::-1]
    assert greedy.answer([]) == []


def test_prompt_tokens_count_the_image_tokens(greedy, tiny_vlm_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    small, large = noise_png(5, 60, 60), noise_png(6, 300, 240)
    text_only, with_small, with_large = greedy.answer(
        [
            make_request("t", "Where is the flag?"),
            make_request("s", "Where is the flag?", (small,)),
            make_request("l", "Where is the flag?", (large,)),
        ]
    )
    size = greedy._processor.image_processor.size

    def image_tokens(width: int, height: int, max_pixels: int) -> int:
        h, w = smart_resize(height, width, 28, size["shortest_edge"], max_pixels)
        return (h // 28) * (w // 28)

    # <|vision_start|> + the expanded <|image_pad|> run + <|vision_end|>
    extra = with_small.prompt_tokens - text_only.prompt_tokens
    assert extra == image_tokens(60, 60, size["longest_edge"]) + 2
    assert with_large.prompt_tokens - text_only.prompt_tokens == (
        image_tokens(300, 240, size["longest_edge"]) + 2
    )
    assert with_large.prompt_tokens > with_small.prompt_tokens > text_only.prompt_tokens

    # max_pixels reaches the processor's resize: fewer image tokens, the frame smart_resize gives
    budget = 28 * 28 * 6
    capped = TransformersBackend(str(tiny_vlm_dir), GREEDY, max_pixels=budget)
    (capped_large,) = capped.answer([make_request("l", "Where is the flag?", (large,))])
    assert capped_large.prompt_tokens - text_only.prompt_tokens == (
        image_tokens(300, 240, budget) + 2
    )
    assert capped_large.prompt_tokens < with_large.prompt_tokens


def test_greedy_is_deterministic_across_instances(greedy, tiny_vlm_dir):
    requests = mixed_requests()[:4]
    other = TransformersBackend(str(tiny_vlm_dir), GREEDY, batch_size=2)
    first, second = greedy.answer(requests), other.answer(requests)
    assert [r.text for r in first] == [r.text for r in second]
    assert [r.completion_tokens for r in first] == [r.completion_tokens for r in second]


def test_batched_chunks_match_one_by_one(tiny_vlm_dir, monkeypatch):
    requests = mixed_requests()
    batched = TransformersBackend(str(tiny_vlm_dir), GREEDY, batch_size=4)
    single = TransformersBackend(str(tiny_vlm_dir), GREEDY, batch_size=1)
    batched_calls = count_generate(monkeypatch, batched)
    single_calls = count_generate(monkeypatch, single)

    together, alone = batched.answer(requests), single.answer(requests)

    assert batched_calls == [4, 2] and single_calls == [1] * 6
    assert len({r.prompt_tokens for r in alone}) > 1  # the chunks really were padded
    assert [r.text for r in together] == [r.text for r in alone]
    # counts exclude the left padding and the padding after a row finished early
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]


def test_sampling_is_reproducible_per_seed_and_sample_index(tiny_vlm_dir, monkeypatch):
    def requests(indices):
        return [
            make_request(f"s{k}", "Where is the flag?", (noise_png(0, 120, 90),), sample_index=k)
            for k in indices
        ]

    first = TransformersBackend(str(tiny_vlm_dir), SAMPLED, batch_size=4)
    second = TransformersBackend(str(tiny_vlm_dir), SAMPLED, batch_size=4)
    calls = count_generate(monkeypatch, first)

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    texts = [r.text for r in first.answer(requests(range(5)))]
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is untouched
    assert calls == [1] * 5  # sampled requests are generated one at a time

    # same seed and sample index, another instance, another batch, another order: same sample
    again = second.answer(requests([4, 2, 0]))
    assert [r.text for r in again] == [texts[4], texts[2], texts[0]]
    # the sample index picks a different sample; so does the run seed
    assert len(set(texts)) >= 4
    reseeded = TransformersBackend(
        str(tiny_vlm_dir), Sampling(temperature=1.0, top_p=1.0, max_tokens=8, seed=8)
    )
    assert [r.text for r in reseeded.answer(requests(range(5)))] != texts
    # and it is sampling, not greedy decoding
    (greedy_reply,) = TransformersBackend(str(tiny_vlm_dir), GREEDY).answer(requests([0]))
    assert any(text != greedy_reply.text for text in texts)


def test_sampling_ignores_a_checkpoint_top_k(tiny_vlm_dir):
    # Qwen2.5-VL-Instruct ships top_k=1 in generation_config.json: honoured, every sample of a
    # prompt would be the greedy answer. Sampling promises temperature and top_p only.
    backend = TransformersBackend(str(tiny_vlm_dir), SAMPLED)
    backend.load()
    backend._model.generation_config.top_k = 1
    replies = backend.answer(
        [make_request(f"s{k}", "Where is the flag?", sample_index=k) for k in range(4)]
    )
    assert len({r.text for r in replies}) >= 2


def test_request_seed_depends_on_seed_index_and_content():
    base = TeacherRequest("i", "Where is the flag?", image_ids=("a" * 64,))
    variants = [
        base,
        dataclasses.replace(base, sample_index=1),
        dataclasses.replace(base, prompt="Where is the plane?"),
        dataclasses.replace(base, image_ids=("b" * 64,)),
        dataclasses.replace(base, system="be brief"),
        dataclasses.replace(base, template_hash="t2"),
    ]
    seeds = {request_seed(r, s) for r in variants for s in (0, 1)}
    assert len(seeds) == 2 * len(variants)
    # The item it is for is not content: two items asking the same share the seed (and key).
    assert request_seed(dataclasses.replace(base, item_id="j"), 3) == request_seed(base, 3)
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert request_seed(base, None) is None


def test_a_corrupt_image_fails_alone(greedy):
    good = mixed_requests()[:3]
    corrupt = make_request("bad", "Where is the flag?", (b"\x89PNG\r\n\x1a\nnot really",))
    replies = greedy.answer([good[0], corrupt, good[1], good[2]])

    assert [r.item_id for r in replies] == ["a", "bad", "b", "c"]
    assert replies[1].error == "bad_request" and "undecodable image" in replies[1].detail
    assert replies[1].text is None and not replies[1].ok
    reference = greedy.answer(good)
    assert [r.text for r in (replies[0], replies[2], replies[3])] == [r.text for r in reference]


def test_a_failing_chunk_is_retried_one_by_one(tiny_vlm_dir, monkeypatch, tmp_path):
    backend = TransformersBackend(
        str(tiny_vlm_dir), GREEDY, batch_size=4, cache=ReplyCache(tmp_path / "reference")
    )
    requests = mixed_requests()[:3]
    reference = backend.answer(requests)
    # A fresh cache, so every request reaches the model again.
    cache = backend.cache = ReplyCache(tmp_path / "cache")
    poisoned = make_request("poison", "the poison pill", (noise_png(9, 80, 80),))

    model = backend._model
    original = model.generate
    tokenizer = backend._processor.tokenizer
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        if any("poison" in text for text in tokenizer.batch_decode(kwargs["input_ids"])):
            raise RuntimeError("simulated kernel failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", flaky)
    replies = backend.answer([requests[0], requests[1], poisoned, requests[2]])

    assert calls == [4, 1, 1, 1, 1]
    assert [r.item_id for r in replies] == ["a", "b", "poison", "c"]
    failed = replies[2]
    assert failed.error == "backend_error" and "simulated kernel failure" in failed.detail
    assert failed.attempts == 2
    others = [replies[0], replies[1], replies[3]]
    assert all(r.ok and r.attempts == 2 for r in others)
    assert [r.text for r in others] == [r.text for r in reference]
    # a failure is not cached: a rerun tries the request again
    assert request_key(backend.model, poisoned, GREEDY) not in cache
    assert len(cache) == 3


def test_empty_generation_is_an_empty_error(tiny_vlm_dir, monkeypatch):
    backend = TransformersBackend(str(tiny_vlm_dir), GREEDY)
    backend.load()
    model = backend._model
    eos = model.generation_config.eos_token_id

    def only_eos(*args, **kwargs):
        input_ids = kwargs["input_ids"]
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), eos)], dim=1)

    monkeypatch.setattr(model, "generate", only_eos)
    (reply,) = backend.answer([make_request("a", "Where is the flag?")])
    assert reply.error == "empty" and reply.text is None
    assert reply.completion_tokens == 1 and reply.prompt_tokens > 0


def test_the_cache_short_circuits_the_model(tiny_vlm_dir, monkeypatch, tmp_path):
    import transformers

    cache = ReplyCache(tmp_path / "cache")
    requests = mixed_requests()[:3]
    corrupt = make_request("bad", "Where?", (b"garbage",))
    first = TransformersBackend(str(tiny_vlm_dir), GREEDY, cache=cache)
    calls = count_generate(monkeypatch, first)
    fresh = first.answer([*requests, corrupt])
    assert calls == [3]
    assert not any(r.cached for r in fresh)
    # ok replies are stored under their content address; failures are not
    assert len(cache) == len(requests)
    assert all(request_key(first.model, q, GREEDY) in cache for q in requests)

    def no_loading(*args, **kwargs):
        raise AssertionError("a full cache hit must not load the model")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_loading)
    second = TransformersBackend(str(tiny_vlm_dir), GREEDY, cache=cache)
    renamed = dataclasses.replace(requests[0], item_id="a-again")
    hits = second.answer([*requests, renamed])
    assert all(r.cached and r.ok for r in hits)
    assert [r.item_id for r in hits] == ["a", "b", "c", "a-again"]
    assert [r.text for r in hits] == [r.text for r in fresh[:3]] + [fresh[0].text]

    # a partial hit runs only the missing request
    extra = make_request("z", "Romania or Chad?", (noise_png(8, 70, 50),))
    mixed = first.answer([requests[1], extra])
    assert calls == [3, 1]
    assert [r.cached for r in mixed] == [True, False]
    assert request_key(first.model, extra, GREEDY) in cache


def test_requests_without_image_ids_are_keyed_by_their_image_bytes(greedy, monkeypatch, tmp_path):
    cache = ReplyCache(tmp_path / "cache")
    monkeypatch.setattr(greedy, "cache", cache)
    one, two = noise_png(10, 100, 60), noise_png(11, 200, 200)
    bare = [
        TeacherRequest(item_id="one", prompt="Which flag?", images=(one,)),
        TeacherRequest(item_id="two", prompt="Which flag?", images=(two,)),
    ]
    fresh = greedy.answer(bare)
    assert len(cache) == 2  # no collision between images behind the same prompt
    assert request_key(greedy.model, make_request("one", "Which flag?", (one,)), GREEDY) in cache
    hits = greedy.answer(bare[::-1])
    assert all(r.cached and r.attempts == 0 for r in hits)
    assert fresh[0].prompt_tokens != fresh[1].prompt_tokens
    assert [r.prompt_tokens for r in hits] == [r.prompt_tokens for r in fresh[::-1]]
    assert [r.text for r in hits] == [r.text for r in fresh[::-1]]


def test_the_backend_pickles_without_its_model(greedy):
    request = mixed_requests()[0]
    (expected,) = greedy.answer([request])
    clone = pickle.loads(pickle.dumps(greedy))
    assert clone._model is None and clone.model == greedy.model
    (reply,) = clone.answer([request])
    assert reply.text == expected.text
    clone.close()


def test_max_pixels_needs_a_pixel_budget_processor(tiny_detector_dir):
    backend = TransformersBackend(str(tiny_detector_dir), GREEDY, max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels"):
        backend.load()
