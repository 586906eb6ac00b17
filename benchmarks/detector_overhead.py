"""What does Beam cost the detection stage? Throughput inside a pipeline vs a plain loop.

Both arms run the same :class:`GroundingDinoHandler` on the same images with the same torch
thread count and include loading the model:

- loop: ``load_model`` once, then ``run_inference`` over batches of ``--batch-size``;
- pipeline: ``beam.Create(records) | RunInference(handler) | Count`` on the DirectRunner.

Each arm runs ``--repeat`` times, interleaved; the medians are reported.

Without ``--model`` a tiny random Grounding DINO is built into a temporary folder. Run::

    python benchmarks/detector_overhead.py --images 400 --runner-mode in_process
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from groundforge.annotators.detector import GroundingDinoHandler
from groundforge.schemas.records import ImageRecord, sha256_hex

DOMAINS = {"aircraft": ["airplane"], "flag": ["flag"], "pets": ["dog", "cat"]}


def make_records(n: int, seed: int = 0) -> list[ImageRecord]:
    """``n`` PNG images of random shapes on a plain background, about 320 x 240, mixed domains."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    domains = sorted(DOMAINS)
    records = []
    for i in range(n):
        width, height = rng.choice([(320, 240), (300, 220), (240, 320), (320, 200)])
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x1, y1 = rng.randrange(width - 20), rng.randrange(height - 20)
            x2, y2 = rng.randint(x1 + 10, width), rng.randint(y1 + 10, height)
            fill = tuple(rng.randrange(256) for _ in range(3))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x1, y1, x2, y2), fill=fill)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        data = buf.getvalue()
        records.append(ImageRecord(sha256_hex(data), data, width, height, domains[i % 3]))
    return records


def run_loop(handler: GroundingDinoHandler, records: list[ImageRecord]) -> tuple[float, int]:
    """Seconds for load + inference in one process, and the number of results."""
    start = time.perf_counter()
    model = handler.load_model()
    count = 0
    for i in range(0, len(records), handler.batch_size):
        count += len(handler.run_inference(records[i : i + handler.batch_size], model))
    return time.perf_counter() - start, count


def run_pipeline(
    handler: GroundingDinoHandler, records: list[ImageRecord], mode: str, workers: int
) -> tuple[float, int]:
    """Seconds for the whole pipeline run, and the count it wrote."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    running_mode = "in_memory" if mode == "in_process" else "multi_processing"
    options = PipelineOptions(
        [],
        runner="DirectRunner",
        direct_running_mode=running_mode,
        direct_num_workers=workers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "count")
        start = time.perf_counter()
        with beam.Pipeline(options=options) as p:
            _ = (
                p
                | beam.Create(records)
                | RunInference(handler)
                | beam.combiners.Count.Globally()
                | beam.io.WriteToText(out, shard_name_template="")
            )
        elapsed = time.perf_counter() - start
        count = int(Path(out).read_text().strip())
    return elapsed, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--runner-mode", choices=["in_process", "multi_processing"], default="in_process"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes in multi_processing mode",
    )
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch threads per process, in both arms"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per arm; medians reported")
    parser.add_argument("--model", help="a Grounding DINO folder or hub id (default: tiny)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            import tinymodels

            model = str(tinymodels.build_tiny_detector(Path(tmp) / "tiny-detector"))
        handler = GroundingDinoHandler(
            model, labels=DOMAINS, batch_size=args.batch_size, num_threads=args.num_threads
        )
        records = make_records(args.images)
        # Warm imports and file caches so neither arm pays them alone.
        handler.run_inference(records[:1], handler.load_model())

        workers = args.workers if args.runner_mode == "multi_processing" else 1
        # Interleave the arms so that drift in machine load hits both alike.
        loop_times, pipe_times = [], []
        for _ in range(args.repeat):
            loop_s, loop_n = run_loop(handler, records)
            pipe_s, pipe_n = run_pipeline(handler, records, args.runner_mode, workers)
            if loop_n != len(records) or pipe_n != len(records):
                raise SystemExit(
                    f"lost results: loop {loop_n}, pipeline {pipe_n}, sent {len(records)}"
                )
            loop_times.append(loop_s)
            pipe_times.append(pipe_s)

    loop_s, pipe_s = statistics.median(loop_times), statistics.median(pipe_times)
    loop_rate, pipe_rate = len(records) / loop_s, len(records) / pipe_s
    print(
        f"detector overhead: {len(records)} images, batch {args.batch_size}, "
        f"{args.runner_mode} ({workers} worker(s)), {args.num_threads} torch thread(s), "
        f"median of {args.repeat}"
    )
    print(f"  loop:     {loop_s:7.2f} s  {loop_rate:8.1f} images/s")
    print(f"  pipeline: {pipe_s:7.2f} s  {pipe_rate:8.1f} images/s")
    print(f"  ratio pipeline/loop: {pipe_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
