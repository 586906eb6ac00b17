"""The KVG pipeline with chat models: a real `transformers serve` teacher behind a fault proxy,
the grounder, the student's pass@k, the cache across reruns and a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.ml.inference.base import PredictionResult
from click.testing import CliRunner
from faultproxy import FaultProxy
from samples import make_sample

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.handler import ChatJob
from groundforge.annotators.teacher.jobs import reply_verdict, student_job
from groundforge.annotators.teacher.types import TeacherReply
from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.filters.difficulty import SplitRule
from groundforge.filters.rationale import RationaleRules
from groundforge.outputs.shards import read_samples
from groundforge.pipelines.kvg import attach_difficulty, attach_rationale
from groundforge.pipelines.run import run_recipe
from groundforge.recipe import parse_recipe
from groundforge.schemas.codecs import get_codec

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = [
    "africa/chad.png",
    "europe/romania.png",
    "europe/andorra.png",
    "africa/mali.png",
    "africa/niger.png",
    "europe/italy/italy.png",
]
KEY_ENV = "GROUNDFORGE_TEST_KEY"
SECRET = "sk-test-7f3a9c1e-do-not-leak"


@pytest.fixture
def flags(tmp_path) -> Path:
    folder = tmp_path / "images"
    for name in NAMES:
        target = folder / name.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FLAGS / name, target)
    return folder


def model_section(base_url: str, model: str, **extra) -> dict:
    return {
        "model": model,
        "base_url": base_url,
        "codec": "qwen25vl",
        "max_tokens": 12,
        "max_retries": 1,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "timeout": 20,
        "max_concurrency": 4,
        "batch_size": 8,
        **extra,
    }


def recipe_dict(folder: Path, **sections) -> dict:
    return {
        "name": "teacher-test",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(folder), "entity_from": "stem"},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        **sections,
    }


def every_file_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_teacher_stage_through_a_faulty_endpoint(flags, tmp_path, teacher_server, monkeypatch):
    base_url, model = teacher_server
    monkeypatch.setenv(KEY_ENV, SECRET)
    # The first two requests are refused outright (400: never retried); the rest reach the model.
    rule = lambda number, body: "bad_request" if number <= 2 else None  # noqa: E731
    with FaultProxy(base_url, rule=rule) as proxy:
        recipe = recipe_dict(
            flags, teacher=model_section(proxy.base_url, model, api_key_env=KEY_ENV)
        )
        path = tmp_path / "teacher.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
        # The tiny model's replies are no rationales: the run is written, and exits 1.
        assert result.exit_code == 1 and "no sample was kept" in result.output, result.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 0
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert list(stages)[-3:] == ["teacher", "rationale", "output"]
    n = stages["sample"]["kept"]
    assert n == len(NAMES)
    teacher = stages["teacher"]
    assert teacher["in"] == n and teacher["dropped"] == {"teacher_bad_request": 2}
    assert teacher["kept"] == stages["rationale"]["in"] == n - 2
    # A random tiny model never writes <think>...</think><answer>...</answer>.
    assert stages["rationale"]["dropped"] == {"rationale_format": n - 2}
    teacher_counts = manifest["models"]["teacher"]
    assert {k: teacher_counts[k] for k in ("requests", "cached", "sent", "answered")} == {
        "requests": n,
        "cached": 0,
        "sent": n,
        "answered": n - 2,
    }
    assert teacher_counts["attempts"] == n and teacher_counts["failed"] == {"bad_request": 2}
    # The tokens the real server counted for the requests it answered.
    assert teacher_counts["prompt_tokens"] > 0 and teacher_counts["completion_tokens"] > 0
    assert teacher_counts["cost"] is None and manifest["cost"]["total"] is None
    assert proxy.total == n
    # The image reached the model: its tokens are in the prompt count the server reports.
    sent = [s for s in proxy.requests if s.fault is None]
    assert all(s.json["messages"][-1]["content"][0]["type"] == "image_url" for s in sent)
    assert all(s.headers["authorization"] == f"Bearer {SECRET}" for s in proxy.requests)
    assert SECRET not in every_file_text(out)
    assert SECRET not in result.output
    rejections = pq.read_table(out / "rejections.parquet").to_pylist()
    by_reason = sorted(r["reason"] for r in rejections if r["stage"] == "teacher")
    assert by_reason == ["teacher_bad_request"] * 2


def student_recipe(flags: Path, base_url: str, model: str, **extra) -> dict:
    student = model_section(base_url, model, k=2, max_tokens=8, **extra)
    return recipe_dict(flags, student=student)


def shard_digests(out: Path) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["path"], s["sha256"]) for s in manifest["shards"]]


def test_rerun_sends_nothing_and_writes_identical_shards(flags, tmp_path, teacher_server):
    base_url, model = teacher_server
    out = tmp_path / "out"
    with FaultProxy(base_url) as proxy:
        recipe = parse_recipe(student_recipe(flags, proxy.base_url, model), tmp_path)
        first = run_recipe(recipe, str(out))
        assert proxy.total == len(NAMES) * 2
        digests = shard_digests(out)
        proxy.reset()
        second = run_recipe(recipe, str(out))
        assert proxy.total == 0
    assert shard_digests(out) == digests
    assert second.manifest["models"]["student"]["cached"] == len(NAMES) * 2
    assert second.manifest["models"]["student"]["sent"] == 0
    assert first.manifest["samples"] == second.manifest["samples"] == len(NAMES)
    for s in read_samples(str(out / "shards")):
        assert s.student_k == 2 and s.student_correct is not None


def test_killed_run_resumes_with_only_the_missing_requests(flags, tmp_path, teacher_server):
    base_url, model = teacher_server
    out = tmp_path / "out"
    total = len(NAMES) * 2
    with FaultProxy(base_url, rule=lambda n, body: "slow", slow=0.4) as proxy:
        recipe = student_recipe(flags, proxy.base_url, model, max_concurrency=1)
        path = tmp_path / "student.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "groundforge.cli", "run", str(path), "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        cache = ReplyCache(out / "cache")
        deadline = time.monotonic() + 120
        while len(cache) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(cache)
        assert 3 <= done < total, "the run was not killed mid-way"
        assert not (out / "manifest.json").exists()

        proxy.reset(rule=None)
        result = run_recipe(parse_recipe(recipe, tmp_path), str(out))
        assert proxy.total == total - done
    assert result.manifest["models"]["student"]["cached"] == done
    assert result.manifest["samples"] == len(NAMES)


def test_grounder_checks_the_detector(flags, tmp_path, teacher_server, tiny_detector_dir):
    base_url, model = teacher_server
    detector = {
        "model": str(tiny_detector_dir),
        "labels": {"flag": ["flag"]},
        "shortest_edge": 240,
        "longest_edge": 320,
    }
    recipe = recipe_dict(
        flags,
        boxes={"method": "detector", "detector": detector},
        grounder=model_section(base_url, model, max_tokens=16),
    )
    with FaultProxy(base_url) as proxy:
        recipe["grounder"]["base_url"] = proxy.base_url
        result = run_recipe(parse_recipe(recipe, tmp_path), str(tmp_path / "out"))
    stages = {s.stage: s for s in result.funnel}
    assert [s.stage for s in result.funnel][:7] == [
        "read",
        "image",
        "reference",
        "dedup",
        "detect",
        "grounder",
        "consistency",
    ]
    assert stages["grounder"].total == len(NAMES) == proxy.total
    assert all(s.balanced for s in result.funnel)
    # Random answers hold no box, or one the confident candidates do not match.
    dropped = stages["consistency"].dropped
    assert set(dropped) <= {"grounder_unparsable", "grounder_disagrees"}
    assert stages["consistency"].kept + sum(dropped.values()) == len(NAMES)


def test_reply_verdicts_and_attach_functions():
    sample = make_sample(1)
    box = sample.gt_boxes[0]
    codec = get_codec("pixel")
    answer = codec.render(box, sample.width, sample.height)
    good = (
        f"<think>The flag of {sample.target} has the stripes I expect here.</think>"
        f"<answer>{answer}</answer>"
    )
    kept = attach_rationale((sample, (good,)), codec, RationaleRules(min_chars=10), "teacher-m")
    assert kept.keep and kept.value.teacher_model == "teacher-m"
    assert kept.value.rationale.startswith("The flag of") and kept.value.teacher_iou == 1.0
    refused = f"<think>No name here at all, only stripes.</think><answer>{answer}</answer>"
    dropped = attach_rationale((sample, (refused,)), codec, RationaleRules(min_chars=10), "t")
    assert dropped.reason == "rationale_no_target" and dropped.metrics["reply"] == refused

    job = student_job(sample, 3)
    assert [r.sample_index for r in job.requests] == [0, 1, 2]
    assert len({r.item_id for r in job.requests}) == 3
    replies = (
        TeacherReply("a", text=answer),
        TeacherReply("b", error="timeout", attempts=3),
        TeacherReply("c", text="no box"),
    )
    dropped = reply_verdict(PredictionResult(job, replies), "student")
    assert (dropped.reason, dropped.metrics["attempts"]) == ("student_timeout", 3)
    ok = (
        TeacherReply("a", text=answer),
        TeacherReply("b", text="[0, 0, 1, 1]"),
        TeacherReply("c", text="no box"),
    )
    pair = reply_verdict(PredictionResult(job, ok), "student").value
    assert pair[0] is sample and pair[1] == (answer, "[0, 0, 1, 1]", "no box")
    graded = attach_difficulty(pair, codec, 3, 0.5, SplitRule())
    assert (graded.value.split, graded.value.student_correct) == ("grpo", 1)
    val = attach_difficulty((make_sample(2, "val"), pair[1]), codec, 3, 0.5, SplitRule())
    assert val.value.split == "val"
    none = attach_difficulty(
        (sample, ("x", "y", "z")), codec, 3, 0.5, SplitRule(none_correct="drop")
    )
    assert none.reason == "student_none_correct"
    assert ChatJob("x", ()).context is None


def test_in_process_model_is_the_default_backend(flags, tmp_path, tiny_vlm_dir):
    student = {"model": str(tiny_vlm_dir), "k": 2, "max_tokens": 6}
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(recipe_dict(flags, student=student), tmp_path), str(out))
    stages = {s.stage: s for s in result.funnel}
    assert stages["student"].total == stages["student"].kept == len(NAMES)
    assert result.manifest["models"]["student"]["requests"] == 2 * len(NAMES)
    assert len(ReplyCache(out / "cache")) == 2 * len(NAMES)
    again = run_recipe(parse_recipe(recipe_dict(flags, student=student), tmp_path), str(out))
    assert again.manifest["models"]["student"]["cached"] == 2 * len(NAMES)
