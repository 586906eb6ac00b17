"""Chat models as a Beam ``ModelHandler``: one backend per worker, a batch answered concurrently.

An element is a :class:`ChatJob`: the requests of one item (one for the teacher and the grounder,
``k`` for a student's pass@k). The handler sends every request of a batch through its backend at
once (bounded by the backend's concurrency) and returns one ``PredictionResult(job, replies)`` per
job, replies in request order. A failed request is a reply with an error kind, so it costs only
its own item; the handler never raises for one bad answer.

With a ``progress`` meter (:class:`groundforge.pipelines.progress.ModelProgress`) the backend
reports each request as it is sent and as its reply arrives. Beam counters record, per role, the
requests, cache hits, attempts, failures by kind, tokens of the replies that were not cached, and
the busy time of the batches that sent at least one request (a batch answered wholly from the
cache cost nothing, and its time is not counted). With a ``budget``
(:class:`~groundforge.annotators.teacher.budget.Budget`) each request must be allowed by it
before it is sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from groundforge.annotators.teacher.types import (
    EndpointSettings,
    Sampling,
    TeacherReply,
    TeacherRequest,
)

METRICS_PREFIX = "chat:"


@dataclass(frozen=True)
class ChatJob:
    """The requests of one item and the record they are about (``context``, passed through)."""

    item_id: str
    requests: tuple[TeacherRequest, ...]
    context: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ChatBackendSettings:
    """Everything a worker needs to build its backend; picklable, holds no secret."""

    role: str
    model: str
    sampling: Sampling
    base_url: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = 16
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 60.0
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: str | None = None
    max_pixels: int | None = None
    num_threads: int | None = None
    price: Any = None

    @classmethod
    def from_config(cls, role: str, cfg, cache_dir: str | None, num_threads: int | None = None):
        """From a recipe's model section (``recipe.ChatModelConfig``)."""
        max_pixels = cfg.codec_params.get("max_pixels") if cfg.codec == "qwen25vl" else None
        return cls(
            role=role,
            model=cfg.model,
            sampling=Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed),
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            backoff=cfg.backoff,
            max_backoff=cfg.max_backoff,
            batch_size=cfg.batch_size,
            device=cfg.device,
            cache_dir=cfg.cache_dir or cache_dir,
            max_pixels=int(max_pixels) if max_pixels else None,
            num_threads=num_threads,
            price=cfg.price,
        )

    def build_backend(self):
        """The OpenAI-endpoint backend when ``base_url`` is set, else the in-process one."""
        cache = None
        if self.cache_dir:
            from groundforge.annotators.teacher.cache import ReplyCache

            cache = ReplyCache(self.cache_dir)
        if self.base_url:
            from groundforge.annotators.teacher.client import OpenAIBackend

            endpoint = EndpointSettings(
                base_url=self.base_url,
                model=self.model,
                api_key_env=self.api_key_env,
                sampling=self.sampling,
                max_concurrency=self.max_concurrency,
                timeout=self.timeout,
                max_retries=self.max_retries,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
            )
            return OpenAIBackend(endpoint, cache=cache)
        from groundforge.annotators.teacher.embedded import TransformersBackend

        return TransformersBackend(
            self.model,
            sampling=self.sampling,
            batch_size=min(self.batch_size, self.max_concurrency),
            device=self.device,
            cache=cache,
            max_pixels=self.max_pixels,
            num_threads=self.num_threads,
        )


class _Backend:
    """What load_model returns: Beam's model cache holds a weak reference, so not a bare tuple."""

    def __init__(self, backend):
        self.backend = backend


def count_replies(role: str, replies: Sequence[TeacherReply], seconds: float = 0.0) -> None:
    """Beam counters for the manifest: requests, cached, refused by the budget, answered, HTTP
    attempts, failures by kind, tokens of the replies sent, and the batch's busy microseconds
    when it sent anything."""
    ns = METRICS_PREFIX + role
    sent = [r for r in replies if not r.cached and r.error != "over_budget"]
    cached = sum(r.cached for r in replies)
    Metrics.counter(ns, "requests").inc(len(replies))
    Metrics.counter(ns, "cached").inc(cached)
    Metrics.counter(ns, "refused").inc(len(replies) - cached - len(sent))
    Metrics.counter(ns, "answered").inc(sum(r.ok for r in replies))
    Metrics.counter(ns, "attempts").inc(sum(r.attempts for r in replies))
    Metrics.counter(ns, "prompt_tokens").inc(sum(r.prompt_tokens or 0 for r in sent))
    Metrics.counter(ns, "completion_tokens").inc(sum(r.completion_tokens or 0 for r in sent))
    if sent:
        Metrics.counter(ns, "busy_us").inc(int(seconds * 1e6))
    for reply in replies:
        if not reply.ok:
            Metrics.counter(ns, f"failed_{reply.error}").inc()


class ChatModelHandler(ModelHandler[ChatJob, PredictionResult, _Backend]):
    """Answers :class:`ChatJob` batches with the backend described by ``settings``."""

    def __init__(self, settings: ChatBackendSettings, progress=None, budget=None):
        super().__init__()
        self.settings = settings
        self.progress = progress
        self.budget = budget

    def load_model(self) -> _Backend:
        return _Backend(self.settings.build_backend())

    def run_inference(
        self,
        batch: Sequence[ChatJob],
        model: _Backend,
        inference_args: dict[str, Any] | None = None,
    ) -> list[PredictionResult]:
        requests = [r for job in batch for r in job.requests]
        started = time.perf_counter()
        extra = {}
        if self.budget is not None:
            from groundforge.annotators.teacher.budget import BudgetGate

            extra["gate"] = BudgetGate(self.budget, self.settings.price)
        if self.progress is None:
            replies = model.backend.answer(requests, **extra)
        else:
            self.progress.jobs(len(batch))
            try:
                replies = model.backend.answer(requests, meter=self.progress, **extra)
            finally:
                self.progress.flush()
        if len(replies) != len(requests):
            raise RuntimeError(f"backend returned {len(replies)} replies to {len(requests)}")
        count_replies(self.settings.role, replies, time.perf_counter() - started)
        results, start = [], 0
        for job in batch:
            end = start + len(job.requests)
            results.append(PredictionResult(job, tuple(replies[start:end]), self.settings.model))
            start = end
        return results

    def batch_elements_kwargs(self):
        # Fixed batches: the backend overlaps the requests of one batch, so a batch should hold
        # enough of them to fill its concurrency from the start.
        return {
            "min_batch_size": self.settings.batch_size,
            "max_batch_size": self.settings.batch_size,
        }

    def share_model_across_processes(self) -> bool:
        return False

    def get_num_bytes(self, batch: Sequence[ChatJob]) -> int:
        return sum(len(img) for job in batch for r in job.requests for img in r.images)
