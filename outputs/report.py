"""A self-contained HTML report of a run folder: funnel, sample gallery, rejections, distributions.

The page has no external resource (images are data URIs, CSS and JS are inline), so it can be
mailed, archived or opened from a bucket. Its images depend on the gallery's ``per_group`` and the
number of (domain, split) groups, never on the number of rows: the shards are streamed once, and
only the chosen samples keep their image bytes. Every rejection is listed, as pages of JSON rows
the page's script shows one at a time; the table is streamed into the page, never held whole.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markupsafe import Markup

from groundforge.outputs.previews import (
    PREVIEWS_FILE,
    PREVIEWS_PER_REASON,
    read_previews,
    thumbnail,
)
from groundforge.outputs.rejections import REJECTIONS_FILE
from groundforge.schemas.box import Box
from groundforge.schemas.codecs import PixelCodec, render_box_template
from groundforge.schemas.records import KVGSample, Rejection, RejectionPreview

REPORT_FILE = "report.html"
COLORS = {
    "gt": "#00c853",
    "candidate": "#ff9100",
    "teacher": "#d500f9",
    "uncertain": "#2979ff",
    "ignore": "#9e9e9e",
    "cause": "#ff1744",
}
LEGEND = (
    ("gt", "ground truth"),
    ("candidate", "annotator candidate"),
    ("teacher", "teacher's stated box"),
    ("uncertain", "uncertain region (detect)"),
    ("ignore", "ignore region (detect)"),
    ("cause", "cause of the drop"),
)
# Kinds that only samples have, and the one only drops have.
SAMPLE_ONLY = ("teacher", "uncertain", "ignore")
DETAILS_PER_REASON = 5
# Rejections per page of a reason's table.
PAGE_ROWS = 50
CHART_WIDTH = 360
HIST_BINS = 20
PIXEL = PixelCodec()


@dataclass(frozen=True)
class Rect:
    """A box to draw over an image, already in the frame of the image as displayed."""

    kind: str
    x: float
    y: float
    w: float
    h: float
    label: str = ""

    @property
    def color(self) -> str:
        return COLORS.get(self.kind, COLORS["cause"])


def _rect(kind: str, box: Box, sx: float, sy: float, label: str = "") -> Rect:
    shown = box.scale(sx, sy)
    return Rect(kind, shown.x1, shown.y1, shown.width, shown.height, label)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    width: float


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    bars: tuple[Bar, ...]


def chart(key: str, title: str, rows: list[tuple[str, float]]) -> Chart:
    """Horizontal bars of ``(label, value)`` rows, widths relative to the largest value."""
    top = max((v for _, v in rows), default=0) or 1
    return Chart(key, title, tuple(Bar(label, v, CHART_WIDTH * v / top) for label, v in rows))


def _unit_bin(value: float) -> int:
    return min(HIST_BINS - 1, max(0, int(value * HIST_BINS)))


def _unit_rows(counts: Counter) -> list[tuple[str, float]]:
    step = 1 / HIST_BINS
    return [(f"{i * step:.2f}-{(i + 1) * step:.2f}", counts[i]) for i in range(HIST_BINS)]


def _discrete_rows(counts: Counter) -> list[tuple[str, float]]:
    return [(str(n), c) for n, c in sorted(counts.items())]


def _length_rows(lengths: Counter) -> list[tuple[str, float]]:
    """Re-bin exact lengths into at most ``HIST_BINS`` equal-width bins over their range."""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // HIST_BINS))
    bins: Counter = Counter()
    for length, n in lengths.items():
        bins[(length - lo) // step] += n
    return [(f"{lo + i * step}-{lo + (i + 1) * step - 1}", bins[i]) for i in range(max(bins) + 1)]


@dataclass
class Distributions:
    """Counters over every sample of a run, updated one sample at a time (no image kept)."""

    targets: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    boxes_per_image: Counter = field(default_factory=Counter)
    box_size: Counter = field(default_factory=Counter)
    teacher_iou: Counter = field(default_factory=Counter)
    detector_iou: Counter = field(default_factory=Counter)
    rationale_chars: Counter = field(default_factory=Counter)
    k: Counter = field(default_factory=Counter)
    layout: Counter = field(default_factory=Counter)
    # Per (domain, entity): samples asking for it, and samples showing it (as any member).
    asked: Counter = field(default_factory=Counter)
    shown: Counter = field(default_factory=Counter)

    def add(self, s: KVGSample) -> None:
        self.targets[s.domain].add(s.target)
        self.asked[(s.domain, s.target)] += 1
        for name in {e.name for e in s.entities}:
            self.shown[(s.domain, name)] += 1
        self.boxes_per_image[len(s.gt_boxes)] += 1
        image_area = s.width * s.height
        for box in s.gt_boxes:
            if image_area > 0:
                self.box_size[_unit_bin(box.area / image_area)] += 1
        if s.teacher_iou is not None:
            self.teacher_iou[_unit_bin(s.teacher_iou)] += 1
        if s.detector_iou is not None:
            self.detector_iou[_unit_bin(s.detector_iou)] += 1
        if s.rationale:
            # The length the rationale reads with its quoted boxes in pixels, not placeholders.
            text = render_box_template(
                s.rationale,
                [e.box for e in s.rationale_boxes],
                PIXEL,
                s.width,
                s.height,
                [e.name or None for e in s.rationale_boxes],
            )
            self.rationale_chars[len(text)] += 1
        self.k[len(s.entities)] += 1
        self.layout[s.provenance.layout] += 1

    def entity_rows(self) -> list[dict[str, Any]]:
        """Samples per entity, most asked first."""
        keys = sorted(set(self.asked) | set(self.shown), key=lambda k: (-self.asked[k], k))
        return [
            {"domain": d, "entity": e, "asked": self.asked[(d, e)], "shown": self.shown[(d, e)]}
            for d, e in keys
        ]

    def charts(self) -> list[Chart]:
        """The charts that have data, in reading order."""
        entities = [(d, len(t)) for d, t in sorted(self.targets.items())]
        charts = [
            chart("entities", "distinct entities per domain", entities),
            chart("boxes", "ground-truth boxes per image", _discrete_rows(self.boxes_per_image)),
        ]
        if self.box_size:
            charts.append(chart("box_size", "box area / image area", _unit_rows(self.box_size)))
        if self.teacher_iou:
            charts.append(chart("teacher_iou", "teacher IoU", _unit_rows(self.teacher_iou)))
        if self.detector_iou:
            charts.append(chart("detector_iou", "detector IoU", _unit_rows(self.detector_iou)))
        if self.rationale_chars:
            lengths = _length_rows(self.rationale_chars)
            charts.append(chart("rationale", "rationale length (chars)", lengths))
        charts.append(chart("k", "entities per scene (k)", _discrete_rows(self.k)))
        charts.append(chart("layout", "scene layout", sorted(self.layout.items())))
        return charts


def sample_rank(sample_id: str) -> int:
    """A sample's place in the gallery's deterministic pick: smaller is picked first."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest(), "big")


class GalleryPicker:
    """The ``per_group`` samples of smallest :func:`sample_rank` per (domain, split), kept in a
    bounded max-heap per group so that only the chosen samples' images are ever held."""

    def __init__(self, per_group: int):
        self.per_group = per_group
        self.heaps: dict[tuple[str, str], list] = defaultdict(list)
        self.sizes: Counter = Counter()
        self._seq = 0

    def add(self, s: KVGSample) -> None:
        group = (s.domain, s.split)
        self.sizes[group] += 1
        if self.per_group <= 0:
            return
        heap = self.heaps[group]
        # The sequence number breaks ties so two samples are never compared.
        entry = (-sample_rank(s.sample_id), self._seq, s)
        self._seq += 1
        if len(heap) < self.per_group:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)

    def groups(self) -> list[tuple[tuple[str, str], list[KVGSample]]]:
        """Every group seen, sorted, with its chosen samples in pick order."""
        return [
            (group, [e[2] for e in sorted(self.heaps[group], key=lambda e: (-e[0], e[1]))])
            for group in sorted(self.sizes)
        ]


def _data_uri(data: bytes) -> str:
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sample_card(s: KVGSample, thumb: int) -> dict[str, Any]:
    """What the template shows of one accepted sample; ``uri`` is None when its image does not
    decode (the card still shows its text and boxes, so one bad row does not hide the rest)."""
    made = thumbnail(s.image, thumb)
    width, height = max(1, s.width), max(1, s.height)
    if made is None:
        scale = min(1.0, thumb / max(width, height))
        uri, tw, th = None, max(1, round(width * scale)), max(1, round(height * scale))
    else:
        jpeg, tw, th = made
        uri = _data_uri(jpeg)
    sx, sy = tw / width, th / height
    rects = [
        _rect("candidate", d.box, sx, sy, name)
        for name, detections in sorted(s.candidates.items())
        for d in detections
    ]
    if s.teacher_box is not None:
        rects.append(_rect("teacher", s.teacher_box, sx, sy, s.teacher_model or "teacher"))
    rects.extend(_rect("ignore", b, sx, sy, "ignore") for b in s.ignore_regions)
    rects.extend(_rect("uncertain", r.box, sx, sy, r.reason) for r in s.uncertain_regions)
    rects.extend(_rect("gt", b, sx, sy, s.target) for b in s.gt_boxes)
    pass_rate = "-"
    if s.student_k and s.student_correct is not None:
        rate = s.student_correct / s.student_k
        pass_rate = f"{s.student_correct} of {s.student_k} ({rate:.2f})"
    return {
        "s": s,
        "uri": uri,
        "w": tw,
        "h": th,
        "rects": rects,
        "k": len(s.entities),
        "distractors": [e.name for e in s.entities if e.name != s.target],
        "mode": s.distractors or "-",
        "similarity": _fmt(s.distractor_similarity),
        "teacher_iou": _fmt(s.teacher_iou),
        "detector_iou": _fmt(s.detector_iou),
        "pass_rate": pass_rate,
    }


def _pretty(detail: str) -> str:
    try:
        return json.dumps(json.loads(detail), indent=2, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return detail


def _detail(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _picture(location: str, thumb: int) -> dict[str, Any] | None:
    """A thumbnail of the image file at ``location`` (any ``FileSystems`` path), or None."""
    from groundforge.sources.read import read_location

    try:
        made = thumbnail(read_location(location), thumb)
    except Exception:  # gone, or unreadable here: the card says so instead
        return None
    if made is None:
        return None
    jpeg, w, h = made
    return {"uri": _data_uri(jpeg), "w": w, "h": h}


def _benchmark_picture(benchmark_id: str, benchmarks: list[str], thumb: int):
    """The benchmark image a contaminated item matched, from its folder or parquet file.

    Ids are ``<benchmark file or folder name>:<id>`` (:func:`merge_indexes`): a folder's ids are
    relative paths, a parquet file's the ``question_id`` (else the row number).
    """
    name, _, item = benchmark_id.partition(":")
    for path in benchmarks:
        if path.rstrip("/").rsplit("/", 1)[-1] != name:
            continue
        if not path.endswith(".parquet"):
            return _picture(f"{path.rstrip('/')}/{item}", thumb)
        return _parquet_picture(path, item, thumb)
    return None


def _parquet_picture(path: str, item: str, thumb: int):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            table = pq.ParquetFile(pa.PythonFile(raw, mode="r"))
            has_ids = "question_id" in table.schema_arrow.names
            columns = ["image", "question_id"] if has_ids else ["image"]
            row = 0
            for batch in table.iter_batches(batch_size=64, columns=columns):
                for cell in batch.to_pylist():
                    label = str(cell["question_id"]) if has_ids else str(row)
                    row += 1
                    if label == item:
                        image = cell["image"]
                        data = image.get("bytes") if isinstance(image, dict) else image
                        made = thumbnail(data, thumb)
                        if made is None:
                            return None
                        return {"uri": _data_uri(made[0]), "w": made[1], "h": made[2]}
    except Exception:  # an unreadable benchmark only costs the picture
        return None
    return None


def preview_card(
    p: RejectionPreview, benchmarks: list[str] = (), thumb: int = 320
) -> dict[str, Any]:
    """What the template shows of one rejection preview (its boxes are in its image's pixels),
    with what the drop points at: a duplicate's kept twin, a contaminated item's benchmark
    image, a refused rationale's reply."""
    detail = _detail(p.detail)
    related = None
    if p.reason.startswith("duplicate_") and detail.get("kept_key"):
        related = {"label": f"kept twin: {detail['kept_key']}"}
        related["picture"] = _picture(str(detail["kept_key"]), thumb)
    elif p.reason == "contaminated" and detail.get("benchmark_id"):
        related = {"label": f"benchmark image: {detail['benchmark_id']}"}
        related["picture"] = _benchmark_picture(str(detail["benchmark_id"]), benchmarks, thumb)
    shown = {k: v for k, v in detail.items() if k != "reply"} if detail else None
    return {
        "p": p,
        "uri": _data_uri(p.image) if p.image else None,
        "w": p.width,
        "h": p.height,
        "rects": [_rect(b.kind, b.box, 1, 1, b.label) for b in p.boxes],
        "detail": _pretty(p.detail) if shown is None else _pretty(json.dumps(shown)),
        "related": related,
        "reply": detail.get("reply"),
    }


def _json_block(value: Any) -> Markup:
    """JSON that is safe inside a ``<script>`` element (no ``<``, ``>`` or ``&`` in it)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, code)
    return Markup(text)


def _row(r: Rejection) -> list[str]:
    """One rejection as the page's script shows it: id, path, entity, what it points at,
    detail."""
    detail = _detail(r.detail)
    points_at = str(detail.get("kept_key") or detail.get("benchmark_id") or "")
    return [r.item_id, r.source_id, r.entity, points_at, r.detail]


def rejection_pages(
    path: str, groups: dict[tuple[str, str], int], page_rows: int = PAGE_ROWS
) -> Iterator[dict[str, Any]]:
    """Pages of at most ``page_rows`` rows of each (stage, reason) group (``groups`` gives each
    its index), streamed from the table: only one open page per group is held."""
    from groundforge.outputs.rejections import iter_rejections

    open_pages: dict[int, list] = defaultdict(list)
    numbers: Counter = Counter()
    for r in iter_rejections(path):
        group = groups[(r.stage, r.reason)]
        page = open_pages[group]
        page.append(_row(r))
        if len(page) == page_rows:
            yield {"group": group, "page": numbers[group], "rows": _json_block(page)}
            numbers[group] += 1
            open_pages[group] = []
    for group, page in sorted(open_pages.items()):
        if page:
            yield {"group": group, "page": numbers[group], "rows": _json_block(page)}


def read_rejection_groups(path: str) -> tuple[Counter, dict[tuple[str, str], list[str]]]:
    """Rows per (stage, reason) and a few of their details, reading the table batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    counts: Counter = Counter()
    details: dict[tuple[str, str], list[str]] = defaultdict(list)
    if not FileSystems.exists(path):
        return counts, details
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        table = pq.ParquetFile(pa.PythonFile(raw, mode="r"))
        for batch in table.iter_batches(columns=["stage", "reason", "detail"]):
            for row in batch.to_pylist():
                key = (row["stage"], row["reason"])
                counts[key] += 1
                if len(details[key]) < DETAILS_PER_REASON:
                    details[key].append(_pretty(row["detail"]))
    return counts, details


def previews_by_reason(path: str) -> dict[tuple[str, str], list[RejectionPreview]]:
    """The run's rejection previews by (stage, reason); empty for runs that wrote none."""
    from apache_beam.io.filesystems import FileSystems

    found: dict[tuple[str, str], list[RejectionPreview]] = defaultdict(list)
    if not FileSystems.exists(path):
        return found
    for preview in read_previews(path):
        group = found[(preview.stage, preview.reason)]
        if len(group) < PREVIEWS_PER_REASON:
            group.append(preview)
    return found


def funnel_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's stages with the bar geometry of the funnel chart and busy seconds."""
    stages = manifest.get("stages") or []
    busy = (manifest.get("timing") or {}).get("stage_seconds") or {}
    top = max((s["in"] for s in stages), default=0) or 1
    rows = []
    for s in stages:
        dropped = sum(s.get("dropped", {}).values())
        rows.append(
            {
                "stage": s["stage"],
                "in": s["in"],
                "kept": s["kept"],
                "dropped": dropped,
                "reasons": ", ".join(f"{r} {n}" for r, n in s.get("dropped", {}).items()),
                "busy": _fmt(busy.get(s["stage"]), 1),
                "kept_w": CHART_WIDTH * s["kept"] / top,
                "dropped_w": CHART_WIDTH * dropped / top,
            }
        )
    return rows


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def iter_report(
    run_dir: str, per_group: int = 12, thumb: int = 320, page_rows: int = PAGE_ROWS
) -> Iterator[str]:
    """The report page of a run folder, as pieces of HTML text in order."""
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.manifest import read_manifest
    from groundforge.outputs.shards import detect_format, read_samples, shards_folder

    manifest_path = FileSystems.join(run_dir, "manifest.json")
    manifest = read_manifest(manifest_path) if FileSystems.exists(manifest_path) else {}
    picker, dist = GalleryPicker(per_group), Distributions()
    shards = shards_folder(run_dir)
    try:
        fmt = detect_format(shards)
    except FileNotFoundError:
        fmt = None
    if fmt is not None:
        for sample in read_samples(shards, fmt=fmt):
            picker.add(sample)
            dist.add(sample)
    groups = [
        {
            "domain": domain,
            "split": split,
            "size": picker.sizes[(domain, split)],
            "cards": [sample_card(s, thumb) for s in chosen],
        }
        for (domain, split), chosen in picker.groups()
    ]
    recipe = manifest.get("recipe") or {}
    benchmarks = list((recipe.get("decontaminate") or {}).get("benchmarks") or [])
    # Rejections follow the pipeline's stage order; stages the manifest does not list go last.
    stage_order = {st["stage"]: i for i, st in enumerate(manifest.get("stages") or [])}
    rejections_path = FileSystems.join(run_dir, REJECTIONS_FILE)
    counts, details = read_rejection_groups(rejections_path)
    previews = previews_by_reason(FileSystems.join(run_dir, PREVIEWS_FILE))
    ordered = sorted(
        ((key, n) for key, n in counts.items() if n > 0),
        key=lambda kv: (stage_order.get(kv[0][0], len(stage_order)), kv[0]),
    )
    reasons = [
        {
            "group": i,
            "stage": stage,
            "reason": reason,
            "count": n,
            "pages": -(-n // page_rows),
            "previews": [
                preview_card(p, benchmarks, thumb) for p in previews.get((stage, reason), [])
            ],
            "details": details[(stage, reason)],
        }
        for i, ((stage, reason), n) in enumerate(ordered)
    ]
    index = {(r["stage"], r["reason"]): r["group"] for r in reasons}
    pages = rejection_pages(rejections_path, index, page_rows) if reasons else iter(())
    timing = manifest.get("timing") or {}
    splits = manifest.get("splits")
    if not splits:
        splits = Counter()
        for (_, split), n in picker.sizes.items():
            splits[split] += n
    domains = sorted(dist.targets) or ([recipe["domain"]] if recipe.get("domain") else [])
    return (
        _environment()
        .get_template("report.html.j2")
        .generate(
            name=recipe.get("name") or run_dir.rstrip("/").rsplit("/", 1)[-1],
            domain=", ".join(domains) or "-",
            domain_count=len(domains),
            version=manifest.get("groundforge_version", "-"),
            created_at=manifest.get("created_at", "-"),
            samples=manifest.get("samples", sum(picker.sizes.values())),
            splits=splits,
            fmt=manifest.get("format") or fmt or "-",
            wall_seconds=timing.get("wall_seconds"),
            funnel=funnel_rows(manifest),
            has_timing=bool(timing.get("stage_seconds")),
            models=sorted((manifest.get("models") or {}).items()),
            cost=manifest.get("cost"),
            groups=groups,
            per_group=per_group,
            domains=sorted({d for d, _ in picker.sizes}),
            split_names=sorted({s for _, s in picker.sizes}),
            reasons=reasons,
            reason_names=sorted({r["reason"] for r in reasons}),
            pages=pages,
            page_rows=page_rows,
            entity_rows=dist.entity_rows(),
            aliases=manifest.get("aliases") or {},
            charts=dist.charts() if picker.sizes else [],
            colors=COLORS,
            legend=LEGEND,
            sample_only=SAMPLE_ONLY,
            detect=any(st["stage"] == "detect_sample" for st in manifest.get("stages") or []),
            chart_width=CHART_WIDTH,
        )
    )


def write_report(
    run_dir: str,
    out: str | None = None,
    per_group: int = 12,
    thumb: int = 320,
    page_rows: int = PAGE_ROWS,
) -> str:
    """Write ``report.html`` (or ``out``) for a run folder, which may be in a bucket; returns the
    path written.

    ``per_group`` samples per (domain, split) are shown, picked by smallest sha256 of their id;
    thumbnails are at most ``thumb`` pixels on their longest side; each reason's rejections are
    listed ``page_rows`` to a page. The page is streamed to the file as it is made.
    """
    from apache_beam.io.filesystems import FileSystems

    from groundforge.outputs.files import atomic_create

    path = out or FileSystems.join(str(run_dir), REPORT_FILE)
    with atomic_create(path, "text/html") as fh:
        for piece in iter_report(str(run_dir), per_group, thumb, page_rows):
            fh.write(piece.encode("utf-8"))
    return path
