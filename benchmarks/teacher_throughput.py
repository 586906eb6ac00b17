"""How close does OpenAIBackend get to the throughput its concurrency bound allows?

A local fake endpoint (a separate process running a small asyncio HTTP server) answers every chat
completion after a fixed latency (default 200 ms) without blocking other connections, so the
ideal throughput of a client holding ``C`` requests in flight is ``C / latency`` (32 / 0.2 s =
160 requests/s). A fake is enough here: latency, not the answers, is what is measured.

Two ways of sending the same ``N`` requests through the same backend (``max_concurrency=C``):

- ``continuous``: one ``answer()`` over all ``N``; a slot freed by one request is refilled at once.
- ``batch-gather B``: ``answer()`` over consecutive batches of ``B``; a batch starts only when the
  slowest request of the previous one has finished. This is how Beam's ``VLLMChatModelHandler``
  sends a batch (and how any ``RunInference`` handler answers one batch per call, ours included).

Each is run on a uniform load and on a load with one slow outlier (``--outlier`` seconds) in
every 32 requests, which shows the tail effect: a batch waits for its outlier while the
continuous client keeps the other slots busy. Two ratios per row:

- ``/nominal``: throughput over ``C / latency``, the number to aim at (>= 0.9 on the uniform
  load for ``continuous``);
- ``/own ideal``: the same arm's zero-overhead time (``C`` slots filled in request order, each
  request taking exactly its latency) over the measured time: the client's own efficiency, with
  the cost of the sending pattern (batches, outliers) taken out.

Then the teacher *stage*: the same requests as :class:`ChatJob` elements through
``RunInference(ChatModelHandler)`` in a Beam pipeline, batches of ``--stage-batch``. Its throughput
is measured from the first request sent to the last reply received (Beam's start-up and teardown
are reported separately, as the whole-pipeline time). A ``RunInference`` handler answers one batch
per call, so on the single-threaded DirectRunner batches never overlap and each ends with a
ramp-down; with ``--direct_running_mode=multi_threading`` several bundles share the worker's one
backend (one connection pool, one concurrency bound) and the slots stay full.

Medians of ``--repeat`` interleaved runs. Run::

    python benchmarks/teacher_throughput.py --requests 256 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import io
import json
import multiprocessing
import statistics
import time

from PIL import Image

from groundforge.annotators.teacher.client import OpenAIBackend
from groundforge.annotators.teacher.handler import ChatBackendSettings, ChatJob, ChatModelHandler
from groundforge.annotators.teacher.types import EndpointSettings, Sampling, TeacherRequest

SLOW_MARK = "[slow]"
OUTLIER_EVERY = 32


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "a flag"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }
    ).encode()


async def _serve(latency: float, outlier: float, port_queue) -> None:
    body = _completion("bench-model")
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    slow = SLOW_MARK.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: many requests per connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = await reader.readexactly(length)
                await asyncio.sleep(outlier if slow in request else latency)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    port_queue.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _server_main(latency: float, outlier: float, port_queue) -> None:
    asyncio.run(_serve(latency, outlier, port_queue))


def make_requests(n: int, outliers: bool) -> list[TeacherRequest]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buf, "PNG")
    image = buf.getvalue()
    requests = []
    for i in range(n):
        prompt = f"Which flag is this? ({i})"
        if outliers and i % OUTLIER_EVERY == 0:
            prompt += f" {SLOW_MARK}"
        requests.append(TeacherRequest(f"r{i}", prompt, images=(image,)))
    return requests


def ideal_seconds(latencies: list[float], concurrency: int, batch: int | None) -> float:
    """Makespan with no overhead: each batch fills ``concurrency`` slots in order, and the next
    batch starts when the previous one's last request ends."""
    size = batch or len(latencies)
    total = 0.0
    for start in range(0, len(latencies), size):
        slots = [0.0] * concurrency
        end = 0.0
        for latency in latencies[start : start + size]:
            done = heapq.heappop(slots) + latency
            heapq.heappush(slots, done)
            end = max(end, done)
        total += end
    return total


def run_arm(backend: OpenAIBackend, requests: list[TeacherRequest], batch: int | None) -> float:
    """Seconds to answer every request; fails loudly if any reply failed."""
    start = time.perf_counter()
    if batch is None:
        replies = backend.answer(requests)
    else:
        replies = []
        for i in range(0, len(requests), batch):
            replies += backend.answer(requests[i : i + batch])
    elapsed = time.perf_counter() - start
    failed = [r for r in replies if not r.ok]
    if failed or len(replies) != len(requests):
        raise RuntimeError(f"{len(failed)} failed replies, e.g. {failed[:1]}")
    return elapsed


class _TimedHandler(ChatModelHandler):
    """Records when each batch starts and ends (in-process runners share this list)."""

    spans: list[tuple[float, float]] = []

    def run_inference(self, batch, model, inference_args=None):
        start = time.perf_counter()
        results = super().run_inference(batch, model, inference_args)
        _TimedHandler.spans.append((start, time.perf_counter()))
        return results


def run_stage(base_url: str, args, beam_args: list[str]) -> tuple[float, float]:
    """(stage seconds from first request to last reply, whole pipeline seconds)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    settings = ChatBackendSettings(
        role="teacher",
        model="bench-model",
        sampling=Sampling(max_tokens=16),
        base_url=base_url,
        max_concurrency=args.concurrency,
        batch_size=args.stage_batch,
        max_retries=0,
        timeout=30.0,
    )
    jobs = [ChatJob(r.item_id, (r,)) for r in make_requests(args.stage_requests, False)]
    _TimedHandler.spans = []
    start = time.perf_counter()
    with beam.Pipeline(argv=beam_args) as p:
        _ = (
            p
            | beam.Create(jobs)
            | RunInference(_TimedHandler(settings))
            | beam.combiners.Count.Globally()
        )
    whole = time.perf_counter() - start
    spans = _TimedHandler.spans
    if not spans:
        raise RuntimeError("the stage answered no batch")
    return max(e for _, e in spans) - min(s for s, _ in spans), whole


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--outlier", type=float, default=1.0)
    parser.add_argument("--batch-sizes", default="32,128", help="batch-gather batch sizes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stage-requests", type=int, default=1024)
    parser.add_argument("--stage-batch", type=int, default=128, help="Beam batch of the stage")
    parser.add_argument("--threads", type=int, default=2, help="multi_threading bundles")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_server_main, args=(args.latency, args.outlier, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        settings = EndpointSettings(
            base_url=f"http://127.0.0.1:{port}/v1",
            model="bench-model",
            sampling=Sampling(max_tokens=16),
            max_concurrency=args.concurrency,
            timeout=30.0,
            max_retries=0,
        )
        backend = OpenAIBackend(settings)
        backend.answer(make_requests(args.concurrency, outliers=False))  # warm-up

        batches = [int(b) for b in args.batch_sizes.split(",") if b]
        arms = [("continuous", None)] + [(f"batch-gather {b}", b) for b in batches]
        loads = {"uniform": False, "outliers": True}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for load, outliers in loads.items():
                requests = make_requests(args.requests, outliers)
                for name, batch in arms:
                    times.setdefault((load, name), []).append(run_arm(backend, requests, batch))
        stage_modes = {
            "in_process": [],
            f"multi_threading x{args.threads}": [
                "--direct_running_mode=multi_threading",
                f"--direct_num_workers={args.threads}",
            ],
        }
        stage_times: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeat):
            for mode, beam_args in stage_modes.items():
                stage_times.setdefault(mode, []).append(
                    run_stage(settings.base_url, args, beam_args)
                )
    finally:
        server.terminate()
        server.join(10)

    nominal = args.concurrency / args.latency
    print(
        f"{args.requests} requests, max_concurrency {args.concurrency}, latency "
        f"{args.latency * 1000:.0f} ms, outlier {args.outlier:g} s every {OUTLIER_EVERY}; "
        f"nominal ideal {nominal:.0f} req/s; median of {args.repeat}"
    )
    print(f"{'load':<9} {'arm':<17} {'s':>6} {'req/s':>7} {'/nominal':>9} {'/own ideal':>11}")
    batch_of = dict(arms)
    for (load, name), seconds in times.items():
        latencies = [
            args.outlier if loads[load] and i % OUTLIER_EVERY == 0 else args.latency
            for i in range(args.requests)
        ]
        elapsed = statistics.median(seconds)
        rate = args.requests / elapsed
        ideal = ideal_seconds(latencies, args.concurrency, batch_of[name])
        print(
            f"{load:<9} {name:<17} {elapsed:>6.2f} {rate:>7.1f} {rate / nominal:>9.2f} "
            f"{ideal / elapsed:>11.2f}"
        )
    n = args.stage_requests
    print(
        f"\nteacher stage in Beam: {n} jobs, batch {args.stage_batch}, max_concurrency "
        f"{args.concurrency}; ideal {n / nominal:.2f} s"
    )
    print(f"{'DirectRunner mode':<22} {'stage s':>8} {'stage/ideal':>12} {'pipeline s':>11}")
    for mode, runs in stage_times.items():
        stage = statistics.median(s for s, _ in runs)
        whole = statistics.median(w for _, w in runs)
        print(f"{mode:<22} {stage:>8.2f} {n / nominal / stage:>12.2f} {whole:>11.2f}")


if __name__ == "__main__":
    main()
