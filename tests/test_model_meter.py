"""Model stages watched and paid for: requests reported one by one as they finish, live rates and
estimates, tokens and cost in the manifest, and a rerun from the reply cache that costs nothing."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest
from seededserver import SeededServer
from test_student_passk import NAMES, K, flags, seeded_answer, student_recipe  # noqa: F401

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.client import OpenAIBackend
from groundforge.annotators.teacher.types import (
    EndpointSettings,
    Sampling,
    TeacherReply,
    TeacherRequest,
)
from groundforge.outputs.card import render_card
from groundforge.outputs.console import cost_line, live_models_table, models_table
from groundforge.outputs.cost import cost_section
from groundforge.pipelines.progress import ModelProgress, read_progress
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import PriceConfig, RecipeError, parse_recipe

PROMPT_PER_1K = 0.5
COMPLETION_PER_1K = 2.0


def usage(body: dict) -> tuple[int, int]:
    """Token counts that differ from request to request (but are the same on every run)."""
    return 100 + body["seed"] % 13, 7 + body["seed"] % 5


def priced(recipe, price: dict):
    data = recipe.model_dump(mode="json")
    data["student"]["price"] = price
    return parse_recipe(data, Path(recipe.source.path))


@pytest.fixture
def server():
    with SeededServer(seeded_answer, usage=usage) as s:
        yield s


def test_tokens_and_cost_per_stage_in_total_and_per_sample(flags, tmp_path, server):  # noqa: F811
    price = {"prompt_per_1k": PROMPT_PER_1K, "completion_per_1k": COMPLETION_PER_1K}
    recipe = priced(student_recipe(flags, server.base_url, K), price)
    out = tmp_path / "out"
    updates: list = []
    first = run_recipe(recipe, str(out), progress=updates.append)

    prompt = sum(usage(b)[0] for b in server.bodies)
    completion = sum(usage(b)[1] for b in server.bodies)
    assert len(server.bodies) == K * len(NAMES)
    manifest = json.loads((out / "manifest.json").read_text())
    student = manifest["models"]["student"]
    n = K * len(NAMES)
    assert (student["requests"], student["cached"], student["sent"], student["answered"]) == (
        n,
        0,
        n,
        n,
    )
    assert student["failed"] == {}
    assert (student["prompt_tokens"], student["completion_tokens"]) == (prompt, completion)
    assert student["seconds"] > 0 and student["requests_per_second"] > 0
    cost = prompt / 1000 * PROMPT_PER_1K + completion / 1000 * COMPLETION_PER_1K
    assert student["cost"] == pytest.approx(cost)
    assert manifest["cost"]["stages"]["student"]["cost"] == pytest.approx(cost)
    assert manifest["cost"]["total"] == pytest.approx(cost)
    samples = manifest["samples"]
    assert samples == first.manifest["samples"] > 0
    assert manifest["cost"]["per_sample"] == pytest.approx(cost / samples, abs=1e-6)

    # The live view ended at the same numbers, one request at a time.
    live = {row["stage"]: row for row in updates[-1]}["student"]["model"]
    assert (live["sent"], live["answered"], live["failed"]) == (K * len(NAMES), K * len(NAMES), 0)
    assert (live["prompt_tokens"], live["completion_tokens"]) == (prompt, completion)
    # The student is fed by the stage before it, whose kept items it will get.
    assert live["expected"] == K * len(NAMES) and live["eta"] == 0

    # Console, report and card show the same totals.
    assert f"{cost:.4f}" in render_card(manifest)
    report = (out / "report.html").read_text()
    assert f"{cost:.4f}" in report and str(prompt) in report
    assert f"{cost:.4f}" in cost_line(manifest["cost"])

    server.reset()
    again = run_recipe(recipe, str(out))
    assert server.bodies == []
    student = again.manifest["models"]["student"]
    assert (student["cached"], student["sent"]) == (K * len(NAMES), 0)
    assert (student["prompt_tokens"], student["completion_tokens"], student["seconds"]) == (0, 0, 0)
    assert again.manifest["cost"]["total"] == 0 and again.manifest["cost"]["per_sample"] == 0


def test_gpu_hour_price_charges_the_busy_seconds(flags, tmp_path, server):  # noqa: F811
    recipe = priced(student_recipe(flags, server.base_url, 2), {"gpu_hour": 3.6})
    result = run_recipe(recipe, str(tmp_path / "out"))
    student = result.manifest["models"]["student"]
    assert student["seconds"] > 0
    assert student["cost"] == pytest.approx(student["seconds"] / 3600 * 3.6, abs=1e-6)
    server.reset()
    again = run_recipe(recipe, str(tmp_path / "out"))
    assert again.manifest["models"]["student"]["cost"] == 0


def test_a_run_without_prices_has_no_cost(flags, tmp_path, server):  # noqa: F811
    result = run_recipe(student_recipe(flags, server.base_url, 2), str(tmp_path / "out"))
    assert result.manifest["models"]["student"]["cost"] is None
    assert result.manifest["cost"]["total"] is None
    assert cost_line(result.manifest["cost"]) is None
    assert result.manifest["models"]["student"]["prompt_tokens"] == sum(
        usage(b)[0] for b in server.bodies
    )


class Recorder:
    """A meter that remembers what it was told, in order."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def sent(self, n: int = 1) -> None:
        with self.lock:
            self.events.append(("sent", n))

    def reply(self, reply: TeacherReply) -> None:
        with self.lock:
            self.events.append(("reply", reply))

    def replies(self) -> list[TeacherReply]:
        with self.lock:
            return [r for kind, r in self.events if kind == "reply"]


def wait_for(condition, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_each_reply_is_reported_before_its_batch_returns(tmp_path):
    """One request is held by the server; the other replies reach the meter while the batch
    still waits for it, and a cache hit is reported without being sent."""
    release = threading.Event()

    def answer(body):
        text = body["messages"][-1]["content"][-1]["text"]
        if text == "slow":
            release.wait(60)
        return f"answer to {text}"

    cache = ReplyCache(tmp_path / "cache")
    with SeededServer(answer, usage=lambda body: (11, 3)) as server:
        settings = EndpointSettings(
            server.base_url, "m", sampling=Sampling(max_tokens=8), max_concurrency=8
        )
        backend = OpenAIBackend(settings, cache=cache)
        backend.answer([TeacherRequest("c", "cached one")])
        server.reset()
        requests = [TeacherRequest(f"r{i}", t) for i, t in enumerate(["a", "b", "slow", "d"])]
        requests.append(TeacherRequest("c", "cached one"))
        meter = Recorder()
        done: list = []
        worker = threading.Thread(target=lambda: done.append(backend.answer(requests, meter)))
        worker.start()
        try:
            wait_for(lambda: len(meter.replies()) == 4, "four replies")
            assert not done, "the batch returned before its slow request was answered"
            got = {r.item_id: r for r in meter.replies()}
            assert set(got) == {"r0", "r1", "r3", "c"} and got["c"].cached
            assert sum(n for kind, n in meter.events if kind == "sent") == 4
        finally:
            release.set()
            worker.join()
        backend.close()
    assert [r.item_id for r in done[0]] == ["r0", "r1", "r2", "r3", "c"]
    assert len(meter.replies()) == 5 and len(server.bodies) == 4
    assert all(r.prompt_tokens == 11 for r in meter.replies() if not r.cached)


def test_model_progress_files_sum_and_estimate(tmp_path):
    a = ModelProgress(str(tmp_path), "teacher")
    a.jobs(4)
    a.sent(4)
    a.reply(TeacherReply("x", text="ok", prompt_tokens=10, completion_tokens=2))
    a.reply(TeacherReply("y", error="timeout", attempts=2))
    a.flush()
    # A copy in another worker starts from zero, in a file of its own.
    b = pickle.loads(pickle.dumps(a))
    assert b.counts["sent"] == 0 and b.path != a.path
    b.jobs(1)
    b.reply(TeacherReply("z", text="ok", cached=True))
    b.flush()
    (tmp_path / "sample-x.json").write_text(
        json.dumps({"stage": "sample", "in": 10, "kept": 8, "dropped": {"small": 2}})
    )
    rows = read_progress(str(tmp_path), ["sample", "teacher"], feeders={"teacher": "sample"})
    assert "model" not in rows[0]
    model = rows[1]["model"]
    assert {k: model[k] for k in ("jobs", "sent", "answered", "failed", "cached")} == {
        "jobs": 5,
        "sent": 5,
        "answered": 2,
        "failed": 1,
        "cached": 1,
    }
    assert (model["prompt_tokens"], model["completion_tokens"]) == (10, 2)
    # 8 items will come, one request each; 3 of them are done.
    assert model["expected"] == 8
    assert model["eta"] == pytest.approx(5 / model["rate"])
    table = live_models_table(rows)
    assert table is not None and table.row_count == 1
    assert live_models_table(rows[:1]) is None


def test_cost_section_prices_only_what_has_a_price():
    counts = {
        "teacher": {
            "prompt_tokens": 2000,
            "completion_tokens": 500,
            "seconds": 7.2,
            "sent": 4,
            "cached": 1,
        },
        "detect": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "seconds": 36.0,
            "sent": 9,
            "cached": 0,
        },
        "embed": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "seconds": 1.0,
            "sent": 9,
            "cached": 0,
        },
    }
    prices = {
        "teacher": PriceConfig(prompt_per_1k=1.0, completion_per_1k=4.0),
        "detect": PriceConfig(gpu_hour=2.0),
    }
    cost = cost_section(counts, prices, samples=4)
    assert cost["stages"]["teacher"]["cost"] == pytest.approx(2.0 + 2.0)
    assert cost["stages"]["detect"]["cost"] == pytest.approx(0.02)
    assert cost["stages"]["embed"]["cost"] is None
    assert cost["total"] == pytest.approx(4.02) and cost["per_sample"] == pytest.approx(1.005)
    assert cost_section(counts, prices, samples=0)["per_sample"] is None
    table = models_table(
        {
            k: {
                **v,
                "requests": v["sent"],
                "answered": v["sent"],
                "attempts": 1,
                "failed": {},
                "cost": cost["stages"][k]["cost"],
            }
            for k, v in counts.items()
        }
    )
    assert table.row_count == 3


@pytest.mark.parametrize(
    ("section", "price", "message"),
    [
        ("teacher", {"prompt_per_1k": 1.0}, "give prompt_per_1k and completion_per_1k"),
        ("teacher", {"gpu_hour": 1.0, "prompt_per_1k": 1.0}, "not both"),
        ("teacher", {"prompt_per_1k": -1, "completion_per_1k": 1}, "greater than or equal"),
        ("teacher", {"per_token": 1}, "per_token"),
        ("embed", {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}, "give gpu_hour"),
    ],
)
def test_bad_prices_are_named(tmp_path, section, price, message):
    recipe = {
        "name": "r",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(tmp_path)},
        "teacher": {"model": "m", "base_url": "http://127.0.0.1:1/v1"},
    }
    target = recipe.setdefault(section, {})
    target["price"] = price
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe, tmp_path)
    assert f"{section}" in str(err.value) and message in str(err.value)
