"""Grounding DINO as a Beam ``ModelHandler``: candidate boxes for the labels of a record's domain.

One joint prompt per image (``"label a. label b."``, the labels of its domain) and one forward
pass per batch; records of different domains share a batch (their prompts are padded). Each
record comes back as ``PredictionResult(record, detections, model_id)`` where ``detections`` is a
tuple of :class:`~groundforge.schemas.records.Detection` in pixel ``xyxy`` of that record's image,
best first, or ``None`` when that one record could not be processed (its bytes do not decode, or
the model fails on it alone). ``None`` lets a downstream filter drop the record with a reason
while the rest of the batch goes on; an empty tuple means "looked, found nothing".

The pure pieces (prompt building, label matching, turning post-processed outputs into
detections) are plain functions, usable and testable without Beam or a model.

Beam's own HuggingFace handlers cannot be used: they import TensorFlow classes that
transformers 5 no longer has.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from groundforge.filters.image import open_rgb
from groundforge.pixels import image_bytes
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, ImageRecord

_LOG = logging.getLogger(__name__)

INFERENCE_ARGS = ("box_threshold", "text_threshold")

_SPECIAL_TOKEN = re.compile(r"\[(?:CLS|SEP|PAD|UNK|MASK)\]", re.IGNORECASE)


def normalize_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Labels as they appear in a prompt: lower-case, single-spaced, no trailing period, no
    empties or duplicates (first occurrence kept).

    >>> normalize_labels(["Flag", " national  flag. ", "flag", ""])
    ('flag', 'national flag')
    """
    seen: dict[str, None] = {}
    for label in labels:
        clean = " ".join(label.lower().split()).rstrip(". ").strip()
        if clean:
            seen.setdefault(clean, None)
    return tuple(seen)


def labels_for_domain(domain: str, labels: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The normalized label phrases for ``domain``; the domain name itself when it has no entry.

    >>> labels_for_domain("flag", {"aircraft": ["airplane"]})
    ('flag',)
    """
    return normalize_labels(labels.get(domain) or [domain])


def build_prompt(labels: Iterable[str]) -> str:
    """The joint Grounding DINO prompt: each normalized label followed by a period.

    >>> build_prompt(["Airplane", "person."])
    'airplane. person.'
    """
    clean = normalize_labels(labels)
    if not clean:
        raise ValueError("a detector prompt needs at least one non-empty label")
    return " ".join(f"{label}." for label in clean)


def match_label(phrase: str, labels: Sequence[str]) -> str:
    """Map a decoded phrase from grounded post-processing onto one of the prompt's ``labels``.

    The phrase is made of the prompt tokens that scored above the text threshold, so it can be
    a label, part of one, span several, or be empty. A one-label prompt always gives its label.
    Otherwise an exact match wins, then the label sharing the most words (earliest in the prompt
    on ties), then the cleaned phrase itself (``""`` when no token passed the threshold).

    >>> match_label("national flag [SEP]", ["flag", "national flag"])
    'national flag'
    >>> match_label("flag. airplane.", ["airplane", "flag"])
    'airplane'
    >>> match_label("", ["flag"])
    'flag'
    """
    if len(labels) == 1:
        return labels[0]
    clean = " ".join(_SPECIAL_TOKEN.sub(" ", phrase.lower()).replace(".", " ").split())
    if clean in labels:
        return clean
    words = set(clean.split())
    best, best_overlap = clean, 0
    for label in labels:
        overlap = len(words & set(label.split()))
        if overlap > best_overlap:
            best, best_overlap = label, overlap
    return best


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def to_detections(
    result: Mapping[str, Any], labels: Sequence[str], width: int, height: int
) -> tuple[Detection, ...]:
    """Detections from one image's ``post_process_grounded_object_detection`` result.

    ``result`` holds ``scores`` (n), ``boxes`` (n x 4, pixel xyxy) and ``text_labels`` (n
    phrases). Boxes are clipped to the ``width`` x ``height`` image, boxes left without area
    are dropped, phrases are mapped onto ``labels`` (:func:`match_label`), and the detections
    are sorted by score, best first.
    """
    scores = _as_list(result["scores"])
    boxes = _as_list(result["boxes"])
    # Read `labels` only as a fallback: transformers warns on any access to it.
    phrases = list(result["text_labels"] if "text_labels" in result else result["labels"])
    if not len(scores) == len(boxes) == len(phrases):
        raise ValueError(
            f"post-processed result is ragged: {len(scores)} scores, {len(boxes)} boxes, "
            f"{len(phrases)} labels"
        )
    found = []
    for score, coords, phrase in zip(scores, boxes, phrases, strict=True):
        box = Box.from_corners(*coords).clip(width, height)
        if box.is_degenerate:
            continue
        found.append(Detection(box=box, score=float(score), label=match_label(phrase, labels)))
    found.sort(key=lambda d: -d.score)
    return tuple(found)


@dataclass(frozen=True)
class LoadedDetector:
    """What :meth:`GroundingDinoHandler.load_model` returns.

    A dataclass, not a tuple: Beam keeps loaded models in a weak-reference cache, and tuples
    cannot be weakly referenced.
    """

    model: Any
    processor: Any
    image_size: dict[str, int] | None


class GroundingDinoHandler(ModelHandler[ImageRecord, PredictionResult, LoadedDetector]):
    """Grounding DINO boxes for batches of :class:`ImageRecord` (or of ``detect`` samples: only
    ``image`` and ``domain`` are read) (see the module docstring).

    ``model`` is a hub id or a local folder. ``labels`` maps a domain to its label phrases; a
    domain without an entry is prompted with its own name. ``num_threads`` sets torch's
    intra-op threads when the model loads: use 1 with several worker processes, which
    otherwise oversubscribe the cores. ``shortest_edge``/``longest_edge`` override the image
    processor's resize. ``inference_args`` of ``RunInference`` may override ``box_threshold``
    and ``text_threshold``. ``progress`` (a :class:`~groundforge.pipelines.progress.ModelProgress`)
    is told of each batch's images as they go in and come back.
    """

    def __init__(
        self,
        model: str,
        labels: Mapping[str, Sequence[str]] | None = None,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        batch_size: int = 8,
        device: str = "cpu",
        num_threads: int | None = None,
        shortest_edge: int | None = None,
        longest_edge: int | None = None,
        progress=None,
    ):
        super().__init__()
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.model_id = str(model)
        self.labels = {domain: tuple(phrases) for domain, phrases in (labels or {}).items()}
        for domain, phrases in self.labels.items():
            if phrases and not normalize_labels(phrases):
                raise ValueError(f"labels for domain {domain!r} are all empty: {list(phrases)}")
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.shortest_edge = shortest_edge
        self.longest_edge = longest_edge
        self.progress = progress

    def load_model(self) -> LoadedDetector:
        """Load model and processor with ``from_pretrained``, in eval mode on ``device``."""
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        processor = AutoProcessor.from_pretrained(self.model_id)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_id)
        model.to(self.device).eval()
        size = None
        if self.shortest_edge is not None or self.longest_edge is not None:
            current = processor.image_processor.size
            size = {
                "shortest_edge": self.shortest_edge or current.shortest_edge,
                "longest_edge": self.longest_edge or current.longest_edge,
            }
        return LoadedDetector(model, processor, size)

    def run_inference(
        self,
        batch: Sequence[ImageRecord],
        model: LoadedDetector,
        inference_args: dict[str, Any] | None = None,
    ) -> list[PredictionResult]:
        """One result per record, in order; ``inference`` is a detection tuple or ``None``."""
        self.validate_inference_args(inference_args)
        args = {"box_threshold": self.box_threshold, "text_threshold": self.text_threshold}
        args.update(inference_args or {})

        images = {}
        for i, record in enumerate(batch):
            try:
                images[i] = open_rgb(image_bytes(record))
            except Exception as err:  # one bad image must not fail its batch
                name = getattr(record, "image_id", None) or getattr(record, "sample_id", "")
                _LOG.warning("detector: cannot decode image %s: %s", name, err)
        if self.progress is not None:
            self.progress.jobs(len(batch))
            self.progress.sent(len(batch))
        found: dict[int, tuple[Detection, ...]] = {}
        if images:
            try:
                dets = self._detect(model, [batch[i] for i in images], list(images.values()), args)
                found = dict(zip(images, dets, strict=True))
            except Exception as err:
                if len(images) == 1:
                    (only,) = images
                    _LOG.warning("detector: failed on image %s: %s", batch[only].image_id, err)
                else:
                    found = self._detect_one_by_one(model, batch, images, args)
        if self.progress is not None:
            self.progress.answered(len(found))
            self.progress.answered(len(batch) - len(found), failed=True)
            self.progress.flush()
        return [
            PredictionResult(record, found.get(i), self.model_id) for i, record in enumerate(batch)
        ]

    def _detect_one_by_one(self, model, batch, images, args) -> dict[int, tuple[Detection, ...]]:
        # A batch failed: find the culprits so the other records still get their boxes.
        found = {}
        for i, image in images.items():
            try:
                found[i] = self._detect(model, [batch[i]], [image], args)[0]
            except Exception as err:
                _LOG.warning("detector: failed on image %s: %s", batch[i].image_id, err)
        return found

    def _detect(self, model: LoadedDetector, records, images, args) -> list[tuple[Detection, ...]]:
        import torch

        labels = [labels_for_domain(r.domain, self.labels) for r in records]
        prompts = [build_prompt(phrases) for phrases in labels]
        image_kwargs = {"size": model.image_size} if model.image_size else {}
        inputs = model.processor(
            images=images,
            text=prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=model.model.config.max_text_len,
            **image_kwargs,
        ).to(self.device)
        with torch.inference_mode():
            outputs = model.model(**inputs)
        results = model.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=args["box_threshold"],
            text_threshold=args["text_threshold"],
            target_sizes=[(image.height, image.width) for image in images],
        )
        return [
            to_detections(result, phrases, image.width, image.height)
            for result, phrases, image in zip(results, labels, images, strict=True)
        ]

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        unknown = set(inference_args or {}) - set(INFERENCE_ARGS)
        if unknown:
            raise ValueError(
                f"unknown detector inference_args {sorted(unknown)}; accepted: {INFERENCE_ARGS}"
            )

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        # Fixed-size batches: Beam's adaptive sizing starts at 1 and spends its first dozen
        # batches growing, each one a padded forward pass. A bundle's last batch still
        # flushes short, so nothing waits for a full batch.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def share_model_across_processes(self) -> bool:
        # Each worker process loads its own copy: the model is small, and sharing one through
        # a proxy would serialise every batch's images between processes.
        return False

    def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
        # The default pickles the whole batch just to measure it; parked records hold no
        # bytes, so count what the model sees: decoded RGB pixels.
        return sum(record.width * record.height * 3 for record in batch)
