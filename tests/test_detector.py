"""The Grounding DINO handler: pure pieces, the handler on a tiny model, inside Beam."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from groundforge.annotators.detector import (
    GroundingDinoHandler,
    build_prompt,
    labels_for_domain,
    match_label,
    normalize_labels,
    to_detections,
)
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord, sha256_hex

LABELS = {"aircraft": ["Airplane", "person"], "pets": ["dog", "cat."]}
BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.2


def make_record(width: int, height: int, domain: str, seed: int, fmt: str = "PNG") -> ImageRecord:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    data = buf.getvalue()
    return ImageRecord(sha256_hex(data), data, width, height, domain)


def corrupt_record(domain: str = "flag") -> ImageRecord:
    data = b"\x89PNG\r\n\x1a\n not really a png"
    return ImageRecord(sha256_hex(data), data, 64, 64, domain)


@pytest.fixture(scope="module")
def handler(tiny_detector_dir) -> GroundingDinoHandler:
    return GroundingDinoHandler(
        str(tiny_detector_dir),
        labels=LABELS,
        box_threshold=BOX_THRESHOLD,
        text_threshold=TEXT_THRESHOLD,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def loaded(handler):
    return handler.load_model()


@pytest.fixture(scope="module")
def mixed_batch() -> list[ImageRecord]:
    return [
        make_record(320, 240, "aircraft", 0),
        make_record(64, 128, "flag", 1, fmt="JPEG"),
        make_record(500, 200, "pets", 2),
        make_record(240, 320, "flag", 3),
    ]


# --- pure pieces -------------------------------------------------------------------------------


def test_prompt_is_lower_case_labels_each_ending_with_a_period():
    assert build_prompt(["Airplane", "person"]) == "airplane. person."
    assert build_prompt(["cat.", " Black  Cat ", "cat", ""]) == "cat. black cat."
    assert build_prompt(["flag"]) == "flag."
    with pytest.raises(ValueError):
        build_prompt(["", " . "])


def test_labels_default_to_the_domain_name():
    assert labels_for_domain("pets", LABELS) == ("dog", "cat")
    assert labels_for_domain("flag", LABELS) == ("flag",)
    assert labels_for_domain("flag", {"flag": []}) == ("flag",)
    assert normalize_labels(["A", "a.", "b"]) == ("a", "b")


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("dog", "dog"),
        ("dog [SEP]", "dog"),
        ("[CLS] cat.", "black cat"),
        ("black", "black cat"),  # a part of a label
        ("dog. black cat", "black cat"),  # spans labels: most shared words
        ("dog. cat", "dog"),  # a tie goes to the earlier label
        ("zebra", "zebra"),  # nothing shared: the phrase itself
        ("", ""),
    ],
)
def test_match_label(phrase, expected):
    assert match_label(phrase, ("dog", "black cat")) == expected


def test_a_one_label_prompt_always_gives_its_label():
    assert match_label("", ("flag",)) == "flag"
    assert match_label(". [SEP]", ("flag",)) == "flag"


def test_to_detections_clips_drops_degenerate_maps_labels_and_sorts():
    result = {
        "scores": torch.tensor([0.5, 0.9, 0.7, 0.8, 0.6]),
        "boxes": torch.tensor(
            [
                [-5.0, 10.0, 50.0, 300.0],  # clipped to the 100 x 200 image
                [10.0, 10.0, 10.0, 50.0],  # no width
                [30.0, 60.0, 20.0, 40.0],  # corners swapped
                [400.0, 10.0, 500.0, 20.0],  # entirely right of the image
                [10.0, 250.0, 20.0, 260.0],  # entirely below the image
            ]
        ),
        "text_labels": ["flag [SEP]", "flag", "national flag.", "flag", "flag"],
    }
    got = to_detections(result, ("flag", "national flag"), width=100, height=200)
    assert got == (
        Detection(Box(20, 40, 30, 60), pytest.approx(0.7), "national flag"),
        Detection(Box(0, 10, 50, 200), pytest.approx(0.5), "flag"),
    )
    assert all(isinstance(d.score, float) for d in got)


def test_to_detections_accepts_plain_lists_and_empty_results():
    plain = {"scores": [0.4], "boxes": [[1, 2, 3, 4]], "text_labels": ["dog"]}
    assert to_detections(plain, ("dog",), 10, 10) == (Detection(Box(1, 2, 3, 4), 0.4, "dog"),)
    empty = {"scores": torch.zeros(0), "boxes": torch.zeros(0, 4), "text_labels": []}
    assert to_detections(empty, ("dog",), 10, 10) == ()
    with pytest.raises(ValueError, match="ragged"):
        to_detections({"scores": [0.4], "boxes": [], "text_labels": ["dog"]}, ("dog",), 10, 10)


def test_handler_settings_and_validation(tiny_detector_dir):
    h = GroundingDinoHandler(str(tiny_detector_dir), batch_size=3)
    assert h.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 3}
    assert h.share_model_across_processes() is False
    # Decoded RGB bytes: what the model sees, whether the record holds or parks its image.
    assert h.get_num_bytes([make_record(8, 8, "a", 0)]) == 8 * 8 * 3
    for bad in (
        {"box_threshold": 1.5},
        {"text_threshold": -0.1},
        {"batch_size": 0},
        {"num_threads": 0},
        {"labels": {"flag": ["", " . "]}},
    ):
        with pytest.raises(ValueError):
            GroundingDinoHandler("m", **bad)
    with pytest.raises(ValueError, match="inference_args"):
        h.validate_inference_args({"threshold": 0.5})


# --- the handler on the tiny model -------------------------------------------------------------


def test_tiny_detector_loads_through_from_pretrained(loaded):
    from transformers import GroundingDinoForObjectDetection

    assert isinstance(loaded.model, GroundingDinoForObjectDetection)
    assert not loaded.model.training
    # The BERT vocab was really read (the `vocab_file=` pitfall turns every word into [UNK]).
    assert "[UNK]" not in loaded.processor.tokenizer.tokenize("airplane. dog. flag.")


def test_mixed_batch_one_result_per_input_in_order(handler, loaded, mixed_batch):
    results = handler.run_inference(mixed_batch, loaded)
    assert [r.example for r in results] == mixed_batch
    assert all(r.model_id == handler.model_id for r in results)
    total = 0
    for r in results:
        rec, dets = r.example, r.inference
        assert isinstance(dets, tuple)
        labels = labels_for_domain(rec.domain, LABELS)
        # "" is a box no prompt token claimed, possible only with several labels
        allowed = set(labels) | ({""} if len(labels) > 1 else set())
        for d in dets:
            assert 0 <= d.box.x1 < d.box.x2 <= rec.width
            assert 0 <= d.box.y1 < d.box.y2 <= rec.height
            assert d.score >= BOX_THRESHOLD
            # labels come from this record's own prompt, so a shifted batch would show here
            assert d.label in allowed
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        total += len(dets)
    assert total > 0
    assert handler.run_inference(mixed_batch, loaded) == results


def test_handler_matches_the_raw_model_on_one_image(handler, loaded):
    record = make_record(500, 200, "aircraft", 7)
    (result,) = handler.run_inference([record], loaded)
    image = Image.open(io.BytesIO(record.image)).convert("RGB")
    inputs = loaded.processor(images=[image], text=["airplane. person."], return_tensors="pt")
    with torch.inference_mode():
        outputs = loaded.model(**inputs)
    (raw,) = loaded.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], BOX_THRESHOLD, TEXT_THRESHOLD, target_sizes=[(200, 500)]
    )
    expected = []
    for score, coords in zip(raw["scores"].tolist(), raw["boxes"].tolist(), strict=True):
        box = Box(*coords).clip(500, 200)
        if not box.is_degenerate:
            expected.append((box, score))
    expected.sort(key=lambda pair: -pair[1])
    assert len(result.inference) == len(expected) > 0
    for det, (box, score) in zip(result.inference, expected, strict=True):
        assert det.score == pytest.approx(score)
        assert det.box.to_list() == pytest.approx(box.to_list(), abs=1e-3)


def test_inference_args_override_thresholds(handler, loaded, mixed_batch):
    strict = handler.run_inference(mixed_batch, loaded, {"box_threshold": 0.999})
    loose = handler.run_inference(mixed_batch, loaded)
    for s, lo in zip(strict, loose, strict=True):
        assert all(d.score > 0.999 for d in s.inference)
        assert len(s.inference) <= len(lo.inference)


def test_corrupt_image_gives_none_and_leaves_the_others_alone(handler, loaded, mixed_batch):
    good = [mixed_batch[0], mixed_batch[2]]
    with_bad = [good[0], corrupt_record(), good[1]]
    clean = handler.run_inference(good, loaded)
    results = handler.run_inference(with_bad, loaded)
    assert [r.example for r in results] == with_bad
    assert results[1].inference is None
    # same decoded images in the same order: the good records get exactly the same boxes
    assert [results[0].inference, results[2].inference] == [r.inference for r in clean]
    (only_bad,) = handler.run_inference([corrupt_record()], loaded)
    assert only_bad.inference is None


def test_a_failing_forward_only_costs_the_culprit(handler, loaded, mixed_batch, monkeypatch):
    poison = make_record(64, 64, "flag", 99)
    original = GroundingDinoHandler._detect

    def detect(self, model, records, images, args):
        if any(r.image_id == poison.image_id for r in records):
            raise RuntimeError("model blew up")
        return original(self, model, records, images, args)

    monkeypatch.setattr(GroundingDinoHandler, "_detect", detect)
    batch = [mixed_batch[0], poison, mixed_batch[1]]
    results = handler.run_inference(batch, loaded)
    assert [r.example for r in results] == batch
    assert results[1].inference is None
    assert isinstance(results[0].inference, tuple) and isinstance(results[2].inference, tuple)


def test_num_threads_is_applied_on_load(tiny_detector_dir):
    before = torch.get_num_threads()
    try:
        GroundingDinoHandler(str(tiny_detector_dir), num_threads=1).load_model()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_image_size_override_reaches_the_processor(tiny_detector_dir, mixed_batch):
    h = GroundingDinoHandler(str(tiny_detector_dir), shortest_edge=100, longest_edge=150)
    model = h.load_model()
    assert model.image_size == {"shortest_edge": 100, "longest_edge": 150}
    seen = []
    forward = model.model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["pixel_values"].shape[-2:]))
        return forward(*args, **kwargs)

    model.model.forward = spy
    h.run_inference([mixed_batch[2]], model)  # 500 x 200 -> longest side 150
    assert seen == [(60, 150)]


# --- inside Beam -------------------------------------------------------------------------------


def test_handler_in_a_beam_pipeline(handler, mixed_batch):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    records = [*mixed_batch, corrupt_record(), make_record(100, 100, "pets", 5)]

    def summarize(result):
        dets = result.inference
        ok = dets is None or all(isinstance(d, Detection) for d in dets)
        return result.example.image_id, None if dets is None else "tuple", ok

    expected = [(r.image_id, "tuple", True) for r in records]
    expected[len(mixed_batch)] = (records[len(mixed_batch)].image_id, None, True)
    options = PipelineOptions([], runner="DirectRunner", direct_running_mode="in_memory")
    with beam.Pipeline(options=options) as p:
        out = p | beam.Create(records) | RunInference(handler) | beam.Map(summarize)
        assert_that(out, equal_to(expected))
