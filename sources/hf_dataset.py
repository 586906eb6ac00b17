"""A Hugging Face dataset as a source: one :class:`SourceItem` per row, image bytes undecoded.

``path`` may be

- a folder written by ``save_to_disk`` (it holds ``dataset_info.json`` or ``dataset_dict.json``):
  read with ``datasets.load_from_disk``; of a ``DatasetDict`` the ``split`` is taken, a single
  saved ``Dataset`` is used whole;
- a data file or glob ending in ``.parquet``, ``.arrow``, ``.csv``, ``.json`` or ``.jsonl``:
  ``load_dataset(<format>, data_files={split: path})``;
- anything else (a local data folder, a hub name): ``load_dataset(path, name, split=split)``.

Rows are addressed by index: :meth:`HFDatasetSource.partitions` gives ``(start, stop)`` ranges,
and each worker loads the dataset once (memory-mapped) and reads its ranges.

Images are read as bytes, never decoded here. A row whose image has only a ``path`` is read from
that file (relative paths are taken from the dataset folder); its ``location`` is that file, so a
file that cannot be read is rejected by :func:`groundforge.sources.read.read_item` as
``not_found`` / ``unreadable``. Any other row's ``location`` is ``<path>#<split>/<index>``; a row
with no image at all is rejected there as ``missing_image``.

Boxes (``box_column``; ``a.b`` reaches a field ``b`` nested in column ``a``, as in COCO-style
``objects.bbox``) may hold one box of 4 numbers or a list of them, in ``box_format`` ``xyxy`` or
``xywh``. They are stored as pixel ``xyxy``: ``norm01`` boxes are scaled by the image's size, read
from its header (nothing is decoded). When no size can be read the row gets no boxes; such bytes
are not an image the image filter would keep anyway. A value that is not a box (``[1, 2]``, a
string, corners out of order) makes that row a ``bad_annotation`` rejection naming the row; when
none of the first rows has a readable box, :meth:`partitions` raises ``ValueError`` before any
work starts: that is a wrong ``box_column`` or ``box_format``, not a bad row.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from groundforge.schemas.box import Box
from groundforge.schemas.records import SourceItem
from groundforge.sources.read import read_location

DATA_FILE_FORMATS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json")
_BOX_FORMATS = ("xyxy", "xywh")
_BOX_SCALES = ("pixel", "norm01")
# Rows fetched from Arrow at a time: bounds memory when rows carry large images.
_READ_BATCH = 64


@dataclass
class HFDatasetSource:
    """Rows of one split of a Hugging Face dataset (see the module docstring for ``path``).

    >>> src = HFDatasetSource("out/birds", entity_column="label", domain="bird")  # doctest: +SKIP
    >>> items = [i for part in src.partitions() for i in src.items(part)]  # doctest: +SKIP
    """

    path: str
    split: str = "train"
    name: str | None = None
    image_column: str = "image"
    entity_column: str | None = None
    domain: str = ""
    domain_column: str | None = None
    box_column: str | None = None
    box_format: str = "xyxy"
    box_scale: str = "pixel"
    id_column: str | None = None
    license: str = ""
    rows_per_partition: int = 512
    source: str = "hf_dataset"
    # The loaded dataset, once per process; never pickled (workers load their own).
    _dataset: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.box_format not in _BOX_FORMATS:
            raise ValueError(f"box_format must be one of {_BOX_FORMATS}, got {self.box_format!r}")
        if self.box_scale not in _BOX_SCALES:
            raise ValueError(f"box_scale must be one of {_BOX_SCALES}, got {self.box_scale!r}")
        if self.rows_per_partition < 1:
            raise ValueError(
                f"rows_per_partition must be at least 1, got {self.rows_per_partition}"
            )
        # Absolute now, on the driver, so workers started in another directory find the data.
        if self._is_local():
            self.path = os.path.abspath(os.path.expanduser(self.path))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}

    def _is_local(self) -> bool:
        p = self.path
        return (
            os.path.exists(p)
            or p.startswith(("/", "./", "../", "~"))
            or os.path.splitext(p)[1].lower() in DATA_FILE_FORMATS
        )

    def _load(self):
        import datasets

        p = self.path
        if os.path.isdir(p) and any(os.path.isfile(os.path.join(p, m)) for m in SAVED_MARKERS):
            ds = datasets.load_from_disk(p)
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise ValueError(
                        f"dataset {p} has no split {self.split!r}; its splits are {sorted(ds)}"
                    )
                ds = ds[self.split]
            return ds
        data_format = DATA_FILE_FORMATS.get(os.path.splitext(p)[1].lower())
        if data_format:
            return datasets.load_dataset(
                data_format, self.name, data_files={self.split: p}, split=self.split
            )
        if self._is_local() and not os.path.exists(p):
            raise FileNotFoundError(
                f"dataset {p} does not exist; give a folder written by save_to_disk, a data "
                "folder, data files (*.parquet ...) or a hub dataset name"
            )
        return datasets.load_dataset(p, self.name, split=self.split)

    def _prepare(self, ds):
        import datasets

        wanted = {
            "image_column": self.image_column,
            "entity_column": self.entity_column,
            "domain_column": self.domain_column,
            "box_column": self.box_column.split(".")[0] if self.box_column else None,
            "id_column": self.id_column,
        }
        for setting, column in wanted.items():
            if column is not None and column not in ds.column_names:
                raise ValueError(
                    f"dataset {self.path} (split {self.split!r}) has no column {column!r} "
                    f"(from {setting}); its columns are {ds.column_names}"
                )
        ds = ds.select_columns(list(dict.fromkeys(c for c in wanted.values() if c)))
        feature = ds.features[self.image_column]
        if not (isinstance(feature, datasets.Image) and not feature.decode):
            try:
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            except Exception as e:
                raise ValueError(
                    f"column {self.image_column!r} of dataset {self.path} holds {feature}, "
                    f"not images; set image_column to the image column ({e})"
                ) from e
        return ds

    def dataset(self):
        """The split, with only the columns used and the image column undecoded (loaded once)."""
        if self._dataset is None:
            self._dataset = self._prepare(self._load())
        return self._dataset

    def partitions(self) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of ``rows_per_partition`` rows (run on the driver)."""
        ds = self.dataset()
        n = len(ds)
        if n and self.box_column:
            # A wrong box_column/box_format fails here, before any worker starts: when none of
            # the first rows has a readable box. One malformed row is that row's rejection.
            errors = []
            for index in range(min(n, _CHECKED_ROWS)):
                try:
                    self._boxes(ds[index], index, None)
                    break
                except ValueError as err:
                    errors.append(err)
            else:
                raise errors[0]
        step = self.rows_per_partition
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def items(self, part: tuple[int, int]) -> Iterator[SourceItem]:
        """One :class:`SourceItem` per row of a range from :meth:`partitions`."""
        ds = self.dataset()
        start, stop = part
        for lo in range(start, stop, _READ_BATCH):
            hi = min(lo + _READ_BATCH, stop)
            batch = ds[lo:hi]
            for k, index in enumerate(range(lo, hi)):
                yield self._item(index, {c: values[k] for c, values in batch.items()})

    def _item(self, index: int, row: dict[str, Any]) -> SourceItem:
        image = row[self.image_column] or {}
        data, location = image.get("bytes"), f"{self.path}#{self.split}/{index}"
        if data is None and image.get("path"):
            location = self._resolve(image["path"])
            try:
                data = read_location(location)
            except Exception:  # left for read_item, which reads it again and says why
                data = None
        item_id = row[self.id_column] if self.id_column else None
        try:
            boxes, error = self._boxes(row, index, data), ""
        except ValueError as err:  # this row's box is malformed: its rejection, not the run's end
            boxes, error = (), str(err)
        return SourceItem(
            item_id=str(item_id) if item_id is not None else f"{self.split}/{index}",
            location=location,
            domain=self._label(self.domain_column, row) or self.domain,
            entity=self._label(self.entity_column, row),
            boxes=boxes,
            source=self.source,
            license=self.license,
            data=data,
            error=error,
        )

    def _resolve(self, image_path: str) -> str:
        if "://" in image_path or os.path.isabs(image_path) or not os.path.isdir(self.path):
            return image_path
        return os.path.join(self.path, image_path)

    def _label(self, column: str | None, row: dict[str, Any]) -> str:
        import datasets

        if column is None or row[column] is None:
            return ""
        value, feature = row[column], self._dataset.features[column]
        if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
            return feature.int2str(value) if value >= 0 else ""  # -1: no label
        return str(value)

    def _boxes(self, row: dict[str, Any], index: int, data: bytes | None) -> tuple[Box, ...]:
        if self.box_column is None:
            return ()
        value = _dig(row, self.box_column.split("."))
        if not value:
            return ()
        values = [value] if _is_box(value) else value
        if not all(_is_box(v) for v in values):
            raise ValueError(
                f"dataset {self.path} row {self.split}/{index}: {self.box_column} = {value!r} is "
                f"neither a box of 4 numbers nor a list of them; check box_column"
            )
        make = Box.from_xywh if self.box_format == "xywh" else Box.from_corners
        boxes = tuple(make(*v) for v in values)
        if self.box_scale == "norm01":
            size = image_size(data)
            if size is None:
                return ()
            boxes = tuple(b.scale(size[0], size[1]) for b in boxes)
        return boxes


_CHECKED_ROWS = 8


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, numbers.Real) for v in value)
    )


def _dig(row: dict[str, Any], parts: list[str]) -> Any:
    """``row["objects"]["bbox"]`` for ``["objects", "bbox"]``, across lists of structs too."""
    value = row[parts[0]]
    for part in parts[1:]:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            value = [v.get(part) if isinstance(v, dict) else None for v in value]
        else:
            return None
    return value


def image_size(data: bytes | None) -> tuple[int, int] | None:
    """``(width, height)`` from an image's header without decoding it; None when unreadable."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # any bytes PIL cannot identify
        return None
