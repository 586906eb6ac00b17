"""Annotation files as sources: COCO instances JSON and CrowdHuman ``.odgt``.

Both give one :class:`SourceItem` per image, pointing at the image file (``location``; the read
stage reads it, so a missing file is rejected there as ``not_found``) and carrying the image's
annotated objects as :class:`Instance` s. ``boxes`` holds the boxes of the non-ignored instances
(the ground truth); ignore regions and COCO ``iscrowd`` annotations are instances with
``ignore=True``, never boxes. Boxes are stored as pixel ``xyxy``; both formats give ``[x, y, w,
h]``.

An annotation that cannot become an instance is left out of the item and counted, by reason, in
the item's ``dropped_instances`` (carried onto the record, and into the rejection's detail if the
record is dropped later):

- ``malformed``: not an object, or a box that is not 4 finite numbers.
- ``missing_box``: the box is absent (a COCO annotation without ``bbox``, an ``.odgt`` entry
  without the box ``box`` chose).
- ``degenerate``: zero or negative width or height.
- ``unknown_category``: a COCO ``category_id`` not listed in ``categories``.
- ``outside_image``: nothing of the box lies inside the image. COCO boxes are clipped to the
  ``width``/``height`` the JSON gives; :func:`groundforge.filters.instances.check_instances`
  clips every box again to the decoded image, the only size an ``.odgt`` file has.

An entry that cannot be an item at all becomes an item with ``error`` set, which the read stage
rejects as ``bad_annotation`` with that text: an ``.odgt`` line that is not JSON or has no
``ID`` or no ``gtboxes`` list, a COCO image entry without ``id``/``file_name`` or with an ``id``
listed twice, annotations naming an image that ``images`` does not list (one item per such
image id), and annotations with no usable ``image_id`` (one item for all of them). Annotations
of categories (COCO) or tags (``.odgt``) the recipe did not ask for are not read at all.

A file that is not an annotation file (not JSON, no ``images`` list, a broken ``categories``
list, a category the recipe names that the file lacks) raises ``ValueError`` naming the file in
:meth:`partitions`, on the driver, before any worker starts. Annotation files are read from
local paths; images from anywhere the read stage reaches (``gs://`` ...).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from groundforge.filters.instances import OUTSIDE_IMAGE, add_counts, fit_instances
from groundforge.schemas.box import Box
from groundforge.schemas.records import Instance, SourceItem

ODGT_BOXES = {"full": "fbox", "visible": "vbox", "head": "hbox"}
ODGT_IGNORE_TAG = "mask"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_key(value: Any) -> bool:
    """An id usable as a dict key: a string or an integer (never a bool)."""
    return isinstance(value, str | int) and not isinstance(value, bool)


def _lookup(mapping: dict[Any, str], key: Any) -> str | None:
    """``mapping[key]``, or None when absent or when ``key`` cannot be an id at all."""
    return mapping.get(key) if _is_key(key) else None


def _xywh(value: Any) -> tuple[Box | None, str | None]:
    """``(box, None)`` from ``[x, y, w, h]``, or ``(None, reason)`` when it is no usable box."""
    if not (isinstance(value, list | tuple) and len(value) == 4 and all(map(_is_number, value))):
        return None, "malformed"
    x, y, w, h = value
    if w <= 0 or h <= 0:
        return None, "degenerate"
    return Box.from_xywh(x, y, w, h), None


def _counts(counter: Counter) -> dict[str, int]:
    return dict(sorted(counter.items()))


def _entity(instances: tuple[Instance, ...]) -> str:
    """The label every truth shares, or empty when they differ (or there are none)."""
    labels = {i.label for i in instances if not i.ignore}
    return labels.pop() if len(labels) == 1 else ""


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _check_paths(annotations: str, images: str) -> None:
    if not os.path.isfile(annotations):
        raise FileNotFoundError(
            f"annotation file {annotations} does not exist; check the source's `annotations` "
            "(a recipe's relative path is resolved against the recipe file's folder)"
        )
    if "://" not in images and not os.path.isdir(images):
        raise FileNotFoundError(
            f"image folder {images} does not exist; point the source's `images` at the folder "
            "holding the annotated images"
        )


# ---------------------------------------------------------------- CrowdHuman .odgt


@dataclass
class OdgtSource:
    """A CrowdHuman ``.odgt`` file: one JSON object per line, ``{"ID", "gtboxes": [...]}``, the
    image of a line at ``<images>/<ID><image_extension>``.

    ``box`` picks the ground truth of each ``gtboxes`` entry: ``full`` (``fbox``), ``visible``
    (``vbox``) or ``head`` (``hbox``); every instance also keeps ``fbox`` as ``full`` and
    ``vbox`` as ``visible`` when they are valid boxes. Only entries whose ``tag`` is ``tag`` are
    read, plus the ignore regions (``tag: mask``, whose box is always their ``fbox``: a region,
    not a part of an object). An entry is an ignore instance when it is a ``mask``, when
    ``extra.ignore`` is 1, or, for ``box: head``, when ``head_attr.ignore`` is 1.

    The file is streamed: :meth:`partitions` scans it once for line offsets, each worker seeks to
    its range and parses only those lines. Blank lines are skipped.

    >>> src = OdgtSource("annotation_train.odgt", "Images", "person")  # doctest: +SKIP
    >>> items = [i for part in src.partitions() for i in src.items(part)]  # doctest: +SKIP
    """

    annotations: str
    images: str
    domain: str
    box: str = "full"
    tag: str = "person"
    image_extension: str = ".jpg"
    lines_per_partition: int = 256
    license: str = ""
    source: str = "odgt"

    def __post_init__(self) -> None:
        if self.box not in ODGT_BOXES:
            raise ValueError(f"box must be one of {tuple(ODGT_BOXES)}, got {self.box!r}")
        if self.lines_per_partition < 1:
            raise ValueError(
                f"lines_per_partition must be at least 1, got {self.lines_per_partition}"
            )
        # Absolute now, on the driver, so workers started in another directory find the files.
        self.annotations = _absolute(self.annotations)
        self.images = _absolute(self.images)

    def partitions(self) -> list[tuple[int, int, int]]:
        """Line ranges ``(first, stop, offset)``: 0-based line numbers and the byte offset of
        line ``first``, ``lines_per_partition`` lines each (run on the driver)."""
        _check_paths(self.annotations, self.images)
        step = self.lines_per_partition
        starts: list[tuple[int, int]] = []
        n = offset = 0
        with open(self.annotations, "rb") as fh:
            for line in fh:
                if n % step == 0:
                    starts.append((n, offset))
                offset += len(line)
                n += 1
        return [(first, min(first + step, n), at) for first, at in starts]

    def items(self, part: tuple[int, int, int]) -> Iterator[SourceItem]:
        """One :class:`SourceItem` per non-blank line of a range from :meth:`partitions`."""
        first, stop, offset = part
        with open(self.annotations, "rb") as fh:
            fh.seek(offset)
            for index in range(first, stop):
                line = fh.readline()
                if line.strip():
                    yield self._item(index + 1, line)

    def _bad(self, item_id: str, location: str, error: str) -> SourceItem:
        return SourceItem(
            item_id=item_id, location=location, domain=self.domain, source=self.source, error=error
        )

    def _item(self, lineno: int, line: bytes) -> SourceItem:
        where = f"{self.annotations} line {lineno}"
        try:
            entry = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            return self._bad(f"line {lineno}", self.annotations, f"{where}: not JSON ({e})")
        if not isinstance(entry, dict):
            kind = type(entry).__name__
            return self._bad(
                f"line {lineno}", self.annotations, f"{where}: a {kind}, not an object"
            )
        image_id = entry.get("ID")
        if not _is_key(image_id) or image_id == "":
            return self._bad(f"line {lineno}", self.annotations, f"{where}: no ID")
        item_id = str(image_id)
        location = os.path.join(self.images, item_id + self.image_extension)
        gtboxes = entry.get("gtboxes")
        if not isinstance(gtboxes, list):
            return self._bad(item_id, location, f"{where}: gtboxes is missing or not a list")
        dropped: Counter = Counter()
        instances = tuple(i for i in (self._instance(g, dropped) for g in gtboxes) if i is not None)
        return SourceItem(
            item_id=item_id,
            location=location,
            domain=self.domain,
            entity=self.tag,
            boxes=tuple(i.box for i in instances if not i.ignore),
            source=self.source,
            license=self.license,
            instances=instances,
            dropped_instances=_counts(dropped),
        )

    def _instance(self, entry: Any, dropped: Counter) -> Instance | None:
        if not isinstance(entry, dict):
            dropped["malformed"] += 1
            return None
        tag = entry.get("tag")
        region = tag == ODGT_IGNORE_TAG
        if not region and tag != self.tag:
            return None
        key = "fbox" if region else ODGT_BOXES[self.box]
        if key not in entry:
            dropped["missing_box"] += 1
            return None
        box, reason = _xywh(entry[key])
        if reason:
            dropped[reason] += 1
            return None
        extra = entry.get("extra") if isinstance(entry.get("extra"), dict) else {}
        head = entry.get("head_attr") if isinstance(entry.get("head_attr"), dict) else {}
        ignore = (
            region or extra.get("ignore") == 1 or (self.box == "head" and head.get("ignore") == 1)
        )
        return Instance(
            box=box,
            label=tag,
            full=_xywh(entry.get("fbox"))[0],
            visible=_xywh(entry.get("vbox"))[0],
            ignore=bool(ignore),
        )


# ---------------------------------------------------------------- COCO


@dataclass(frozen=True)
class CocoIndex:
    """A COCO file's annotations grouped by image, as one worker holds them.

    ``entries`` lists what becomes an item, in order: ``("image", i)`` for ``images[i]``,
    ``("orphan", image_id)`` for an image id that annotations name but ``images`` lacks, and
    ``("unattributed", None)`` once when some annotations have no usable ``image_id``.
    """

    images: list[Any]
    by_image: dict[Any, list[dict]]
    categories: dict[Any, str]
    licenses: dict[Any, str]
    first_index: dict[Any, int]
    entries: list[tuple[str, Any]]
    unattributed: int


def _load_json(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({e}); give a COCO instances file") from e


def _categories(data: dict, path: str) -> dict[Any, str]:
    cats = data.get("categories", [])
    if not isinstance(cats, list):
        raise ValueError(f"{path}: `categories` is not a list")
    names: dict[Any, str] = {}
    for n, cat in enumerate(cats):
        if not (
            isinstance(cat, dict) and _is_key(cat.get("id")) and isinstance(cat.get("name"), str)
        ):
            raise ValueError(f"{path}: categories[{n}] needs an `id` and a `name`, got {cat!r}")
        names[cat["id"]] = cat["name"]
    return names


def load_coco(path: str, wanted: tuple[str, ...] | None) -> CocoIndex:
    """Parse a COCO instances file into a :class:`CocoIndex` keeping the ``wanted`` categories
    (all when None); raises ``ValueError`` naming the file when it is not one."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: no `images` list; give a COCO instances file")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: `annotations` is not a list")
    categories = _categories(data, path)
    if wanted is not None:
        missing = sorted(set(wanted) - set(categories.values()))
        if missing:
            raise ValueError(
                f"{path} has no categories {missing}; its categories are "
                f"{sorted(set(categories.values()))}"
            )
    kept_names = set(categories.values()) if wanted is None else set(wanted)
    images = data["images"]
    first_index: dict[Any, int] = {}
    for i, image in enumerate(images):
        if isinstance(image, dict) and _is_key(image.get("id")):
            first_index.setdefault(image["id"], i)
    by_image: dict[Any, list[dict]] = {}
    unattributed = 0
    for ann in annotations:
        name = _lookup(categories, ann.get("category_id")) if isinstance(ann, dict) else None
        if name is not None and name not in kept_names:
            continue
        if not (isinstance(ann, dict) and _is_key(ann.get("image_id"))):
            unattributed += 1
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    orphans = sorted((k for k in by_image if k not in first_index), key=repr)
    entries = [("image", i) for i in range(len(images))]
    entries += [("orphan", k) for k in orphans]
    if unattributed:
        entries.append(("unattributed", None))
    listed = data.get("licenses")
    licenses = {
        lic["id"]: lic["name"]
        for lic in (listed if isinstance(listed, list) else [])
        if isinstance(lic, dict) and _is_key(lic.get("id")) and isinstance(lic.get("name"), str)
    }
    return CocoIndex(images, by_image, categories, licenses, first_index, entries, unattributed)


@dataclass
class CocoSource:
    """A COCO instances file (``images``, ``annotations`` with ``bbox`` ``[x, y, w, h]``,
    ``category_id`` and ``iscrowd``, ``categories``) and the folder its ``file_name`` s are in.

    ``categories`` names the categories to keep (None: all). An instance's ``label`` is its
    category's name; an item's ``entity`` is the name its truths share (empty when they differ).
    ``license`` is the image's licence name from the file's ``licenses`` when it gives one, this
    source's ``license`` otherwise; ``url`` is the image's ``coco_url`` or ``flickr_url``.

    Items are addressed by their index in :attr:`CocoIndex.entries`; each worker process parses
    the file once and holds its annotations (never the images) in memory.

    >>> src = CocoSource("instances_val2017.json", "val2017", "person")  # doctest: +SKIP
    >>> items = [i for part in src.partitions() for i in src.items(part)]  # doctest: +SKIP
    """

    annotations: str
    images: str
    domain: str
    categories: tuple[str, ...] | None = None
    images_per_partition: int = 512
    license: str = ""
    source: str = "coco"
    # The parsed file, once per process; never pickled (workers parse their own).
    _index: CocoIndex | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images_per_partition < 1:
            raise ValueError(
                f"images_per_partition must be at least 1, got {self.images_per_partition}"
            )
        if self.categories is not None:
            self.categories = tuple(self.categories)
        # Absolute now, on the driver, so workers started in another directory find the files.
        self.annotations = _absolute(self.annotations)
        self.images = _absolute(self.images)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None}

    def index(self) -> CocoIndex:
        """The parsed annotations (loaded once per process)."""
        if self._index is None:
            self._index = load_coco(self.annotations, self.categories)
        return self._index

    def partitions(self) -> list[tuple[int, int]]:
        """Entry ranges ``(start, stop)`` of ``images_per_partition`` entries (run on the
        driver; a file that is not a COCO file fails here)."""
        _check_paths(self.annotations, self.images)
        n = len(self.index().entries)
        step = self.images_per_partition
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def items(self, part: tuple[int, int]) -> Iterator[SourceItem]:
        """One :class:`SourceItem` per entry of a range from :meth:`partitions`."""
        index = self.index()
        for kind, key in index.entries[part[0] : part[1]]:
            if kind == "image":
                yield self._image_item(index, key)
            elif kind == "orphan":
                n = len(index.by_image[key])
                yield self._bad(
                    f"image_id {key!r}",
                    f"{self.annotations}: {n} annotations name image id {key!r}, which "
                    "`images` does not list",
                )
            else:
                yield self._bad(
                    "annotations without image_id",
                    f"{self.annotations}: {index.unattributed} annotations have no usable "
                    "`image_id` (or are not objects)",
                )

    def _bad(self, item_id: str, error: str) -> SourceItem:
        return SourceItem(
            item_id=item_id,
            location=self.annotations,
            domain=self.domain,
            source=self.source,
            error=error,
        )

    def _image_item(self, index: CocoIndex, i: int) -> SourceItem:
        image = index.images[i]
        where = f"{self.annotations}: images[{i}]"
        if not (
            isinstance(image, dict)
            and _is_key(image.get("id"))
            and isinstance(image.get("file_name"), str)
            and image["file_name"]
        ):
            return self._bad(f"images[{i}]", f"{where} needs an `id` and a `file_name`")
        image_id = image["id"]
        first = index.first_index[image_id]
        if first != i:
            return self._bad(
                f"images[{i}]", f"{where}: id {image_id!r} is already used by images[{first}]"
            )
        dropped: Counter = Counter()
        instances: list[Instance] = []
        for ann in index.by_image.get(image_id, []):
            label = _lookup(index.categories, ann.get("category_id"))
            if label is None:
                dropped["unknown_category"] += 1
                continue
            if "bbox" not in ann:
                dropped["missing_box"] += 1
                continue
            box, reason = _xywh(ann["bbox"])
            if reason:
                dropped[reason] += 1
                continue
            instances.append(Instance(box=box, label=label, ignore=ann.get("iscrowd") == 1))
        counts = _counts(dropped)
        kept = tuple(instances)
        width, height = image.get("width"), image.get("height")
        declared = None
        if _is_number(width) and _is_number(height) and width > 0 and height > 0:
            kept, _, outside = fit_instances(kept, width, height)
            counts = add_counts(counts, OUTSIDE_IMAGE, outside)
            declared = (int(width), int(height))
        url = image.get("coco_url") or image.get("flickr_url") or ""
        return SourceItem(
            item_id=str(image_id),
            location=os.path.join(self.images, *image["file_name"].split("/")),
            domain=self.domain,
            entity=_entity(kept),
            boxes=tuple(inst.box for inst in kept if not inst.ignore),
            source=self.source,
            license=_lookup(index.licenses, image.get("license")) or self.license,
            url=url if isinstance(url, str) else "",
            instances=kept,
            dropped_instances=counts,
            declared_size=declared,
        )
