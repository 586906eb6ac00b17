"""Annotated instances against the decoded image: clip them to it, drop what falls outside.

:func:`check_instances` is a filter (``record -> Verdict``) for records of annotation sources
(:mod:`groundforge.sources.annotations`); it runs after :func:`groundforge.filters.image.
check_image`, which sets the image's true size.

Each instance's ``box`` and ``visible`` box are clipped to the image. ``full`` is kept as given:
it is the whole extent of a partly hidden object and may rightly reach past the image edge. An
instance whose ``box`` has no area left is dropped and counted under ``outside_image`` in the
record's ``dropped_instances``; a ``visible`` box with no area left becomes None.

Drop reason: ``no_instances``, when no ground-truth (non-ignored) instance remains. Metrics, kept
or dropped: ``instances``, ``truths``, ``ignored``, ``clipped`` (instances whose box was cut),
``dropped_instances`` (every instance the record lost, by reason, the source's included) and,
when the annotation file gives another size than the decoded image has, ``declared_size`` and
``size_mismatch`` (its boxes were then clipped to the declared size, and again to the real one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from groundforge.filters.verdict import Verdict
from groundforge.schemas.box import Box
from groundforge.schemas.records import ImageRecord, Instance

OUTSIDE_IMAGE = "outside_image"


def _inside(box: Box | None, width: float, height: float) -> Box | None:
    if box is None:
        return None
    clipped = box.clip(width, height)
    return None if clipped.is_degenerate else clipped


def fit_instances(
    instances: Iterable[Instance], width: float, height: float
) -> tuple[tuple[Instance, ...], int, int]:
    """Clip instances to a ``width`` x ``height`` image (see the module docstring).

    Returns ``(kept, clipped, outside)``: the instances that keep an area, how many of them had
    their box cut, and how many were dropped because nothing of their box is inside.

    >>> kept, clipped, outside = fit_instances(
    ...     [Instance(Box(-5, 0, 10, 10)), Instance(Box(50, 50, 60, 60))], 20, 20
    ... )
    >>> [i.box.to_list() for i in kept], clipped, outside
    ([[0.0, 0.0, 10.0, 10.0]], 1, 1)
    """
    kept: list[Instance] = []
    clipped = outside = 0
    for instance in instances:
        box = _inside(instance.box, width, height)
        if box is None:
            outside += 1
            continue
        if box != instance.box:
            clipped += 1
        kept.append(replace(instance, box=box, visible=_inside(instance.visible, width, height)))
    return tuple(kept), clipped, outside


def add_counts(counts: dict[str, int], reason: str, n: int) -> dict[str, int]:
    """``counts`` with ``n`` more under ``reason`` (a new dict; unchanged when ``n`` is 0)."""
    return {**counts, reason: counts.get(reason, 0) + n} if n else counts


def check_instances(record: ImageRecord) -> Verdict:
    """Fit the record's instances to its decoded image; drop it when no truth remains.

    A kept verdict's ``value`` has the clipped ``instances``, ``boxes`` set to the remaining
    truths and ``dropped_instances`` updated.
    """
    if record.width <= 0 or record.height <= 0:
        raise ValueError("check_instances needs a decoded record (run check_image first)")
    kept, clipped, outside = fit_instances(record.instances, record.width, record.height)
    dropped = add_counts(record.dropped_instances, OUTSIDE_IMAGE, outside)
    truths = tuple(i.box for i in kept if not i.ignore)
    metrics = {
        "instances": len(kept),
        "truths": len(truths),
        "ignored": len(kept) - len(truths),
        "clipped": clipped,
        "dropped_instances": dropped,
    }
    declared = record.declared_size
    if declared is not None and tuple(declared) != (record.width, record.height):
        metrics.update(size_mismatch=True, declared_size=list(declared))
    if not truths:
        return Verdict.drop("no_instances", **metrics)
    fitted = replace(record, instances=kept, boxes=truths, dropped_instances=dropped)
    return Verdict.ok(fitted, **metrics)
