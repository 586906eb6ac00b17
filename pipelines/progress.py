"""Live stage counts while a local pipeline runs.

Beam's counters can be read only once a run has finished, so each stage instance also keeps its
own counts and writes them, at most every ``interval`` seconds and at the end of every bundle, as
one small JSON file in a folder the driver watches (:class:`ProgressWatcher`). Workers share the
driver's disk only on local runners (the DirectRunner in any mode, the portable runner with a
LOOPBACK environment), so that is where progress is shown. The numbers are a live view: a bundle
the runner retries counts twice here, while the funnel in the manifest comes from Beam's
committed counters.
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
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            return  # the folder is gone: the run is over and nobody watches any more
        self._written = time.monotonic()


def read_progress(folder: str, stages: list[str]) -> list[dict[str, Any]]:
    """The counts of every stage (in ``stages`` order), summed over the files in ``folder``."""
    sums = {s: {"stage": s, "in": 0, "kept": 0, "dropped": Counter()} for s in stages}
    for path in Path(folder).glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while being read; the next poll sees it
        row = sums.get(data.get("stage"))
        if row is None:
            continue
        row["in"] += data["in"]
        row["kept"] += data["kept"]
        row["dropped"].update(data["dropped"])
    return [{**row, "dropped": dict(row["dropped"])} for row in sums.values()]


class ProgressWatcher:
    """Polls a progress folder in a thread and hands the summed counts to ``callback``."""

    def __init__(
        self,
        folder: str,
        stages: list[str],
        callback: Callable[[list[dict[str, Any]]], None],
        interval: float = 0.5,
    ):
        self.folder, self.stages, self.callback, self.interval = folder, stages, callback, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.callback(read_progress(self.folder, self.stages))

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.callback(read_progress(self.folder, self.stages))
