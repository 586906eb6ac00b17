"""The KARL knowledge probe: how well does a model already know each entity of the shards?

KARL scales the GRPO grounding reward by how well the base model knows the queried entity
(the KARL paper). The probe measures it with a multiple-choice recognition test:

1. **Single-entity images are cropped out of the shards.** Every named entity of every sample
   (scene samples list all their entities, single-entity samples their one) gives a crop of its
   box. The same box of the same image (the several queries of one scene) counts once. Up to
   ``per_entity`` crops are kept per entity, chosen deterministically: the crops with the
   smallest ``sha256(seed, image sha256, entity, box)``, so the choice depends on the data and
   the seed, never on shard order. A crop is the box padded by ``pad`` (5%) of its width and
   height on each side, widened to whole pixels (floor/ceil), clipped to the image and grown to
   at least ``min_side`` (4) pixels per side around its centre; a crop whose shorter side is
   then below ``min_image_side`` (28, one Qwen-VL patch) is upscaled (bicubic) so every chat
   backend accepts it. Entities without a name (``""``) are skipped.
2. **One 4-choice question per crop**: ``Which <domain> is shown in the image?`` then the options
   ``A. ...`` to ``D. ...`` one per line, then ``Answer with the letter.``. The 3 distractors are
   the entities of the same domain whose names are most similar to the target's by text
   embedding (:class:`~groundforge.annotators.embed.TextEmbedder`, cosine, through
   :class:`~groundforge.scenes.distractors.DistractorIndex`; the same for every crop of one
   entity). A domain with fewer than 4 entities gives fewer options (2 or 3 letters; a domain
   with a single entity gives a one-option question, which measures nothing and is only
   answered wrong by an unparsable reply). Options are shuffled per crop with a seeded RNG.
3. **The backend answers** (any object with ``answer(requests) -> replies``, e.g.
   :class:`~groundforge.annotators.teacher.embedded.TransformersBackend` or
   :class:`~groundforge.annotators.teacher.client.OpenAIBackend`; build it greedy, as
   :func:`run_probe` does). The reply's choice is read by :func:`parse_choice`; an unreadable
   reply counts as wrong. A failed request (an error reply) is not an answer: it is left out of
   ``n`` and counted in the map's ``probe.failed``.
4. **Accuracy per entity gives its level** (:func:`level_for`): 0 for ``>= 0.7`` (best known),
   1 for ``[0.45, 0.7)``, 2 for ``[0.3, 0.45)``, 3 for ``[0.1, 0.3)``, 4 for ``< 0.1`` (least
   known); ``thresholds`` sets the four lower bounds (:func:`check_thresholds`). An entity
   answered fewer than ``min_questions`` times (:data:`DEFAULT_MIN_QUESTIONS`) gets no level:
   it is written under ``unknown`` with its accuracy, ``n`` and the reason
   ``too_few_questions``. An entity whose every request failed has no accuracy: it is listed in
   ``probe.unanswered``. Neither is in ``entities``, so a reader treats both as it treats any
   entity the probe never saw (the trainer's KARL reward: the middle level).

The result is a :class:`KnowledgeMap`, saved as JSON::

    {"model": "Qwen/Qwen2.5-VL-7B-Instruct",
     "thresholds": [0.7, 0.45, 0.3, 0.1],
     "min_questions": 10,
     "entities": {"Boeing 757": {"accuracy": 0.82, "n": 50, "level": 0}, ...},
     "unknown": {"Boeing 717": {"accuracy": 0.5, "n": 4, "reason": "too_few_questions"}},
     "probe": {"per_entity": 50, "seed": 0, "text_embedder": "...", "template": "...",
               "requests": 4120, "failed": 0, "unanswered": []}}
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundforge.schemas.box import Box
from groundforge.schemas.records import sha256_hex, stable_id

_LOG = logging.getLogger(__name__)

# Lower bounds of levels 0..3; below the last is level 4 (the KARL paper).
THRESHOLDS: tuple[float, ...] = (0.7, 0.45, 0.3, 0.1)
# The fewest answered questions that give an entity a level. An accuracy over n questions has a
# standard error of sqrt(p (1 - p) / n), at most 0.5 / sqrt(n): 0.5 for one question (a single
# answer decides between the two extreme levels, which carry the largest rewards) and 0.16 for
# ten, about the width of the narrowest level (0.3 to 0.45), so a level is then off by at most
# one within one standard error. Ten is also the fewest that can reach every level (accuracies
# move in steps of 1/n; three questions cannot land in [0.1, 0.3)) and a fifth of the probe's
# default 50 questions per entity, so only entities with few crops in the data go unlevelled.
DEFAULT_MIN_QUESTIONS = 10
TOO_FEW_QUESTIONS = "too_few_questions"
NUM_CHOICES = 4
LETTERS = "ABCD"
QUESTION_TEMPLATE = "Which {domain} is shown in the image?\n{options}\nAnswer with the letter."
TEMPLATE_HASH = hashlib.sha256(QUESTION_TEMPLATE.encode()).hexdigest()[:16]

Progress = Callable[[int, int], None]


# -- levels -----------------------------------------------------------------------------------


def level_for(accuracy: float, thresholds: Sequence[float] = THRESHOLDS) -> int:
    """The knowledge level of an accuracy: the index of the first threshold it reaches.

    >>> [level_for(a) for a in (1.0, 0.7, 0.69, 0.45, 0.3, 0.1, 0.099, 0.0)]
    [0, 0, 1, 1, 2, 3, 4, 4]
    """
    if not (isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy must be a number in [0, 1], got {accuracy!r}")
    for level, threshold in enumerate(thresholds):
        if accuracy >= threshold:
            return level
    return len(thresholds)


def check_thresholds(values: Iterable[object]) -> tuple[float, ...]:
    """Four level bounds, strictly decreasing, each in (0, 1]; ``ValueError`` otherwise.

    >>> check_thresholds([0.8, "0.5", 0.3, 0.05])
    (0.8, 0.5, 0.3, 0.05)
    """
    values = list(values)
    try:
        bounds = tuple(float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be numbers, got {values!r}") from None
    if len(bounds) != len(THRESHOLDS):
        raise ValueError(
            f"thresholds need {len(THRESHOLDS)} values (the lower bounds of levels 0 to 3), "
            f"got {len(bounds)}"
        )
    for t in bounds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
    if any(a <= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"thresholds must be strictly decreasing, got {list(bounds)}")
    return bounds


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0.7,0.45,0.3,0.1"`` as checked bounds (:func:`check_thresholds`)."""
    return check_thresholds(part.strip() for part in text.split(","))


def check_min_questions(min_questions: int, per_entity: int | None = None) -> int:
    """``min_questions`` when it is at least 1 and, with ``per_entity``, at most that many
    (more would leave every entity without a level)."""
    if isinstance(min_questions, bool) or not isinstance(min_questions, int) or min_questions < 1:
        raise ValueError(f"min_questions must be a whole number >= 1, got {min_questions!r}")
    if per_entity is not None and min_questions > per_entity:
        raise ValueError(
            f"min_questions ({min_questions}) is more than per_entity ({per_entity}): no entity "
            "could get a level; lower min_questions or raise per_entity"
        )
    return min_questions


# -- the map ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntityKnowledge:
    """One entity's probe result: ``accuracy`` over ``n`` answered questions, and its level."""

    accuracy: float
    n: int
    level: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "level": self.level}


@dataclass(frozen=True)
class UnknownEntity:
    """An entity the probe asked about but gave no level, and why (``reason``)."""

    accuracy: float
    n: int
    reason: str = TOO_FEW_QUESTIONS

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "reason": self.reason}


@dataclass
class KnowledgeMap:
    """Knowledge levels per entity name, as the KARL reward reads them (see the module doc).
    ``unknown`` holds the entities answered fewer than ``min_questions`` times."""

    model: str
    entities: dict[str, EntityKnowledge]
    thresholds: tuple[float, ...] = THRESHOLDS
    probe: dict[str, Any] = field(default_factory=dict)
    min_questions: int = DEFAULT_MIN_QUESTIONS
    unknown: dict[str, UnknownEntity] = field(default_factory=dict)

    def level(self, entity: str, default: int | None = None) -> int | None:
        """The entity's level; ``default`` for an entity the map does not hold."""
        known = self.entities.get(entity)
        return default if known is None else known.level

    def levels(self) -> dict[str, int]:
        return {name: known.level for name, known in self.entities.items()}

    def summary(self) -> str:
        """One line: entities per level, and those left without one.

        >>> KnowledgeMap("m", {"a": EntityKnowledge(0.9, 12, 0)}, min_questions=10,
        ...              unknown={"b": UnknownEntity(1.0, 2)}).summary()
        '1 entity with a level (level 0: 1); 1 with too few questions (under 10 answered: no level)'
        """
        counts = Counter(self.levels().values())
        spread = ", ".join(f"level {lv}: {counts[lv]}" for lv in sorted(counts))
        n = len(self.entities)
        line = f"{n} {'entity' if n == 1 else 'entities'} with a level ({spread or 'none'})"
        line += (
            f"; {len(self.unknown)} with too few questions "
            f"(under {self.min_questions} answered: no level)"
        )
        unanswered = self.probe.get("unanswered") or []
        if unanswered:
            line += f"; {len(unanswered)} unanswered (every request failed)"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "thresholds": list(self.thresholds),
            "min_questions": self.min_questions,
            "entities": {name: self.entities[name].as_dict() for name in sorted(self.entities)},
            "unknown": {name: self.unknown[name].as_dict() for name in sorted(self.unknown)},
            "probe": dict(self.probe),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KnowledgeMap:
        """The map of :meth:`to_dict`; a map written before ``min_questions`` existed gave
        every answered entity a level (``min_questions`` 1)."""
        try:
            entities = {
                str(name): EntityKnowledge(float(e["accuracy"]), int(e["n"]), int(e["level"]))
                for name, e in data["entities"].items()
            }
            unknown = {
                str(name): UnknownEntity(float(e["accuracy"]), int(e["n"]), str(e["reason"]))
                for name, e in data.get("unknown", {}).items()
            }
            return cls(
                model=str(data.get("model", "")),
                entities=entities,
                thresholds=check_thresholds(data.get("thresholds", THRESHOLDS)),
                probe=dict(data.get("probe", {})),
                min_questions=check_min_questions(data.get("min_questions", 1)),
                unknown=unknown,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a knowledge map: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the JSON (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", "utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeMap:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text("utf-8")))
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read a knowledge map: {exc}") from exc


# -- crops ------------------------------------------------------------------------------------


def _span(lo: int, hi: int, minimum: int, limit: int) -> tuple[int, int]:
    lo, hi = max(0, lo), min(limit, hi)
    need = min(minimum, limit)
    if hi - lo < need:
        start = math.floor((lo + hi - need) / 2)
        lo = min(max(0, start), limit - need)
        hi = lo + need
    return lo, hi


def crop_rect(
    box: Box, width: int, height: int, pad: float = 0.05, min_side: int = 4
) -> tuple[int, int, int, int]:
    """The integer pixel rectangle ``(left, top, right, bottom)`` cropped for ``box``.

    The box is clipped to the image, padded by ``pad`` times its width (x) and height (y) on
    each side, widened to whole pixels, clipped again and grown around its centre to at least
    ``min_side`` pixels per side (the whole side when the image is smaller).

    >>> crop_rect(Box(10, 20, 50, 60), 100, 100)
    (8, 18, 52, 62)
    >>> crop_rect(Box(10.4, 20.6, 50.2, 60.1), 100, 100, pad=0)
    (10, 20, 51, 61)
    >>> crop_rect(Box(0, 0, 1, 1), 100, 100, pad=0.5)
    (0, 0, 4, 4)
    """
    if pad < 0 or min_side < 1:
        raise ValueError(f"need pad >= 0 and min_side >= 1, got {pad} and {min_side}")
    b = box.clip(width, height)
    px, py = pad * max(b.width, 0.0), pad * max(b.height, 0.0)
    x1, x2 = _span(math.floor(b.x1 - px), math.ceil(b.x2 + px), min_side, width)
    y1, y2 = _span(math.floor(b.y1 - py), math.ceil(b.y2 + py), min_side, height)
    return x1, y1, x2, y2


def crop_png(
    image: Any,
    box: Box,
    pad: float = 0.05,
    min_side: int = 4,
    min_image_side: int = 28,
) -> bytes:
    """The PNG of ``box``'s crop (:func:`crop_rect`) of a PIL image, upscaled (bicubic) so its
    shorter side is at least ``min_image_side``."""
    from PIL import Image

    rect = crop_rect(box, image.width, image.height, pad, min_side)
    crop = image.crop(rect)
    short = min(crop.size)
    if short < min_image_side:
        scale = min_image_side / short
        size = (
            max(min_image_side, round(crop.width * scale)),
            max(min_image_side, round(crop.height * scale)),
        )
        crop = crop.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    return buf.getvalue()


# -- questions and answers ----------------------------------------------------------------------


def question_text(domain: str, options: Sequence[str]) -> str:
    """The probe question for one crop.

    >>> print(question_text("aircraft", ["Boeing 747", "Airbus A320"]))
    Which aircraft is shown in the image?
    A. Boeing 747
    B. Airbus A320
    Answer with the letter.
    """
    if not 1 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 1 to {len(LETTERS)} options, got {len(options)}")
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return QUESTION_TEMPLATE.format(domain=domain, options=lines)


def parse_choice(text: object, options: Sequence[str]) -> int | None:
    """The index of the option a reply chose, or ``None`` when it names none.

    In order: a reply that is one letter and punctuation (any case: ``b``, ``(B)``); a reply
    starting with a capital letter standing alone (``B.``, ``**B**``, ``B) Boeing``); an
    explicit ``answer is B`` / ``Answer: B``; the text of an option (case-insensitive, whole
    words, the earliest, the longest at one place); the first capital letter standing alone
    anywhere. Only the letters of the given options count. A leading "A" followed by a word
    ("A Boeing 747") is read as an article, not a choice.

    >>> opts = ["Boeing 737", "Boeing 747", "Airbus A320", "Boeing 737 MAX"]
    >>> [parse_choice(t, opts) for t in ("C", "(b)", "The answer is D.", "a boeing 747", "E", "")]
    [2, 1, 3, 1, None, None]
    """
    if not isinstance(text, str) or not options:
        return None
    letters = LETTERS[: len(options)]
    cls = f"[{letters}]"
    text = text.strip()
    bare = re.sub(r"[\W_]", "", text)
    if len(bare) == 1 and bare.upper() in letters:
        return letters.index(bare.upper())
    lead = re.match(rf"^[\W_]*({cls})(?:\s*[.)\]:,*]|\s*$)", text)
    if lead:
        return letters.index(lead.group(1))
    explicit = re.search(
        rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[(\[*]*({cls})(?![A-Za-z0-9])", text
    )
    if explicit:
        return letters.index(explicit.group(1))
    found: tuple[int, int, int] | None = None  # (position, -length, index)
    folded = text.casefold()
    for index, option in enumerate(options):
        name = option.strip().casefold()
        if not name:
            continue
        match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", folded)
        if match:
            key = (match.start(), -len(name), index)
            found = key if found is None or key < found else found
    if found is not None:
        return found[2]
    loose = re.search(rf"(?<![A-Za-z0-9])({cls})(?![A-Za-z0-9])", text)
    return letters.index(loose.group(1)) if loose else None


# -- the probe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeItem:
    """One question: a crop of ``entity`` (of ``domain``) and its options; ``answer`` is the
    index of the entity among them."""

    item_id: str
    domain: str
    entity: str
    image_sha: str
    box: tuple[float, float, float, float]
    options: tuple[str, ...]
    answer: int
    crop: bytes = field(repr=False)

    @property
    def prompt(self) -> str:
        return question_text(self.domain, self.options)


def _box_key(box: Box) -> tuple[float, float, float, float]:
    return tuple(round(v, 3) for v in box.to_list())  # type: ignore[return-value]


def _pick_key(seed: int, image_sha: str, entity: str, box: tuple) -> str:
    blob = json.dumps([seed, image_sha, entity, list(box)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def select_crops(
    samples: Iterable[Any], per_entity: int = 50, seed: int = 0
) -> dict[tuple[str, str], list[tuple[str, tuple[float, float, float, float]]]]:
    """``(domain, entity) -> [(image sha256, box), ...]``: the crops the probe asks about.

    Every named entity of every sample is a candidate; a box of one image counts once; up to
    ``per_entity`` per entity, those with the smallest seeded hash (see the module doc), in that
    order.
    """
    if per_entity < 1:
        raise ValueError(f"per_entity must be at least 1, got {per_entity}")
    candidates: dict[tuple[str, str], dict[tuple, str]] = defaultdict(dict)
    for sample in samples:
        image_sha = sha256_hex(sample.image)
        domain = sample.domain.strip()
        for entity in sample.entities:
            name = entity.name.strip()
            if not name:
                continue
            box = _box_key(entity.box)
            candidates[(domain, name)][(image_sha, box)] = _pick_key(seed, image_sha, name, box)
    chosen = {}
    for key in sorted(candidates):
        ranked = sorted(candidates[key].items(), key=lambda kv: (kv[1], kv[0]))
        chosen[key] = [crop for crop, _ in ranked[:per_entity]]
    return chosen


def domain_distractors(
    names: Sequence[str], text_embedder: Any, count: int = NUM_CHOICES - 1
) -> dict[str, list[str]]:
    """For each name, the ``count`` others whose names embed most similarly, most similar first
    (all others when fewer exist). ``names`` should be one domain's entities."""
    names = sorted(set(names))
    if len(names) < 2:
        return {name: [] for name in names}
    from groundforge.scenes.distractors import DistractorIndex

    index = DistractorIndex(names, text_embedder.embed_texts(names))
    return {name: [other for other, _ in index.neighbours(name, count)] for name in names}


def build_items(
    shards_dir: str | Path,
    per_entity: int = 50,
    seed: int = 0,
    text_embedder: Any = None,
    fmt: str | None = None,
    pad: float = 0.05,
    min_side: int = 4,
    min_image_side: int = 28,
) -> list[ProbeItem]:
    """The probe's questions over the shards (all splits), ordered by domain, entity and crop.

    Reads the shards twice (choose, then crop) so that only the chosen crops stay in memory.
    """
    from groundforge.filters.image import open_rgb
    from groundforge.outputs.shards import detect_format, read_samples

    shards_dir = str(shards_dir)
    fmt = fmt or detect_format(shards_dir)
    chosen = select_crops(read_samples(shards_dir, fmt=fmt), per_entity, seed)

    by_domain: dict[str, list[str]] = defaultdict(list)
    for domain, name in chosen:
        by_domain[domain].append(name)
    if text_embedder is None and any(len(names) > 1 for names in by_domain.values()):
        from groundforge.annotators.embed import TextEmbedder

        text_embedder = TextEmbedder()
    distractors = {
        domain: domain_distractors(names, text_embedder) for domain, names in by_domain.items()
    }

    wanted: dict[str, set[tuple]] = defaultdict(set)
    for crops in chosen.values():
        for image_sha, box in crops:
            wanted[image_sha].add(box)
    crops_png: dict[tuple[str, tuple], bytes] = {}
    for sample in read_samples(shards_dir, fmt=fmt):
        if not wanted:
            break
        image_sha = sha256_hex(sample.image)
        boxes = wanted.pop(image_sha, None)
        if not boxes:
            continue
        image = open_rgb(sample.image)
        for box in sorted(boxes):
            crops_png[(image_sha, box)] = crop_png(image, Box(*box), pad, min_side, min_image_side)

    items = []
    for (domain, name), crops in chosen.items():
        others = distractors[domain][name]
        for image_sha, box in crops:
            item_id = stable_id("knowledge-probe", domain, name, image_sha, list(box))
            options = [name, *others]
            rng = random.Random(int(_pick_key(seed, item_id, "shuffle", ())[:16], 16))
            rng.shuffle(options)
            items.append(
                ProbeItem(
                    item_id=item_id,
                    domain=domain,
                    entity=name,
                    image_sha=image_sha,
                    box=box,
                    options=tuple(options),
                    answer=options.index(name),
                    crop=crops_png[(image_sha, box)],
                )
            )
    return items


def item_request(item: ProbeItem) -> Any:
    """The chat request asking ``item``'s question about its crop."""
    from groundforge.annotators.teacher.types import TeacherRequest

    return TeacherRequest(
        item_id=item.item_id,
        prompt=item.prompt,
        images=(item.crop,),
        image_ids=(sha256_hex(item.crop),),
        template_hash=TEMPLATE_HASH,
        context=item,
    )


def score_items(
    items: Sequence[ProbeItem],
    replies: Sequence[Any],
    model: str = "",
    thresholds: Sequence[float] = THRESHOLDS,
    probe_info: Mapping[str, Any] | None = None,
    min_questions: int = DEFAULT_MIN_QUESTIONS,
) -> KnowledgeMap:
    """The knowledge map from the questions and their replies (same order); an entity with
    fewer than ``min_questions`` answers goes under ``unknown``."""
    thresholds = check_thresholds(thresholds)
    min_questions = check_min_questions(min_questions)
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} questions but {len(replies)} replies")
    answered: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    failed = 0
    for item, reply in zip(items, replies, strict=True):
        answered.setdefault(item.entity, 0)
        if not reply.ok:
            failed += 1
            continue
        answered[item.entity] += 1
        if parse_choice(reply.text, item.options) == item.answer:
            correct[item.entity] += 1
    entities = {}
    unknown = {}
    unanswered = []
    for name in sorted(answered):
        n = answered[name]
        if not n:
            unanswered.append(name)
            continue
        accuracy = correct[name] / n
        if n < min_questions:
            unknown[name] = UnknownEntity(accuracy, n)
            continue
        entities[name] = EntityKnowledge(accuracy, n, level_for(accuracy, thresholds))
    info = {
        **(probe_info or {}),
        "requests": len(items),
        "failed": failed,
        "unanswered": unanswered,
    }
    if failed:
        _LOG.warning("%d of %d probe requests failed (left out of n)", failed, len(items))
    return KnowledgeMap(model, entities, thresholds, info, min_questions, unknown)


def probe(
    shards_dir: str | Path,
    backend: Any,
    per_entity: int = 50,
    seed: int = 0,
    text_embedder: Any = None,
    progress: Progress | None = None,
    batch_size: int = 64,
    fmt: str | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    min_questions: int = DEFAULT_MIN_QUESTIONS,
) -> KnowledgeMap:
    """Run the knowledge probe of the module doc over the shards with ``backend``.

    ``text_embedder`` (default: the packaged MiniLM :class:`TextEmbedder`) picks distractors;
    ``progress(done, total)`` is called after every batch of ``batch_size`` requests; ``fmt``
    is the shard format (found on disk when ``None``). ``thresholds`` and ``min_questions``
    decide the levels (see the module doc). The map's ``model`` is ``backend.model`` when the
    backend has one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    thresholds = check_thresholds(thresholds)
    check_min_questions(min_questions, per_entity)
    if getattr(backend, "stochastic", False):
        _LOG.warning("the probe backend samples (temperature > 0); the probe expects greedy")
    items = build_items(shards_dir, per_entity, seed, text_embedder, fmt)
    replies: list[Any] = []
    if progress is not None:
        progress(0, len(items))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        got = list(backend.answer([item_request(item) for item in chunk]))
        if len(got) != len(chunk):
            raise RuntimeError(f"backend gave {len(got)} replies to {len(chunk)} requests")
        replies.extend(got)
        if progress is not None:
            progress(len(replies), len(items))
    if text_embedder is None:
        from groundforge.annotators.embed import DEFAULT_TEXT_MODEL_NAME

        embedder_name = f"sentence-transformers:{DEFAULT_TEXT_MODEL_NAME}"
    else:
        embedder_name = str(getattr(text_embedder, "name", type(text_embedder).__name__))
    info = {
        "per_entity": per_entity,
        "seed": seed,
        "text_embedder": embedder_name,
        "template": TEMPLATE_HASH,
    }
    model = str(getattr(backend, "model", ""))
    return score_items(items, replies, model, thresholds, info, min_questions)


def run_probe(
    data: str | Path,
    model: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    api_key_env: str | None = None,
    out: str | Path = "knowledge.json",
    per_entity: int = 50,
    max_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    max_pixels: int | None = None,
    text_model: str | None = None,
    cache_dir: str | None = None,
    max_concurrency: int = 16,
    timeout: float = 120.0,
    progress: Progress | None = None,
    thresholds: Sequence[float] | str = THRESHOLDS,
    min_questions: int = DEFAULT_MIN_QUESTIONS,
) -> KnowledgeMap:
    """The probe as the CLI runs it: build a greedy backend, probe, write ``out``.

    ``data`` is a run folder (its ``shards/``) or a shards folder. With ``endpoint`` (an
    OpenAI-compatible base URL) the model asked is ``served_model`` (else ``model``), with the
    key read from the environment variable ``api_key_env``; otherwise ``model`` (a hub id or
    folder) runs in process (:class:`TransformersBackend` on ``device``, ``max_pixels`` for
    Qwen-VL processors). ``text_model`` replaces the default text embedder; ``cache_dir`` keeps
    replies so a rerun does not ask twice. ``thresholds`` (four bounds, or ``"0.7,0.45,0.3,0.1"``)
    and ``min_questions`` are checked before any model loads. Returns the map it wrote.
    """
    from groundforge.annotators.teacher.types import Sampling
    from groundforge.outputs.shards import shards_folder

    if isinstance(thresholds, str):
        thresholds = parse_thresholds(thresholds)
    thresholds = check_thresholds(thresholds)
    check_min_questions(min_questions, per_entity)

    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=seed)
    cache = None
    if cache_dir:
        from groundforge.annotators.teacher.cache import ReplyCache

        cache = ReplyCache(cache_dir)
    if endpoint:
        name = served_model or model
        if not name:
            raise ValueError("an endpoint needs the model it serves: pass served_model (or model)")
        from groundforge.annotators.teacher.client import OpenAIBackend
        from groundforge.annotators.teacher.types import EndpointSettings

        backend: Any = OpenAIBackend(
            EndpointSettings(
                base_url=endpoint,
                model=name,
                api_key_env=api_key_env,
                sampling=sampling,
                max_concurrency=max_concurrency,
                timeout=timeout,
            ),
            cache=cache,
        )
    elif model:
        from groundforge.annotators.teacher.embedded import TransformersBackend

        backend = TransformersBackend(
            model,
            sampling=sampling,
            batch_size=batch_size,
            device=device,
            cache=cache,
            max_pixels=max_pixels,
        )
    else:
        raise ValueError("give a model to run in process, or an endpoint (and served_model)")
    text_embedder = None
    if text_model:
        from groundforge.annotators.embed import TextEmbedder

        text_embedder = TextEmbedder(text_model)
    try:
        knowledge = probe(
            shards_folder(data),
            backend,
            per_entity=per_entity,
            seed=seed,
            text_embedder=text_embedder,
            progress=progress,
            batch_size=max(batch_size, max_concurrency) if endpoint else batch_size,
            thresholds=thresholds,
            min_questions=min_questions,
        )
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    knowledge.save(out)
    return knowledge
