"""The in-process teacher backend: a ``transformers`` image-text-to-text model in this process.

:class:`TransformersBackend` has the interface of the OpenAI endpoint backend (``model``,
``answer(requests)``, ``close()``) and the same contract: one
:class:`~groundforge.annotators.teacher.types.TeacherReply` per request, in order, and a failure
is a reply with an error kind, never an exception that loses the rest of the batch.

Decoding choices, and why:

* **Greedy** (``temperature == 0``) requests are generated in chunks of ``batch_size`` with left
  padding (the new tokens of every row then start at the same column). Greedy decoding uses no
  randomness, so a chunk gives the answers each request would get alone (up to float noise).
* **Sampled** (``temperature > 0``) requests are generated **one at a time**, each under its own
  seed (:func:`~groundforge.annotators.teacher.types.request_seed`, the one an endpoint would be
  sent). ``generate`` in transformers 5 takes no per-row ``torch.Generator``, so a batched draw
  would depend on which other requests share the chunk; a rerun that finds half of them cached
  (or a chunk retried one by one) would then sample different answers for the same key. One at a
  time is slower but makes a sample a function of its key alone, which is what a
  content-addressed cache and pass@k need. The global RNG state is restored afterwards.
  ``sampling.seed = None`` opts out: samples are then drawn from the global RNG and are not
  reproducible.
* ``top_k`` is disabled for sampling: transformers otherwise applies its default ``top_k=50``
  (or a checkpoint's own, e.g. ``top_k=1`` in Qwen2.5-VL-Instruct's ``generation_config.json``,
  which would make every sample identical), while :class:`Sampling` promises temperature and
  ``top_p`` only, as an OpenAI-compatible server applies them. Other generation-config entries
  of the checkpoint (e.g. ``repetition_penalty``) still apply.

* Replies are decoded by :func:`decode_replies`: special tokens skipped, nothing parsed out of
  the text (no reasoning or tool-call split), as vLLM and ``groundforge serve-teacher`` answer by
  default. The reply cache is keyed without the backend, so both must give the same text.

The processor comes from :func:`groundforge.annotators.vlm_processor.load_processor`:
Qwen-VL checkpoints get an image-only processor (the stock one needs torchvision), other model
types ``AutoProcessor``. ``max_pixels`` sets the Qwen image processor's pixel budget so that the
absolute-pixel box frame of Qwen2.5-VL matches what a recipe declares.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from groundforge.annotators.teacher.types import (
    Sampling,
    TeacherReply,
    TeacherRequest,
    request_key,
    request_seed,
)

_LOG = logging.getLogger(__name__)

# Model types the trainer loads with the Qwen2.5-VL image-only processor class.
IMAGE_ONLY_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
# Model types whose image processor reads ``size`` as a pixel budget (shortest/longest_edge are
# min/max pixels there; elsewhere ``longest_edge`` is a side length and must not be touched).
PIXEL_BUDGET_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})

_DETAIL_CHARS = 300

DEFAULT_SAMPLING = Sampling()


@dataclass
class _Item:
    """A request ready for the model: its position in the batch, key, prompt text and images."""

    index: int
    request: TeacherRequest
    key: str
    text: str
    images: list


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def decode_replies(tokenizer: Any, token_rows: Any) -> list[str]:
    """The reply text of each row of generated token ids, special tokens skipped."""
    return tokenizer.batch_decode(token_rows, skip_special_tokens=True)


def build_messages(request: TeacherRequest) -> list[dict[str, Any]]:
    """The chat messages of a request: optional system turn, then a user turn holding one image
    part per image followed by the prompt text.

    >>> build_messages(TeacherRequest(item_id="a", prompt="Where?", images=(b"x",)))[0]["content"]
    [{'type': 'image'}, {'type': 'text', 'text': 'Where?'}]
    """
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": request.system})
    content = [{"type": "image"} for _ in request.images]
    content.append({"type": "text", "text": request.prompt})
    messages.append({"role": "user", "content": content})
    return messages


class TransformersBackend:
    """A teacher answered by a local ``AutoModelForImageTextToText`` (loaded on first use).

    ``model`` is a hub id or a folder (and part of every cache key). ``cache`` is any object with
    ``get(key) -> TeacherReply | None`` and ``put(key, reply)``. ``max_pixels`` sets the pixel
    budget of a Qwen-VL image processor. ``num_threads`` sets torch's (process-wide) CPU threads.
    """

    def __init__(
        self,
        model: str,
        sampling: Sampling = DEFAULT_SAMPLING,
        batch_size: int = 4,
        device: str = "cpu",
        cache: Any = None,
        max_pixels: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        if sampling.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
        self.model = str(model)
        self.sampling = sampling
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        self.max_pixels = max_pixels
        self.num_threads = num_threads
        self._model: Any = None
        self._processor: Any = None
        self._model_type: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"TransformersBackend(model={self.model!r}, device={self.device!r}, "
            f"batch_size={self.batch_size}, max_pixels={self.max_pixels}, cache={self.cache!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def stochastic(self) -> bool:
        """Whether replies are sampled (temperature > 0) rather than greedy."""
        return self.sampling.temperature > 0

    def load(self) -> None:
        """Load the model and processor now (``answer`` does it on first use)."""
        with self._lock:
            self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText

        from groundforge.annotators.vlm_processor import load_processor, model_type_of

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        model_type = model_type_of(self.model)
        processor = load_processor(self.model, model_type)
        tokenizer = getattr(processor, "tokenizer", processor)
        # Left padding: every row's prompt then ends at the same column, so the new tokens of the
        # whole chunk are ``output[:, prompt_len:]``; right padding would put pads mid-sequence.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.max_pixels is not None:
            _set_pixel_budget(processor, model_type, self.max_pixels)

        model = AutoModelForImageTextToText.from_pretrained(self.model)
        model = model.to(self.device).eval()
        self._processor, self._model, self._model_type = processor, model, model_type

    def close(self) -> None:
        """Drop the model and processor (a later ``answer`` loads them again)."""
        with self._lock:
            on_accelerator = self._model is not None and self.device != "cpu"
            self._model = None
            self._processor = None
        if on_accelerator:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> TransformersBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into workers (Beam) without the loaded model; each worker loads its own.
        state = self.__dict__.copy()
        state.update(_model=None, _processor=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- answering ---------------------------------------------------------------------------

    def answer(
        self, requests: Sequence[TeacherRequest], meter=None, gate=None
    ) -> list[TeacherReply]:
        """One reply per request, in order; cache hits come back with ``cached=True``.

        ``meter``, when given, is told of each request as it goes to the model (``sent()``) and
        of each reply as it is made (``reply(reply)``): per chunk of ``batch_size`` greedy
        requests, per request when sampling.
        """
        requests = list(requests)
        replies: list[TeacherReply | None] = [None] * len(requests)
        pending: list[tuple[int, TeacherRequest, str]] = []
        for index, request in enumerate(requests):
            key = request_key(self.model, request, self.sampling)
            hit = self._cache_get(key)
            if hit is not None:
                replies[index] = dataclasses.replace(
                    hit, item_id=request.item_id, cached=True, attempts=0
                )
                if meter is not None:
                    meter.reply(replies[index])
            else:
                pending.append((index, request, key))

        if pending:
            with self._lock:
                self._ensure_loaded()
                items = []
                for index, request, key in pending:
                    prepared = self._prepare(index, request, key)
                    if isinstance(prepared, TeacherReply):
                        replies[index] = prepared
                        if meter is not None:
                            meter.sent()
                            meter.reply(prepared)
                    else:
                        items.append(prepared)
                size = 1 if self.stochastic else self.batch_size
                if gate is not None:
                    items = self._allowed(items, gate, replies, meter)
                for start in range(0, len(items), size):
                    chunk = items[start : start + size]
                    if meter is not None:
                        meter.sent(len(chunk))
                    for item, reply in zip(chunk, self._run_chunk(chunk), strict=True):
                        replies[item.index] = reply
                        if reply.ok:
                            self._cache_put(item.key, reply)
                        if gate is not None:
                            gate.spend(reply)
                        if meter is not None:
                            meter.reply(reply)
        missing = [i for i, reply in enumerate(replies) if reply is None]
        if missing:  # a bug here, not a request failure: never hand back a shifted list
            raise RuntimeError(f"no reply for requests at {missing}")
        return replies  # type: ignore[return-value]

    def _allowed(self, items: list[_Item], gate, replies: list, meter) -> list[_Item]:
        """The items the budget allows; the others get their ``over_budget`` reply."""
        from groundforge.annotators.teacher.budget import over_budget

        allowed = []
        for item in items:
            if gate.reserve():
                allowed.append(item)
                continue
            replies[item.index] = over_budget(item.request.item_id)
            if meter is not None:
                meter.reply(replies[item.index])
        return allowed

    def _prepare(self, index: int, request: TeacherRequest, key: str) -> _Item | TeacherReply:
        """Decode the images and render the prompt; a request that cannot be is a bad request."""
        from groundforge.filters.image import open_rgb

        try:
            images = [open_rgb(data) for data in request.images]
        except Exception as exc:
            return TeacherReply(
                item_id=request.item_id,
                error="bad_request",
                detail=f"undecodable image: {_short(exc)}",
            )
        try:
            text = self._processor.apply_chat_template(
                build_messages(request), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            return TeacherReply(
                item_id=request.item_id,
                error="bad_request",
                detail=f"chat template: {_short(exc)}",
            )
        return _Item(index=index, request=request, key=key, text=text, images=images)

    def _run_chunk(self, chunk: list[_Item]) -> list[TeacherReply]:
        """Generate a chunk; if it fails as a whole, retry its requests one by one so that one
        bad request (or a chunk too large for memory) costs only itself."""
        try:
            return self._generate(chunk, attempts=1)
        except Exception as exc:
            if len(chunk) == 1:
                return [self._failure(chunk[0], exc, attempts=1)]
            _LOG.warning(
                "teacher chunk of %d failed (%s); retrying one by one", len(chunk), _short(exc)
            )
        replies = []
        for item in chunk:
            try:
                replies.extend(self._generate([item], attempts=2))
            except Exception as exc:
                replies.append(self._failure(item, exc, attempts=2))
        return replies

    def _failure(self, item: _Item, exc: BaseException, attempts: int) -> TeacherReply:
        _LOG.warning("teacher request %s failed: %s", item.request.item_id, _short(exc))
        return TeacherReply(
            item_id=item.request.item_id,
            error="backend_error",
            detail=_short(exc),
            attempts=attempts,
        )

    def _generate(self, chunk: list[_Item], attempts: int) -> list[TeacherReply]:
        import torch

        model, processor = self._model, self._processor
        inputs_kwargs: dict[str, Any] = {
            "text": [item.text for item in chunk],
            "return_tensors": "pt",
            "padding": True,
        }
        if any(item.images for item in chunk):
            # One list per prompt: Qwen flattens it, processors like Idefics3 require it nested.
            inputs_kwargs["images"] = [item.images for item in chunk]
        inputs = processor(**inputs_kwargs).to(device=model.device, dtype=model.dtype)

        generate_kwargs: dict[str, Any] = {"max_new_tokens": self.sampling.max_tokens}
        if self.stochastic:
            generate_kwargs.update(
                do_sample=True,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                top_k=0,
            )
        else:
            generate_kwargs["do_sample"] = False

        seeded = nullcontext()
        if self.stochastic and self.sampling.seed is not None:
            (item,) = chunk  # sampled requests are generated alone: see the module docstring
            seeded = self._seeded(request_seed(item.request, self.sampling.seed))
        with seeded, torch.inference_mode():
            output = model.generate(**inputs, **generate_kwargs)

        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = output[:, prompt_len:]
        prompt_tokens = inputs["attention_mask"].sum(dim=-1).tolist()
        completion_tokens = _completion_lengths(new_tokens, _eos_ids(model, processor))
        texts = decode_replies(getattr(processor, "tokenizer", processor), new_tokens)

        replies = []
        for item, text, n_prompt, n_completion in zip(
            chunk, texts, prompt_tokens, completion_tokens, strict=True
        ):
            common = {
                "item_id": item.request.item_id,
                "attempts": attempts,
                "prompt_tokens": int(n_prompt),
                "completion_tokens": int(n_completion),
            }
            if text.strip():
                replies.append(TeacherReply(text=text, **common))
            else:
                replies.append(
                    TeacherReply(error="empty", detail="the model generated no text", **common)
                )
        return replies

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Seed torch for one generate call and restore the caller's RNG state afterwards."""
        import torch

        device = torch.device(self.device)
        if device.type == "cpu":
            fork = torch.random.fork_rng(devices=[])
        else:
            index = device.index
            if index is None:
                index = torch.get_device_module(device.type).current_device()
            fork = torch.random.fork_rng(devices=[index], device_type=device.type)
        with fork:
            torch.manual_seed(seed)
            yield

    # -- cache -------------------------------------------------------------------------------

    def _cache_get(self, key: str) -> TeacherReply | None:
        if self.cache is None:
            return None
        try:
            hit = self.cache.get(key)
        except Exception as exc:
            # A broken cache costs a model call, not the request.
            _LOG.warning("teacher cache read failed for %s: %s", key, _short(exc))
            return None
        return hit if hit is not None and hit.ok else None

    def _cache_put(self, key: str, reply: TeacherReply) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(key, reply)
        except Exception as exc:
            _LOG.warning("teacher cache write failed for %s: %s", key, _short(exc))


def _set_pixel_budget(processor: Any, model_type: str | None, max_pixels: int) -> None:
    """Set a Qwen-VL image processor's maximum pixel count (its ``size["longest_edge"]``).

    transformers 5 reads the budget from ``size`` (``shortest_edge``/``longest_edge`` are min/max
    *pixels* for these processors); passing ``max_pixels`` per call is deprecated. The minimum
    is lowered with it so the range stays valid.
    """
    image_processor = getattr(processor, "image_processor", None)
    if model_type not in PIXEL_BUDGET_MODEL_TYPES or image_processor is None:
        raise ValueError(
            f"max_pixels is only supported for Qwen-VL models ({sorted(PIXEL_BUDGET_MODEL_TYPES)}),"
            f" not model type {model_type!r}"
        )
    size = image_processor.size
    current_min = size["shortest_edge"] or max_pixels
    new_size = {"shortest_edge": min(current_min, max_pixels), "longest_edge": max_pixels}
    # transformers 5 keeps ``size`` as a SizeDict; older versions as a plain dict.
    image_processor.size = new_size if isinstance(size, dict) else type(size)(**new_size)
    # Older image processors also keep the budget as attributes.
    if getattr(image_processor, "max_pixels", None) is not None:
        image_processor.max_pixels = max_pixels
    if getattr(image_processor, "min_pixels", None) is not None:
        image_processor.min_pixels = min(image_processor.min_pixels, max_pixels)


def _eos_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _completion_lengths(new_tokens: Any, eos_ids: set[int]) -> list[int]:
    """Generated tokens per row, up to and including the first end-of-sequence token (rows
    that finish early are padded to the chunk's length)."""
    lengths = []
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        lengths.append(len(row) if end is None else end + 1)
    return lengths
