"""Evaluation: the scorer's arithmetic on canned answers (the KVG-Bench cascade itself is in
test_kvgbench_score.py), the codec scorer, detection metrics, loading KVG-Bench parquet and our
shards, and end-to-end runs against the tiny Qwen2.5-VL in process and behind
``transformers serve``."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math

import pytest
from kvgbench import DEFAULT_CASES, BenchCase, case_png, write_kvg_bench
from samples import make_sample

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import smart_resize
from groundforge.trainer import evaluate as evaluate_module
from groundforge.trainer.evaluate import (
    REASONING_SUFFIX,
    BenchItem,
    detection_ap,
    evaluate,
    format_table,
    load_kvg_bench,
    load_shard_items,
    match_boxes,
    prf,
    read_report,
    resolve_scorer,
    run_eval,
    write_report,
)


def test_doctests():
    result = doctest.testmod(evaluate_module)
    assert result.attempted > 0 and result.failed == 0


# -- canned answers --------------------------------------------------------------------------


class CannedBackend:
    """The backend interface (``answer(requests) -> replies``) replying with given texts.

    ``answers`` maps an item id to a text, or to ``("error", kind)`` for a failed request.
    """

    def __init__(self, answers: dict[str, object]):
        self.answers = answers
        self.requests = []
        self.batches = []

    def answer(self, requests):
        self.batches.append(len(requests))
        replies = []
        for request in requests:
            self.requests.append(request)
            given = self.answers[request.item_id]
            if isinstance(given, tuple):
                replies.append(TeacherReply(request.item_id, error=given[1], detail="canned"))
            else:
                replies.append(TeacherReply(request.item_id, text=given))
        return replies


EXTRA_DOG = BenchCase(107, "dog", "Poodle", (0, 0, 500, 500))
CASES = (*DEFAULT_CASES, EXTRA_DOG)

# question id -> (answer in the 0..1000 frame as a box, or None, the text, its IoU)
CANNED = {
    # aircraft (seen): an exact box, then an <answer> pair after a decoy pair in <think>
    "101": ((100, 100, 500, 600), "<|box_start|>(100,100),(500,600)<|box_end|>", 1.0),
    "102": (
        (0, 0, 200, 200),
        "<think>all of it (0,0),(1000,1000)?</think><answer>(0,0),(200,200)</answer>",
        0.25,
    ),
    # bird (seen): the request failed
    "103": (None, ("error", "timeout"), 0.0),
    # dog (unseen): IoU exactly 0.5 (correct) and 1/3
    "104": ((200, 200, 600, 400), "It is here: [200, 200, 600, 400]", 0.5),
    "107": ((250, 0, 750, 500), "Poodle(250,0),(750,500)", 1 / 3),
    # flower (unseen): no box in the answer
    "105": (None, "I do not know this flower.", 0.0),
    # flag (our own domain, in neither list): an integer tuple
    "106": ((100, 300, 900, 700), "(100, 300, 900, 700)", 1.0),
}


@pytest.fixture(scope="module")
def bench_items(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "kvg-bench.parquet"
    write_kvg_bench(path, CASES)
    return load_kvg_bench(path)


def test_load_kvg_bench(bench_items, tmp_path):
    assert [i.question_id for i in bench_items] == [str(c.question_id) for c in CASES]
    for item, case in zip(bench_items, CASES, strict=True):
        assert item.category == case.category
        assert item.question == case.question
        assert item.answer == tuple(float(v) for v in case.box)
        assert (item.width, item.height) == (case.width, case.height)
        assert item.image == case_png(case)
        assert item.task == "kvg"
    # a folder of parquet files loads every file, in sorted order
    write_kvg_bench(tmp_path / "b.parquet", CASES[:2])
    write_kvg_bench(tmp_path / "sub" / "a.parquet", CASES[2:3])
    assert [i.question_id for i in load_kvg_bench(tmp_path)] == ["101", "102", "103"]


def test_load_kvg_bench_rejects_other_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        load_kvg_bench(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError):
        load_kvg_bench(tmp_path / "absent.parquet")


def canned_texts() -> dict[str, object]:
    return {qid: text for qid, (_, text, _) in CANNED.items()}


def test_canned_answers_score_exactly(bench_items):
    backend = CannedBackend(canned_texts())
    calls = []
    report = evaluate(
        bench_items, backend, batch_size=3, progress=lambda d, t: calls.append((d, t))
    )
    assert backend.batches == [3, 3, 1]
    assert calls == [(3, 7), (6, 7), (7, 7)]

    by_id = {p.question_id: p for p in report.predictions}
    for qid, (box, _, iou) in CANNED.items():
        p = by_id[qid]
        assert p.iou == pytest.approx(iou, rel=1e-7)  # the reference computes in float32
        assert p.correct == (iou >= 0.5)
        assert p.frame == "norm1000"
        assert p.boxes == ([] if box is None else [pytest.approx(list(map(float, box)))])
    assert by_id["103"].error == "timeout" and by_id["103"].answer is None
    assert by_id["102"].pattern == "answer_point_pair"
    assert by_id["104"].pattern == "int_list"
    assert by_id["106"].pattern == "int_tuple"
    assert by_id["105"].error is None and by_id["105"].pattern is None
    assert report.config["scorer"] == "kvgbench" and report.config["codec"] == "norm1000"

    g = report.metrics["grounding"]
    cats = g["categories"]
    # seen categories first, then unseen, then the others, each in list order
    assert list(cats) == ["aircraft", "bird", "dog", "flower", "flag"]
    expected = {
        "aircraft": (2, 1, 50.0, (1 + 0.25) / 2),
        "bird": (1, 0, 0.0, 0.0),
        "dog": (2, 1, 50.0, (0.5 + 1 / 3) / 2),
        "flower": (1, 0, 0.0, 0.0),
        "flag": (1, 1, 100.0, 1.0),
        "seen": (3, 1, 100 / 3, 1.25 / 3),
        "unseen": (3, 1, 100 / 3, (0.5 + 1 / 3) / 3),
        "all": (7, 3, 300 / 7, (1 + 0.25 + 0 + 0.5 + 1 / 3 + 0 + 1) / 7),
    }
    for name, (n, correct, acc, miou) in expected.items():
        row = cats[name] if name in cats else g[name]
        assert (row["n"], row["correct"]) == (n, correct), name
        assert row["acc"] == pytest.approx(acc, abs=1e-9), name
        assert row["miou"] == pytest.approx(miou, rel=1e-7), name
    assert cats["bird"]["failed"] == 1 and g["seen"]["failed"] == 1 and g["all"]["failed"] == 1
    assert cats["flower"]["no_box"] == 1 and g["all"]["no_box"] == 1
    assert report.metrics["failures"] == {"timeout": 1}
    assert report.metrics["n_failed"] == 1 and report.metrics["n_items"] == 7
    # the failed request is left out of the pattern counts
    assert g["patterns"] == {"none": 1, "answer_point_pair": 1, "point_pair": 2, "int_list": 1,
                             "int_tuple": 1}  # fmt: skip
    assert "detection" not in report.metrics

    # every request carries its item's image and the question as given
    assert [r.prompt for r in backend.requests] == [i.question for i in bench_items]
    assert [r.images for r in backend.requests] == [(i.image,) for i in bench_items]

    table = format_table(report)
    for name in ("aircraft", "flag", "all", "42.86", "0.4405", "timeout 1", "scorer kvgbench"):
        assert name in table


def test_seen_and_unseen_lists_are_parameters(bench_items):
    report = evaluate(bench_items, CannedBackend(canned_texts()), seen=["flag"], unseen=["bird"])
    g = report.metrics["grounding"]
    assert list(g["categories"])[:2] == ["flag", "bird"]
    assert (g["seen"]["n"], g["seen"]["acc"]) == (1, 100.0)
    assert (g["unseen"]["n"], g["unseen"]["acc"]) == (1, 0.0)
    assert g["all"]["n"] == 7


def test_reasoning_suffix(bench_items):
    backend = CannedBackend(canned_texts())
    evaluate(bench_items[:2], backend, reasoning=True)
    assert backend.requests[0].prompt == bench_items[0].question + REASONING_SUFFIX
    assert "<think>" in REASONING_SUFFIX and "<answer>" in REASONING_SUFFIX
    backend = CannedBackend(canned_texts())
    evaluate(bench_items[:1], backend, reasoning=True, suffix=" Think first.")
    assert backend.requests[0].prompt == bench_items[0].question + " Think first."


def qwen25vl_text(item: BenchItem, box) -> str:
    """The same box as a Qwen2.5-VL answer: pixels of the processor's resized image."""
    rh, rw = smart_resize(item.height, item.width)
    x1, y1, x2, y2 = box
    values = [x1 * rw / 1000, y1 * rh / 1000, x2 * rw / 1000, y2 * rh / 1000]
    return json.dumps([{"bbox_2d": values, "label": "x"}])


def pixel_text(item: BenchItem, box) -> str:
    x1, y1, x2, y2 = box
    w, h = item.width, item.height
    return f"[{x1 * w / 1000}, {y1 * h / 1000}, {x2 * w / 1000}, {y2 * h / 1000}]"


@pytest.mark.parametrize(("codec", "render"), [("qwen25vl", qwen25vl_text), ("pixel", pixel_text)])
def test_other_codecs_give_the_same_ious(bench_items, codec, render):
    # the resized frame really differs from the image for some items
    assert any(smart_resize(i.height, i.width) != (i.height, i.width) for i in bench_items)
    reference = evaluate(bench_items, CannedBackend(canned_texts()))
    answers = {}
    for item in bench_items:
        box, text, _ = CANNED[item.question_id]
        answers[item.question_id] = text if box is None else render(item, box)
    report = evaluate(bench_items, CannedBackend(answers), codec=codec)
    assert report.config["scorer"] == "codec" and report.config["codec"] == codec
    assert "patterns" not in report.metrics["grounding"]
    for ref, got in zip(reference.predictions, report.predictions, strict=True):
        assert got.frame == "pixel" and got.pattern is None
        assert got.iou == pytest.approx(ref.iou, rel=1e-7)
        assert got.correct == ref.correct
    for name in ("seen", "unseen", "all"):
        ref, got = reference.metrics["grounding"][name], report.metrics["grounding"][name]
        assert got["acc"] == pytest.approx(ref["acc"])
        assert got["miou"] == pytest.approx(ref["miou"], rel=1e-7)


def test_the_codec_scorer_puts_boxes_right_and_clips_them(bench_items):
    # the kvgbench scorer takes corners as written; the codec scorer repairs them
    item = bench_items[0]  # aircraft, answer (100, 100, 500, 600)
    texts = {item.question_id: "(500,600),(100,100)"}
    kvg = evaluate([item], CannedBackend(texts))
    assert kvg.predictions[0].boxes == [[500.0, 600.0, 100.0, 100.0]]
    assert kvg.predictions[0].iou == 0.0
    fixed = evaluate([item], CannedBackend(texts), scorer="codec")
    assert fixed.config == {**fixed.config, "scorer": "codec", "codec": "norm1000"}
    assert fixed.predictions[0].iou == pytest.approx(1.0)


def test_resolve_scorer():
    assert resolve_scorer() == ("kvgbench", "norm1000")
    assert resolve_scorer("kvgbench", "norm1000") == ("kvgbench", "norm1000")
    assert resolve_scorer(codec="qwen25vl") == ("codec", "qwen25vl")
    assert resolve_scorer(codec="norm1000") == ("codec", "norm1000")
    assert resolve_scorer("codec") == ("codec", "norm1000")
    with pytest.raises(ValueError, match="0..1000 frame only"):
        resolve_scorer("kvgbench", "qwen25vl")
    with pytest.raises(ValueError, match="unknown scorer"):
        resolve_scorer("nope")


def test_eval_help_names_the_scorers():
    from click.testing import CliRunner

    from groundforge.cli import main

    result = CliRunner().invoke(main, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--scorer [kvgbench|codec]" in text
    assert "published KVG-Bench scorer" in text and "codec parser" in text


def test_unknown_codec_fails_before_asking(bench_items):
    backend = CannedBackend(canned_texts())
    with pytest.raises(ValueError, match="unknown box codec"):
        evaluate(bench_items, backend, codec="nope")
    assert backend.requests == []


def test_report_round_trip(bench_items, tmp_path):
    report = evaluate(bench_items, CannedBackend(canned_texts()))
    metrics_path, predictions_path = write_report(report, tmp_path / "out")
    body = json.loads(metrics_path.read_text())
    assert body["grounding"]["all"]["correct"] == 3
    assert body["config"]["codec"] == "norm1000" and body["config"]["scorer"] == "kvgbench"
    assert len(predictions_path.read_text().splitlines()) == 7
    again = read_report(tmp_path / "out")
    assert again.metrics == json.loads(json.dumps(report.metrics))
    assert [dataclasses.asdict(p) for p in again.predictions] == json.loads(
        json.dumps([dataclasses.asdict(p) for p in report.predictions])
    )


# -- detection -------------------------------------------------------------------------------


def detect_item(qid: str, boxes, category: str = "person") -> BenchItem:
    return BenchItem(
        question_id=qid,
        category=category,
        question="Detect every person.",
        boxes=tuple(tuple(float(v) for v in b) for b in boxes),
        image=b"",
        width=1000,
        height=1000,
        task="detect",
    )


def test_hungarian_matching_beats_greedy():
    gts = [Box(0, 0, 100, 100), Box(60, 0, 160, 100)]
    # the first prediction overlaps both truths at 0.54; greedy would give it the first truth
    # and leave the second prediction (0.9 with the first truth) unmatched
    preds = [Box(30, 0, 130, 100), Box(0, 0, 90, 100)]
    matches = match_boxes(preds, gts)
    assert sorted((p, g) for p, g, _ in matches) == [(0, 1), (1, 0)]
    assert match_boxes([], gts) == [] and match_boxes(preds, []) == []
    assert match_boxes([Box(0, 0, 10, 10)], [Box(20, 20, 30, 30)]) == []


def test_prf_conventions():
    assert prf(3, 5, 4) == pytest.approx({"precision": 0.6, "recall": 0.75, "f1": 2 / 3})
    assert prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert prf(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert prf(0, 2, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_ap_by_hand():
    a, b = Box(0, 0, 100, 100), Box(500, 500, 600, 600)
    wrong = Box(300, 0, 400, 100)
    # perfect predictions
    assert detection_ap([([a, b], [b, a], 1000, 1000)]) == pytest.approx(1.0)
    # half right, the right box first: precision 1 up to recall 0.5 -> 51 of 101 recall points
    assert detection_ap([([a, b], [a, wrong], 1000, 1000)]) == pytest.approx(51 / 101)
    # half right, the wrong box first (rank pseudo-scores): precision 0.5 up to recall 0.5
    assert detection_ap([([a, b], [wrong, a], 1000, 1000)]) == pytest.approx(25.5 / 101)
    # nothing predicted, nothing true
    assert detection_ap([([a], [], 1000, 1000)]) == 0.0
    assert detection_ap([([], [a], 1000, 1000)]) is None


def test_detection_metrics_through_evaluate():
    a1, a2 = (0, 0, 100, 100), (500, 500, 600, 600)
    b1, b2 = (100, 100, 300, 300), (700, 100, 900, 300)
    items = [
        detect_item("A", [a1, a2]),
        detect_item("B", [b1, b2]),
        detect_item("C", [a1], category="car"),
    ]
    answers = {
        # both right: two matches
        "A": "(0,0),(100,100) (500,500),(600,600)",
        # one right (first), two wrong: 1 TP, 2 FP, 1 FN
        "B": "[(100,100),(300,300)] [(0,900),(50,950)] [(400,400),(450,450)]",
        "C": ("error", "server_error"),
    }
    report = evaluate(items, CannedBackend(answers))
    by_id = {p.question_id: p for p in report.predictions}
    assert (by_id["A"].tp, by_id["A"].fp, by_id["A"].fn) == (2, 0, 0)
    assert (by_id["B"].tp, by_id["B"].fp, by_id["B"].fn) == (1, 2, 1)
    assert (by_id["C"].tp, by_id["C"].fp, by_id["C"].fn) == (0, 0, 1)
    assert by_id["A"].iou is None and by_id["A"].correct is None
    det = report.metrics["detection"]
    person = det["categories"]["person"]
    assert (person["n"], person["n_gt"], person["n_pred"], person["tp"]) == (2, 4, 5, 3)
    assert person["precision"] == pytest.approx(3 / 5)
    assert person["recall"] == pytest.approx(3 / 4)
    assert person["f1"] == pytest.approx(2 / 3)
    # scores 1, 1/2 (A) and 1, 1/2, 1/3 (B): TP TP TP FP FP -> precision 1 up to recall 0.75
    assert person["ap50"] == pytest.approx(76 / 101)
    car = det["categories"]["car"]
    assert (car["failed"], car["recall"], car["ap50"]) == (1, 0.0, 0.0)
    assert det["all"]["tp"] == 3 and det["all"]["n_gt"] == 5
    assert det["all"]["recall"] == pytest.approx(3 / 5)
    assert "grounding" not in report.metrics
    assert report.metrics["failures"] == {"server_error": 1}
    assert "AP@0.5" in format_table(report)


# -- our shards ------------------------------------------------------------------------------


def write_shards(out, samples):
    import apache_beam as beam

    from groundforge.outputs.shards import WriteShards, finalize_shards

    with beam.Pipeline() as p:
        _ = p | beam.Create(samples) | WriteShards(str(out), "arrow", 4)
    finalize_shards(str(out), ["sft", "val"], "arrow")


def test_load_shard_items_and_score_them(tmp_path):
    samples = [make_sample(i, "val") for i in range(3)] + [make_sample(3, "sft")]
    detect = dataclasses.replace(
        make_sample(4, "val"),
        task="detect",
        gt_boxes=(Box(0, 0, 4, 3), Box(4, 3, 8, 6)),
    )
    write_shards(tmp_path, [*samples, detect])

    items = load_shard_items(tmp_path, "val")
    by_id = {i.question_id: i for i in items}
    expected = {s.sample_id: s for s in [*samples[:3], detect]}
    assert set(by_id) == set(expected)
    for qid, sample in expected.items():
        item = by_id[qid]
        assert (item.category, item.task, item.question) == (
            sample.domain,
            sample.task,
            sample.question,
        )
        assert (item.width, item.height, item.image) == (sample.width, sample.height, sample.image)
        for got, want in zip(item.pixel_boxes(), sample.gt_boxes, strict=True):
            assert got.to_list() == pytest.approx(want.to_list())
    # 8 x 6 pixels: Box(1, 1, 5, 4) is (125, 166.7, 625, 666.7) in 0..1000
    first = by_id[samples[0].sample_id]
    assert first.answer == pytest.approx((125, 1000 / 6, 625, 4000 / 6))
    assert len(load_shard_items(tmp_path, "sft")) == 1

    # answers: the true box for grounding items, both boxes (pixels) for the detection item
    answers = {}
    for item in items:
        if item.task == "detect":
            answers[item.question_id] = "[[0, 0, 4, 3], [4, 3, 8, 6]]"
        else:
            x1, y1, x2, y2 = item.pixel_boxes()[0].to_list()
            answers[item.question_id] = f"[{x1}, {y1}, {x2}, {y2}]"
    report = evaluate(items, CannedBackend(answers), codec="pixel")
    assert report.metrics["grounding"]["categories"]["flag"]["acc"] == 100.0
    assert report.metrics["grounding"]["all"]["miou"] == pytest.approx(1.0)
    det = report.metrics["detection"]["all"]
    assert (det["precision"], det["recall"], det["f1"]) == (1.0, 1.0, 1.0)
    assert det["ap50"] == pytest.approx(1.0)


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "kvg-bench.parquet"
    write_kvg_bench(path, DEFAULT_CASES)
    return path


def check_run(report, out_dir):
    assert len(report.predictions) == len(DEFAULT_CASES)
    assert [p.question_id for p in report.predictions] == [
        str(c.question_id) for c in DEFAULT_CASES
    ]
    for p in report.predictions:
        assert 0.0 <= p.iou <= 1.0 and math.isfinite(p.iou)
        assert p.correct == (p.iou >= 0.5)
        assert (p.answer is None) == (p.error is not None)
    g = report.metrics["grounding"]
    assert sum(row["n"] for row in g["categories"].values()) == len(DEFAULT_CASES)
    assert (g["seen"]["n"], g["unseen"]["n"], g["all"]["n"]) == (3, 2, 6)
    for row in (*g["categories"].values(), g["seen"], g["unseen"], g["all"]):
        assert 0.0 <= row["acc"] <= 100.0 and 0.0 <= row["miou"] <= 1.0
    preds = report.predictions
    assert g["all"]["acc"] == pytest.approx(100 * sum(p.correct for p in preds) / len(preds))
    assert g["all"]["miou"] == pytest.approx(sum(p.iou for p in preds) / len(preds))
    assert g["all"]["failed"] == report.metrics["n_failed"]

    again = read_report(out_dir)
    assert again.metrics == json.loads(json.dumps(report.metrics))
    assert [p.question_id for p in again.predictions] == [p.question_id for p in preds]
    assert [p.answer for p in again.predictions] == [p.answer for p in preds]
    assert "all" in format_table(report)


def test_run_eval_in_process(tiny_vlm_dir, bench_file, tmp_path):
    calls = []
    report = run_eval(
        bench=bench_file,
        model=str(tiny_vlm_dir),
        max_tokens=8,
        batch_size=4,
        out_dir=tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(4, 6), (6, 6)]
    # A Qwen2.5-VL answers in its processor's resized pixels (the frame `train` derives for it).
    assert report.config["model"] == str(tiny_vlm_dir) and report.config["codec"] == "qwen25vl"
    assert report.config["scorer"] == "codec"
    assert report.config["codec_source"] == "from model type qwen2_5_vl"
    assert report.metrics["n_failed"] == 0  # the tiny model always says something
    check_run(report, tmp_path)


def test_run_eval_against_a_served_model(teacher_server, bench_file, tmp_path):
    base_url, model = teacher_server
    report = run_eval(
        bench=bench_file,
        endpoint=base_url,
        served_model=model,
        max_tokens=8,
        reasoning=True,
        limit=6,
        out_dir=tmp_path,
    )
    assert report.config["endpoint"] == base_url and report.config["reasoning"] is True
    check_run(report, tmp_path)


def test_run_eval_argument_errors(bench_file, tmp_path):
    with pytest.raises(ValueError, match="exactly one of bench"):
        run_eval(bench=bench_file, shards=tmp_path, model="m")
    with pytest.raises(ValueError, match="exactly one of bench"):
        run_eval(model="m")
    with pytest.raises(ValueError, match="exactly one of model"):
        run_eval(bench=bench_file)
    with pytest.raises(ValueError, match="exactly one of model"):
        run_eval(bench=bench_file, model="m", endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="served_model"):
        run_eval(bench=bench_file, endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="endpoint, not to model"):
        run_eval(bench=bench_file, model="m", served_model="x")
    with pytest.raises(ValueError, match="unknown box codec"):
        run_eval(bench=bench_file, model="m", codec="nope")
    with pytest.raises(ValueError, match="0..1000 frame only"):
        run_eval(bench=bench_file, model="m", scorer="kvgbench", codec="qwen25vl")
    with pytest.raises(ValueError, match="no items"):
        run_eval(bench=bench_file, model="m", limit=0)
