"""What a student gets wrong on a run's split, and the focus that asks for more of it.

Each scored grounding item becomes an :class:`Outcome`: its target entity, the other entities of
its scene, its IoU, whether it is correct, and which other entity the student *picked* when its
box matches that entity's box (IoU at the threshold or more) better than the target's. Outcomes
add up to per-entity :class:`EntityScore` rows (accuracy and the entities it was taken for) and
to error rates per layout and per scene size. :func:`allocate` shares a budget of extra scenes
among the failed entities, and :func:`focus_section` writes the recipe's ``scenes.focus``.

Everything here is pure: no model, no Beam, no files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from groundforge.schemas.box import Box
from groundforge.trainer.kvgbench_score import CORRECT_IOU


@dataclass(frozen=True)
class Outcome:
    """One scored item of the split (see the module docstring)."""

    sample_id: str
    entity: str
    others: tuple[str, ...]
    layout: str
    iou: float
    correct: bool
    picked: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def k(self) -> int:
        return len(self.others) + 1


def _pixels(box: Sequence[float], frame: str, width: int, height: int) -> Box:
    if frame == "norm1000":
        x1, y1, x2, y2 = box
        return Box.from_corners(
            x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000
        )
    return Box.from_corners(*box)


def picked_entity(
    box: Sequence[float] | None,
    frame: str,
    sample: Any,
    threshold: float = CORRECT_IOU,
) -> str | None:
    """The entity of ``sample``'s scene other than its target whose box the predicted ``box``
    (in ``frame``: ``norm1000`` or ``pixel``) matches best, when that match is at ``threshold``
    or more and better than the match with the target; else None."""
    if box is None or len(box) != 4:
        return None
    try:
        pred = _pixels(box, frame, sample.width, sample.height)
    except ValueError:
        return None
    target = max((pred.iou(b) for b in sample.gt_boxes), default=0.0)
    best, name = 0.0, None
    for entity in sample.entities:
        if entity.name == sample.target:
            continue
        iou = pred.iou(entity.box)
        if iou > best:
            best, name = iou, entity.name
    return name if best >= threshold and best > target else None


def outcome(
    sample: Any, prediction: Any, reply: Any = None, threshold: float = CORRECT_IOU
) -> Outcome:
    """The :class:`Outcome` of ``sample`` (a grounding :class:`KVGSample`) scored as
    ``prediction`` (a :class:`~groundforge.trainer.evaluate.Prediction`); ``reply`` (its
    :class:`TeacherReply`) gives the tokens it cost."""
    box = prediction.boxes[0] if prediction.boxes else None
    picked = None if prediction.correct else picked_entity(box, prediction.frame, sample, threshold)
    return Outcome(
        sample_id=sample.sample_id,
        entity=sample.target,
        others=tuple(e.name for e in sample.entities if e.name != sample.target),
        layout=sample.provenance.layout,
        iou=float(prediction.iou or 0.0),
        correct=bool(prediction.correct),
        picked=picked,
        prompt_tokens=int(getattr(reply, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(reply, "completion_tokens", 0) or 0),
    )


@dataclass
class EntityScore:
    """One target entity's items: how many, how many correct, the IoU sum, the entities it was
    taken for (by count) and the tokens its requests cost."""

    entity: str
    items: int = 0
    correct: int = 0
    iou_sum: float = 0.0
    picked: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def failed(self) -> int:
        return self.items - self.correct

    @property
    def accuracy(self) -> float:
        return self.correct / self.items if self.items else 0.0

    def confused_with(self) -> list[str]:
        """The entities it was taken for, most often first (ties by name)."""
        return [name for name, _ in sorted(self.picked.items(), key=lambda kv: (-kv[1], kv[0]))]


def entity_scores(outcomes: Iterable[Outcome]) -> dict[str, EntityScore]:
    """Per target entity, sorted by name."""
    scores: dict[str, EntityScore] = {}
    for o in outcomes:
        score = scores.setdefault(o.entity, EntityScore(o.entity))
        score.items += 1
        score.correct += o.correct
        score.iou_sum += o.iou
        score.prompt_tokens += o.prompt_tokens
        score.completion_tokens += o.completion_tokens
        if o.picked is not None:
            score.picked[o.picked] += 1
    return dict(sorted(scores.items()))


def error_weights(outcomes: Iterable[Outcome], key: str, allowed: Iterable) -> dict:
    """Per value of ``key`` (``layout`` or ``k``) among ``allowed``: the student's error rate
    there, smoothed as ``(failed + 1) / (items + 2)``, so a value never seen weighs 1/2 and every
    weight stays above 0.

    >>> outs = [Outcome("a", "A", ("B",), "grid", 0.0, False), Outcome("b", "B", ("A",), "grid",
    ...         1.0, True), Outcome("c", "C", ("A",), "random", 0.0, False)]
    >>> error_weights(outs, "layout", ["grid", "random", "vertical"])
    {'grid': 0.5, 'random': 0.6667, 'vertical': 0.5}
    """
    items: Counter = Counter()
    failed: Counter = Counter()
    for o in outcomes:
        value = getattr(o, key)
        items[value] += 1
        failed[value] += not o.correct
    return {v: round((failed[v] + 1) / (items[v] + 2), 4) for v in sorted(allowed)}


def allocate(scores: Mapping[str, EntityScore], budget: int) -> dict[str, int]:
    """Share ``budget`` extra scenes among the entities with a failed item: one each first
    (the most failed first, ties by name, while the budget lasts), the rest in proportion to
    their failed items (largest remainders first, ties by name).

    >>> s = {n: EntityScore(n, items=4, correct=c) for n, c in [("A", 0), ("B", 3), ("C", 4)]}
    >>> allocate(s, 7), allocate(s, 1)
    ({'A': 5, 'B': 2}, {'A': 1})
    """
    if budget < 0:
        raise ValueError(f"the budget must be at least 0 scenes, got {budget}")
    failed = sorted(
        ((s.failed, name) for name, s in scores.items() if s.failed > 0),
        key=lambda f: (-f[0], f[1]),
    )
    if not failed or budget == 0:
        return {}
    shares = {name: 1 for _, name in failed[:budget]}
    rest = budget - len(shares)
    if rest == 0:
        return dict(sorted(shares.items()))
    total = sum(n for n, _ in failed)
    exact = {name: rest * n / total for n, name in failed}
    for name, value in exact.items():
        shares[name] += int(value)
    left = rest - sum(int(v) for v in exact.values())
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - int(exact[name])), name))
    for name in by_remainder[:left]:
        shares[name] += 1
    return dict(sorted(shares.items()))


def default_budget(scores: Mapping[str, EntityScore]) -> int:
    """Two extra scenes per failed item."""
    return 2 * sum(s.failed for s in scores.values())


def focus_section(
    scores: Mapping[str, EntityScore],
    shares: Mapping[str, int],
    outcomes: Sequence[Outcome],
    k_values: Iterable[int],
    layouts: Iterable[str],
    seed: str,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe's ``scenes.focus`` (as a dict) for ``shares``: added to the ``previous`` focus
    (scene counts summed, distractors merged with this round's first), with the entities each
    one was taken for, and sizes and layouts weighted by :func:`error_weights` over the recipe's
    ``k_values`` and ``layouts``."""
    previous = dict(previous or {})
    entities = dict(previous.get("entities") or {})
    for name, n in shares.items():
        entities[name] = entities.get(name, 0) + n
    distractors = {k: list(v) for k, v in (previous.get("distractors") or {}).items()}
    for name in shares:
        confused = scores[name].confused_with()
        if confused:
            merged = confused + [d for d in distractors.get(name, []) if d not in confused]
            distractors[name] = merged
    return {
        "entities": dict(sorted(entities.items())),
        "distractors": dict(sorted(distractors.items())),
        "hard_fraction": previous.get("hard_fraction", 1.0),
        "k_weights": {int(k): w for k, w in error_weights(outcomes, "k", k_values).items()},
        "layout_weights": error_weights(outcomes, "layout", layouts),
        "seed": seed,
    }
