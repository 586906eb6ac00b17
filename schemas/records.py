"""The records that flow between stages. Arrow conversion lives in :mod:`.arrow`, nowhere else."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from groundforge.schemas.box import Box


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_id(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (the same inputs give the same id)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Compact:
    """Pickles as its class and its field values in order, without the field names: records
    cross every shuffle of a run, and names would be most of their encoded size.

    >>> import pickle
    >>> chad = Entity("Chad", Box(0, 0, 2, 1))
    >>> pickle.loads(pickle.dumps(chad)) == chad, b"name" in pickle.dumps(chad)
    (True, False)
    """

    __slots__ = ()

    def __reduce__(self):
        return (self.__class__, tuple(getattr(self, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Instance(Compact):
    """One annotated object of an image (crowd detection), in the image's pixels.

    ``box`` is the ground truth the recipe chose; ``full`` (the whole extent, occluded parts
    included, so it may reach past the image edge) and ``visible`` (the visible part) are the
    annotation's other boxes, when it has them. An ``ignore`` instance (an ignore region, COCO's
    ``iscrowd``) is neither a truth nor a false positive.
    """

    box: Box
    label: str = ""
    full: Box | None = None
    visible: Box | None = None
    ignore: bool = False

    @property
    def visible_share(self) -> float:
        """The visible box's area over the full box's (1.0 when either is unknown).

        >>> half = Instance(Box(0, 0, 10, 10), full=Box(0, 0, 10, 10), visible=Box(0, 0, 5, 10))
        >>> half.visible_share
        0.5
        """
        if self.full is None or self.visible is None or self.full.area <= 0:
            return 1.0
        return self.visible.area / self.full.area


@dataclass(frozen=True)
class UncertainRegion(Compact):
    """A place of a crowded image where a detector is unsure, and why: ``missed`` (a truth no
    confident candidate found), ``weak`` (found with a low IoU), ``occluded`` (a truth mostly
    hidden) or ``false_positive`` (a confident candidate matching no truth)."""

    box: Box
    reason: str


@dataclass(frozen=True)
class SourceItem(Compact):
    """A pointer to one image before it is read: a file path, a URL or a dataset row.

    ``data`` carries the bytes when the source already holds them (a dataset row).
    ``instances`` are the annotated objects (``boxes`` stays the non-ignored truths among them);
    ``dropped_instances`` counts, by reason, the annotations of this image that could not become
    instances; ``declared_size`` is the ``(width, height)`` the annotation file gives, if any.
    ``error`` says why the source could not make a usable item of its entry (a
    malformed annotation line): :func:`groundforge.sources.read.read_item` drops such an item,
    with ``reason`` as its reason code (``bad_annotation`` when empty).
    """

    item_id: str
    location: str
    domain: str
    entity: str = ""
    boxes: tuple[Box, ...] = ()
    source: str = ""
    license: str = ""
    author: str = ""
    url: str = ""
    data: bytes | None = None
    instances: tuple[Instance, ...] = ()
    dropped_instances: dict[str, int] = field(default_factory=dict)
    error: str = ""
    reason: str = ""
    declared_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Detection(Compact):
    """A candidate box proposed by an annotator, with its score and label."""

    box: Box
    score: float = 1.0
    label: str = ""


@dataclass(frozen=True)
class ImageRecord(Compact):
    """One image and what is known about it.

    ``image_id`` is the sha256 of the bytes as the source delivered them, so it identifies the
    source image even after :mod:`groundforge.filters.image` re-encodes ``image`` to upright RGB.
    ``opaque_box`` is the extent of the pixels that were not transparent in the source (None when
    it had no transparency); the image check measures it before compositing onto white, since
    afterwards a white object on a transparent ground can no longer be told apart.
    ``candidates`` holds each annotator's proposals by annotator name; ``box`` is the box the
    pipeline decided to trust (``box_source`` says which one). ``embedding`` is the image's
    L2-normalised vector from the run's image embedder (dedup, distractor choice), when computed.
    ``instances``, ``dropped_instances`` and ``declared_size`` are as on :class:`SourceItem`,
    carried through.
    In a pipeline the checked bytes are parked (:mod:`groundforge.pixels`): ``image`` is then
    empty and ``image_ref`` names the file; read pixels with :func:`groundforge.pixels.image_bytes`.
    """

    image_id: str
    image: bytes
    width: int
    height: int
    domain: str
    entity: str = ""
    boxes: tuple[Box, ...] = ()
    source: str = ""
    location: str = ""
    license: str = ""
    author: str = ""
    url: str = ""
    opaque_box: Box | None = None
    candidates: dict[str, tuple[Detection, ...]] = field(default_factory=dict)
    box: Box | None = None
    box_source: str = ""
    box_ious: dict[str, float] = field(default_factory=dict)
    embedding: tuple[float, ...] | None = None
    instances: tuple[Instance, ...] = ()
    dropped_instances: dict[str, int] = field(default_factory=dict)
    image_ref: str = ""
    declared_size: tuple[int, int] | None = None


def record_key(record: ImageRecord) -> str:
    """A record's identity within a run, and its place in the run's stable order: where it came
    from (unique per source item), or its image id when the source gives no location."""
    return record.location or record.image_id


@dataclass(frozen=True)
class Entity(Compact):
    """A named instance in a sample's image."""

    name: str
    box: Box


@dataclass(frozen=True)
class Provenance(Compact):
    source_image_ids: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    licenses: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    layout: str = "single"
    recipe_hash: str = ""
    version: str = ""


@dataclass(frozen=True)
class KVGSample(Compact):
    """One row of a shard.

    ``distractors`` says how the other entities of a composed scene were chosen (``hard``: the
    target's nearest look-alikes, ``easy``: at random; None for a single-entity image) and
    ``distractor_similarity`` is their mean similarity to the target: a difficulty signal.
    ``candidates`` are the annotators' proposals for the target (by annotator name) and
    ``teacher_box`` the box the teacher's rationale states, both in this image's pixels. A
    ``detect`` sample's ``gt_boxes`` are every instance; its ``ignore_regions`` are neither
    truths nor false positives and ``uncertain_regions`` are where a detector hesitates.
    Like a record, a sample in a pipeline holds its pixels parked in ``image_ref``; the shard
    writer loads them back, so a shard row always holds the bytes.
    A kept ``rationale`` is a box template (:func:`groundforge.schemas.codecs.box_template`):
    each box the teacher quoted is a placeholder ``⟦box i⟧`` (``⟦box i j⟧`` for a list) and
    ``rationale_boxes[i]`` holds it in this image's pixels with its label (``name``, ``""`` when
    unlabelled), so a trainer writes them in its own frame, as it writes the answer.
    ``dropped_instances`` counts, by reason, the annotations of a ``detect`` sample's images
    that could not become instances: objects that may be in the picture but are not in
    ``gt_boxes``.
    """

    sample_id: str
    image: bytes
    width: int
    height: int
    domain: str
    task: str
    question: str
    target: str
    entities: tuple[Entity, ...]
    gt_boxes: tuple[Box, ...]
    split: str
    provenance: Provenance
    rationale: str | None = None
    box_source: str = ""
    teacher_model: str | None = None
    teacher_iou: float | None = None
    detector_iou: float | None = None
    student_k: int | None = None
    student_correct: int | None = None
    distractors: str | None = None
    distractor_similarity: float | None = None
    candidates: dict[str, tuple[Detection, ...]] = field(default_factory=dict)
    teacher_box: Box | None = None
    uncertain_regions: tuple[UncertainRegion, ...] = ()
    ignore_regions: tuple[Box, ...] = ()
    image_ref: str = ""
    rationale_boxes: tuple[Entity, ...] = ()
    dropped_instances: dict[str, int] = field(default_factory=dict)


def item_id_of(location: str, sha256: str) -> str:
    """The id of one source item: where it came from and its bytes' sha256 (``""`` when never
    read). Two copies of one picture under two paths get two ids; the sha256 alone would be one.

    >>> item_id_of("a/chad.png", "ab") != item_id_of("b/chad.png", "ab")
    True
    """
    return stable_id("item", location, sha256)


@dataclass(frozen=True)
class Rejection(Compact):
    """An item a stage dropped, and why. ``detail`` is JSON text.

    ``item_id`` is the dropped item's own id (:func:`item_id_of` for a source item or image, the
    ``sample_id`` for a sample), so no two rows share one and none equals a kept image's id;
    ``source_id`` is where it came from (a path or URI), ``sha256`` the digest of its source bytes
    (``""`` when they were never read or the item is a composed sample) and ``entity`` its entity
    name (a sample's target).
    """

    item_id: str
    stage: str
    reason: str
    detail: str = "{}"
    source_id: str = ""
    sha256: str = ""
    entity: str = ""


@dataclass(frozen=True)
class MarkedBox:
    """A box to draw on a preview: ``kind`` is ``gt`` (the trusted or target box),
    ``candidate`` (an annotator's proposal; ``label`` names the annotator) or ``cause`` (a box
    the drop's reason points at, e.g. the rationale's stated box)."""

    kind: str
    box: Box
    label: str = ""


@dataclass(frozen=True)
class RejectionPreview:
    """A look at one dropped item for the report: ``image`` is a small JPEG of the item's image
    (None when the item had no decodable image), ``width``/``height`` its size, and every box
    in ``boxes`` is in that thumbnail's pixels."""

    item_id: str
    stage: str
    reason: str
    detail: str = "{}"
    image: bytes | None = None
    width: int = 0
    height: int = 0
    boxes: tuple[MarkedBox, ...] = ()
