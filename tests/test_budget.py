"""A run's budget on chat requests: no request is sent once it is spent, the items left are
dropped as `<role>_over_budget` and balance the funnel, the overshoot is only what was in flight,
and a rerun with a larger budget sends only the missing requests."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from seededserver import SeededServer
from test_student_passk import NAMES, flags, seeded_answer, student_recipe  # noqa: F401

from groundforge.annotators.teacher.budget import Budget, BudgetLimits
from groundforge.cli import main
from groundforge.outputs.console import budget_line
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import RecipeError, parse_recipe, with_budget

K = 2
TOTAL = K * len(NAMES)


def budgeted(recipe, **limits):
    data = recipe.model_dump(mode="json")
    data["budget"] = limits
    return parse_recipe(data, Path(recipe.source.path))


def stage(manifest, name):
    return next(s for s in manifest["stages"] if s["stage"] == name)


@pytest.fixture
def server():
    with SeededServer(seeded_answer, usage=lambda body: (100, 10)) as s:
        yield s


def test_request_budget_stops_sending_and_a_larger_one_resumes(flags, tmp_path, server):  # noqa: F811
    recipe = budgeted(student_recipe(flags, server.base_url, K), max_requests=10)
    out = tmp_path / "out"
    first = run_recipe(recipe, str(out)).manifest

    assert len(server.bodies) == 10
    assert first["budget"]["spent"]["requests"] == 10
    assert first["budget"]["refused"] == TOTAL - 10
    assert first["budget"]["overshoot"] == {"requests": 0}
    student = stage(first, "student")
    assert student["in"] == len(NAMES)
    dropped = student["dropped"]["student_over_budget"]
    assert student["kept"] + dropped == student["in"] and student["kept"] >= 10 // K - 1
    assert first["models"]["student"]["sent"] == 10
    assert first["models"]["student"]["refused"] == TOTAL - 10
    rejections = pq.read_table(out / "rejections.parquet").to_pylist()
    assert sum(r["reason"] == "student_over_budget" for r in rejections) == dropped
    assert "10 of 10" in budget_line(first["budget"])

    # The same recipe with a larger budget from the command line: only what is missing is sent.
    server.reset()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = CliRunner().invoke(
        main, ["run", str(path), "--out", str(out), "--budget", "max_requests=40"]
    )
    assert result.exit_code == 0, result.output
    assert len(server.bodies) == TOTAL - 10
    again = json.loads((out / "manifest.json").read_text())
    assert again["budget"]["limits"] == {"max_requests": 40}
    assert again["budget"]["spent"]["requests"] == TOTAL - 10 and again["budget"]["refused"] == 0
    assert stage(again, "student")["kept"] == len(NAMES)
    assert again["models"]["student"]["cached"] == 10
    assert again["recipe_hash"] == first["recipe_hash"]


def test_token_budget_overshoots_by_the_requests_in_flight(flags, tmp_path):  # noqa: F811
    # Four requests are let through at once (the first batch) and held until all four are in
    # flight; only then does the first reply add its tokens.
    gate = threading.Barrier(4, timeout=30)

    def answer(body):
        gate.wait()
        return seeded_answer(body)

    with SeededServer(answer, usage=lambda body: (100, 10)) as server:
        recipe = student_recipe(flags, server.base_url, K)
        data = recipe.model_dump(mode="json")
        data["student"].update(batch_size=2, max_concurrency=4)
        data["budget"] = {"max_tokens": 300}
        manifest = run_recipe(parse_recipe(data, tmp_path), str(tmp_path / "out")).manifest
        received = len(server.bodies)
    assert received == 4
    budget = manifest["budget"]
    assert budget["spent"] == {"requests": 4, "tokens": 440, "cost": 0}
    assert budget["overshoot"] == {"tokens": 140} and budget["reached"]
    assert budget["refused"] == TOTAL - 4
    student = stage(manifest, "student")
    assert student["kept"] == 2 and student["dropped"] == {"student_over_budget": len(NAMES) - 2}


def _reserve_many(folder: str, n: int, results) -> None:
    budget = Budget(folder, BudgetLimits(max_requests=60))
    results.put(sum(budget.reserve() for _ in range(n)))


def test_the_ledger_is_exact_across_processes(tmp_path):
    results = multiprocessing.get_context("spawn").Queue()
    workers = [
        multiprocessing.get_context("spawn").Process(
            target=_reserve_many, args=(str(tmp_path), 50, results)
        )
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    allowed = sum(results.get(timeout=10) for _ in workers)
    assert allowed == 60
    summary = Budget(str(tmp_path), BudgetLimits(max_requests=60)).summary()
    assert summary["spent"]["requests"] == 60 and summary["refused"] == 140


def test_bad_budgets_are_named(flags, tmp_path):  # noqa: F811
    recipe = student_recipe(flags, "http://127.0.0.1:1/v1", K)
    with pytest.raises(RecipeError, match="NAME=VALUE"):
        with_budget(recipe, ["max_requests"])
    with pytest.raises(RecipeError, match="max_request"):
        with_budget(recipe, ["max_request=4"])
    with pytest.raises(RecipeError, match="token prices"):
        with_budget(recipe, ["max_cost=1.5"])
    with pytest.raises(RecipeError, match="at least one"):
        budgeted(recipe)
    assert with_budget(recipe, ["max_tokens=500"]).budget.max_tokens == 500
