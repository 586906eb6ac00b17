"""Live stage counts while a local pipeline runs.

Beam's counters can be read only once a run has finished, so each stage instance also keeps its
own counts and writes them, at most every ``interval`` seconds and at the end of every bundle, as
one small JSON file in a folder the driver watches (:class:`ProgressWatcher`). Workers share the
driver's disk only on local runners (the DirectRunner in any mode, the portable runner with a
LOOPBACK environment), so that is where progress is shown. The numbers are a live view: a bundle
the runner retries counts twice here, while the funnel in the manifest comes from Beam's
committed counters.

A model stage also writes its requests (:class:`ModelProgress`): sent, answered, failed, answered
from the cache, and tokens, counted as each request finishes (a chat backend reports every reply
the moment it arrives, not when its batch is complete), so a slow teacher shows movement, a rate
and an estimated time left long before its first batch returns.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

LOCAL_RUNNERS = {"DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner"}


def shows_progress(options: PipelineOptions) -> bool:
    """Whether the runner's workers write to this machine's disk."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    if name in LOCAL_RUNNERS:
        return True
    environment = options.view_as(PortableOptions).environment_type
    return name == "PortableRunner" and (environment or "").upper() == "LOOPBACK"


def _write_json(path: Path, data: dict[str, Any]) -> bool:
    """Replace ``path`` with ``data`` all at once; False when the folder is gone (the run is over
    and nobody watches any more)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


class StageProgress:
    """One stage instance's counts, written to ``folder/<stage>-<unique>.json`` now and then."""

    def __init__(self, folder: str, stage: str, interval: float = 0.5):
        self.path = Path(folder) / f"{stage}-{uuid.uuid4().hex}.json"
        self.stage = stage
        self.interval = interval
        self.total = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self._written = 0.0

    def count(self, reason: str | None) -> None:
        """One item in: kept when ``reason`` is None, else dropped for ``reason``."""
        self.total += 1
        if reason is None:
            self.kept += 1
        else:
            self.dropped[reason] += 1
        if time.monotonic() - self._written >= self.interval:
            self.flush()

    def flush(self) -> None:
        if not self.total:
            return
        data = {"stage": self.stage, "in": self.total, "kept": self.kept}
        data["dropped"] = dict(self.dropped)
        if _write_json(self.path, data):
            self._written = time.monotonic()


MODEL_COUNTS = (
    "jobs",
    "sent",
    "answered",
    "failed",
    "cached",
    "refused",
    "prompt_tokens",
    "completion_tokens",
)


class ModelProgress:
    """The requests of one model stage instance, written to ``folder/model-<stage>-<unique>.json``.

    Thread-safe (a chat backend reports from its own event loop thread) and picklable: a copy
    unpickled in a worker starts from zero under a file name of its own. ``sent`` counts requests
    handed to the model, ``answered`` and ``failed`` those that came back (``cached`` of the
    answered ones came from the reply cache, without a request), ``refused`` those the run's
    budget did not allow (never sent); ``jobs`` counts the stage's
    items, which may each make several requests (a student's pass@k).
    """

    def __init__(self, folder: str, stage: str, interval: float = 0.5):
        self.folder, self.stage, self.interval = folder, stage, interval
        self._reset()

    def _reset(self) -> None:
        self.path = Path(self.folder) / f"model-{self.stage}-{uuid.uuid4().hex}.json"
        self.counts = dict.fromkeys(MODEL_COUNTS, 0)
        self._started: float | None = None
        self._written = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "stage": self.stage, "interval": self.interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def jobs(self, n: int) -> None:
        """``n`` items reached the model."""
        self._add(jobs=n)

    def sent(self, n: int = 1) -> None:
        """``n`` requests went to the model."""
        self._add(sent=n)

    def answered(
        self, n: int = 1, prompt_tokens: int = 0, completion_tokens: int = 0, failed: bool = False
    ) -> None:
        """``n`` requests came back (``failed``: without a usable answer), with their tokens."""
        self._add(
            **{"failed" if failed else "answered": n},
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def reply(self, reply) -> None:
        """A chat reply came back (a cached one also counts as sent and answered)."""
        if reply.cached:
            self._add(sent=1, answered=1, cached=1)
            return
        if reply.error == "over_budget":
            self._add(refused=1)
            return
        self.answered(
            prompt_tokens=reply.prompt_tokens or 0,
            completion_tokens=reply.completion_tokens or 0,
            failed=not reply.ok,
        )

    def _add(self, **counts: int) -> None:
        with self._lock:
            if self._started is None:
                self._started = time.time()
            for name, n in counts.items():
                self.counts[name] += n
            due = time.monotonic() - self._written >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._started is None:
                return
            data = {"stage": self.stage, "model": dict(self.counts), "started": self._started}
            data["updated"] = time.time()
            if _write_json(self.path, data):
                self._written = time.monotonic()


def model_estimate(model: dict[str, Any], expected_jobs: int | None, now: float) -> dict[str, Any]:
    """Rate (requests finished per second since the first was sent) and, when the number of
    items the stage will get is known or estimated (``expected_jobs``), the requests expected
    and the seconds left at the present rate."""
    done = model["answered"] + model["failed"] + model["refused"]
    elapsed = max(now - model["started"], 1e-6)
    rate = done / elapsed
    out = {"rate": rate, "expected": None, "eta": None}
    asked = model["sent"] + model["refused"]
    if expected_jobs is not None and model["jobs"]:
        expected = max(round(expected_jobs * asked / model["jobs"]), asked)
        out["expected"] = expected
        if rate > 0:
            out["eta"] = max(expected - done, 0) / rate
    return out


def read_progress(
    folder: str, stages: list[str], feeders: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The counts of every stage (in ``stages`` order), summed over the files in ``folder``.

    A stage fed by a model also gets ``model``: its request counts (:data:`MODEL_COUNTS`) with
    ``rate``, ``expected`` and ``eta`` (:func:`model_estimate`); the items it expects are the
    ``kept`` of the stage that feeds it (``feeders``), an estimate while that stage still runs.
    """
    sums = {s: {"stage": s, "in": 0, "kept": 0, "dropped": Counter()} for s in stages}
    models: dict[str, dict[str, Any]] = {}
    for path in Path(folder).glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while being read; the next poll sees it
        stage = data.get("stage")
        if stage not in sums:
            continue
        if "model" in data:
            model = models.setdefault(stage, {**dict.fromkeys(MODEL_COUNTS, 0), "started": None})
            for name in MODEL_COUNTS:
                model[name] += data["model"].get(name, 0)
            if model["started"] is None or data["started"] < model["started"]:
                model["started"] = data["started"]
            continue
        row = sums[stage]
        row["in"] += data["in"]
        row["kept"] += data["kept"]
        row["dropped"].update(data["dropped"])
    now = time.time()
    for stage, model in models.items():
        feeder = (feeders or {}).get(stage)
        expected = sums[feeder]["kept"] if feeder in sums else None
        sums[stage]["model"] = {**model, **model_estimate(model, expected, now)}
    return [{**row, "dropped": dict(row["dropped"])} for row in sums.values()]


class ProgressWatcher:
    """Polls a progress folder in a thread and hands the summed counts to ``callback``."""

    def __init__(
        self,
        folder: str,
        stages: list[str],
        callback: Callable[[list[dict[str, Any]]], None],
        interval: float = 0.5,
        feeders: dict[str, str] | None = None,
    ):
        self.folder, self.stages, self.callback, self.interval = folder, stages, callback, interval
        self.feeders = feeders
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.callback(read_progress(self.folder, self.stages, self.feeders))

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.callback(read_progress(self.folder, self.stages, self.feeders))
