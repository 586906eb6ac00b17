"""The HTML report of a run folder, checked in the HTML and in headless Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import dump_dom, screenshot
from PIL import Image
from samples import make_sample
from test_trainer_data import write_shards

from groundforge.outputs.files import write_table
from groundforge.outputs.rejections import read_rejections
from groundforge.outputs.report import write_report
from groundforge.outputs.shards import read_samples
from groundforge.schemas.arrow import PREVIEW_SCHEMA, REJECTION_SCHEMA, preview_to_row
from groundforge.schemas.box import Box
from groundforge.schemas.records import Detection, Entity, MarkedBox, RejectionPreview, stable_id

GREEN, ORANGE, MAGENTA = (0x00, 0xC8, 0x53), (0xFF, 0x91, 0x00), (0xD5, 0x00, 0xF9)
GREY = (128, 128, 128)


class Page(HTMLParser):
    """Every start tag with its attributes, the text of the funnel cells and of <pre> blocks."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.funnel: dict[tuple[str, str], str] = {}
        self.pres: list[str] = []
        self._cell: tuple[str, str] | None = None
        self._pre: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "td" and "data-field" in attrs:
            self._cell = (attrs["data-stage"], attrs["data-field"])
            self.funnel[self._cell] = ""
        if tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        if self._cell:
            self.funnel[self._cell] += data
        if self._pre is not None:
            self._pre.append(data)

    def having(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.tags
            if t == tag and (cls is None or cls in a.get("class", "").split())
        ]

    def options(self, select_id: str) -> list[str]:
        inside, values = False, []
        for tag, attrs in self.tags:
            if tag == "select":
                inside = attrs.get("id") == select_id
            elif tag == "option" and inside:
                values.append(attrs["value"])
        return values

    def chart(self, key: str) -> dict[str, int]:
        inside, bars = False, {}
        for tag, attrs in self.tags:
            if tag == "figure":
                inside = attrs.get("data-chart") == key
            elif tag == "rect" and inside and "data-value" in attrs:
                bars[attrs["data-label"]] = int(attrs["data-value"])
        return bars


def expected_gallery(shards: Path, per_group: int) -> dict[tuple[str, str], set[str]]:
    """Per (domain, split), the ids of the ``per_group`` samples of smallest sha256."""
    ids = defaultdict(list)
    for s in read_samples(str(shards)):
        ids[(s.domain, s.split)].append(s.sample_id)
    return {
        group: set(sorted(found, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:per_group])
        for group, found in ids.items()
    }


def shown_gallery(page: Page) -> dict[tuple[str, str], set[str]]:
    shown = defaultdict(set)
    for card in page.having("div", "card"):
        shown[(card["data-domain"], card["data-split"])].add(card["data-sample-id"])
    return dict(shown)


def body_data(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


# -- the demo run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_report(demo_run, tmp_path_factory) -> Path:
    return Path(write_report(str(demo_run), str(tmp_path_factory.mktemp("report") / "r.html"), 5))


def test_demo_report_renders_in_chromium(demo_run, demo_report, tmp_path):
    html = demo_report.read_text()
    page = Page(html)
    images = len(page.having("img"))
    assert images > 0

    dom = body_data(dump_dom(demo_report))
    assert dom.get("ready") == "1"
    assert dom["images-failed"] == "0"
    assert dom["images-ok"] == str(images)

    shot = screenshot(demo_report, tmp_path / "shot.png", 1100, 1500)
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 1500)

    assert shown_gallery(page) == expected_gallery(demo_run / "shards", 5)
    rejections = Counter(
        (r.stage, r.reason) for r in read_rejections(str(demo_run / "rejections.parquet"))
    )
    groups = page.having("section", "reason-group")
    assert {(g["data-stage"], g["data-reason"]): int(g["data-count"]) for g in groups} == rejections
    assert len(groups) == len(rejections) > 0


def test_demo_funnel_numbers_match_the_manifest(demo_run, demo_report):
    manifest = json.loads((demo_run / "manifest.json").read_text())
    expected = {}
    for s in manifest["stages"]:
        expected[(s["stage"], "in")] = s["in"]
        expected[(s["stage"], "kept")] = s["kept"]
        expected[(s["stage"], "dropped")] = sum(s["dropped"].values())
    cells = Page(demo_report.read_text()).funnel
    shown = {key: int(text) for key, text in cells.items() if key[1] != "busy"}
    assert shown == expected
    assert any(n for (_, field), n in shown.items() if field == "dropped")


def test_demo_filters_offer_every_domain_split_and_reason(demo_run, demo_report):
    page = Page(demo_report.read_text())
    samples = list(read_samples(str(demo_run / "shards")))
    reasons = {r.reason for r in read_rejections(str(demo_run / "rejections.parquet"))}
    assert page.options("filter-domain") == ["", *sorted({s.domain for s in samples})]
    assert page.options("filter-split") == ["", *sorted({s.split for s in samples})]
    assert page.options("filter-reason") == ["", *sorted(reasons)]


# -- boxes land where the boxes are ------------------------------------------------------------


def _png(width: int, height: int, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def _near(pixel, color, tol: int = 40) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel[:3], color, strict=True))


def _grey_region(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the grey image: rows and columns mostly grey (text is not)."""
    grey = np.all(np.abs(pixels[:, :, :3].astype(int) - GREY) <= 8, axis=2)
    rows = np.flatnonzero(grey.sum(axis=1) >= 150)
    assert rows.size, "no grey image in the screenshot"
    cols = np.flatnonzero(grey[rows].sum(axis=0) >= rows.size // 2)
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def test_drawn_boxes_land_on_the_boxes(tmp_path):
    gt = Box(100, 50, 300, 150)
    sample = replace(
        make_sample(0),
        image=_png(400, 200, GREY),
        width=400,
        height=200,
        question="where is <b>it</b>?",
        gt_boxes=(gt,),
        candidates={"detector": (Detection(Box(20, 20, 80, 180), 0.9, "it"),)},
        teacher_box=Box(320, 30, 380, 170),
    )
    run = write_shards(tmp_path / "run", [sample])
    (run / "manifest.json").write_text(json.dumps({"samples": 1, "splits": {"sft": 1}}))
    report = Path(write_report(str(run), thumb=200))  # half size: boxes must be scaled too
    html = report.read_text()
    assert "&lt;b&gt;it&lt;/b&gt;" in html and "<b>it</b>" not in html

    with Image.open(screenshot(report, tmp_path / "shot.png", 900, 1000)) as image:
        pixels = np.asarray(image.convert("RGB"))
    x0, y0, x1, y1 = _grey_region(pixels)
    assert (x1 - x0, y1 - y0) == (200, 100)
    s = 0.5

    def edge(color, xs, ys) -> float:
        """The share of ``ys`` where some pixel within 2 px of ``x`` has ``color``."""
        hits = [any(_near(pixels[y, x + dx], color) for x in xs for dx in range(-2, 3)) for y in ys]
        return sum(hits) / len(hits)

    mid = y0 + round((gt.y1 + gt.y2) / 2 * s)
    assert edge(GREEN, [x0 + round(gt.x1 * s)], [mid]) == 1
    assert edge(GREEN, [x0 + round(gt.x2 * s)], [mid]) == 1
    top = y0 + round(gt.y1 * s)
    assert any(_near(pixels[top + dy, x0 + 100], GREEN) for dy in range(-2, 3))
    assert _near(pixels[mid, x0 + round(gt.x1 * s) - 6], GREY, 8)
    assert _near(pixels[mid, x0 + round((gt.x1 + gt.x2) / 2 * s)], GREY, 8)
    assert 0.3 < edge(ORANGE, [x0 + 10], range(y0 + 12, y0 + 89)) < 0.9  # dashed
    assert not _near(pixels[y0 + 50, x0 + 10], GREEN)
    assert edge(MAGENTA, [x0 + 160], range(y0 + 17, y0 + 84)) == 1


# -- rejections with and without previews ------------------------------------------------------


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 60, 90)).save(buf, "JPEG")
    return buf.getvalue()


def test_rejection_groups_show_previews_or_details(tmp_path):
    samples = [make_sample(i) for i in range(3)]
    samples[1] = replace(samples[1], image=b"not an image")
    run = write_shards(tmp_path / "run", samples)
    rows = [
        {"item_id": f"a{i}", "stage": "image", "reason": "too_small", "detail": '{"w": 3}'}
        for i in range(2)
    ] + [
        {"item_id": f"b{i}", "stage": "box", "reason": "off_image", "detail": json.dumps({"i": i})}
        for i in range(7)
    ]
    write_table(
        str(run / "rejections.parquet"),
        [{**r, "source_id": ""} for r in rows],
        REJECTION_SCHEMA,
        "parquet",
    )
    previews = [
        RejectionPreview(
            "a0",
            "image",
            "too_small",
            '{"w": 3}',
            _jpeg(60, 40),
            60,
            40,
            (MarkedBox("cause", Box(5, 5, 30, 30)), MarkedBox("gt", Box(1, 1, 50, 35))),
        ),
        RejectionPreview("a1", "image", "too_small", '{"w": 3}'),
    ]
    write_table(
        str(run / "rejection_previews.parquet"),
        [preview_to_row(p) for p in previews],
        PREVIEW_SCHEMA,
        "parquet",
    )
    manifest = {
        "stages": [
            {"stage": "image", "in": 5, "kept": 3, "dropped": {"too_small": 2}},
            {"stage": "box", "in": 3, "kept": 3, "dropped": {}},
        ],
        "timing": {"wall_seconds": 9.0, "stage_seconds": {"image": 2.5, "box": 0.25}},
        "models": {"teacher": {"requests": 4, "sent": 3, "failed": {"timeout": 1}}},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    report = Path(write_report(str(run)))
    html = report.read_text()
    page = Page(html)

    groups = [
        (g["data-stage"], g["data-reason"], g["data-count"])
        for g in page.having("section", "reason-group")
    ]
    assert groups == [("image", "too_small", "2"), ("box", "off_image", "7")]  # pipeline order
    assert page.options("filter-reason") == ["", "off_image", "too_small"]
    assert page.funnel[("image", "busy")] == "2.5"
    assert page.funnel[("box", "dropped")] == "0"
    assert re.search(r"<td>teacher</td><td[^>]*>4</td><td[^>]*>-</td><td[^>]*>3</td>", html)
    assert "timeout 1" in html
    assert html.count("no image") == 1
    assert html.count("image does not decode") == 1
    assert len(page.having("div", "card")) == 3
    assert 'stroke="#ff1744"' in html
    box_details = [p for p in page.pres if '"i"' in p]
    assert len(box_details) == 5 and box_details[0] == '{\n  "i": 0\n}'

    dom = body_data(dump_dom(report))
    assert dom["ready"] == "1"
    assert (dom["images-ok"], dom["images-failed"]) == ("3", "0")


# -- size and streaming ------------------------------------------------------------------------


def test_page_size_depends_on_the_gallery_not_on_the_rows(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(300):
        noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        buf = io.BytesIO()
        noise.save(buf, "PNG")
        samples.append(
            replace(
                make_sample(i, split="val" if i % 5 == 0 else "sft"),
                sample_id=stable_id("size", i),
                domain="flag" if i % 2 else "landmark",
                image=buf.getvalue(),
                width=64,
                height=48,
            )
        )
    run = write_shards(tmp_path / "run", samples)
    report = Path(write_report(str(run), per_group=3))
    page = Page(report.read_text())

    shown = shown_gallery(page)
    assert {group: len(ids) for group, ids in shown.items()} == {
        ("flag", "sft"): 3,
        ("flag", "val"): 3,
        ("landmark", "sft"): 3,
        ("landmark", "val"): 3,
    }
    assert shown == expected_gallery(run / "shards", 3)
    shards = sum(p.stat().st_size for p in (run / "shards").rglob("*.arrow"))
    assert report.stat().st_size * 10 < shards
    # The distributions still count every row, not only the shown ones.
    assert sum(page.chart("boxes").values()) == 300
    assert page.chart("entities") == {"flag": 150, "landmark": 150}


# -- difficulty, every rejection, what a drop points at ----------------------------------------


def _page_rows(html: str) -> dict[int, dict[int, list]]:
    """The JSON rows of every rejection page, by group and page."""
    found: dict[int, dict[int, list]] = defaultdict(dict)
    for group, page, body in re.findall(
        r'<script type="application/json" class="rejection-page" data-group="(\d+)" '
        r'data-page="(\d+)">(.*?)</script>',
        html,
        re.S,
    ):
        found[int(group)][int(page)] = json.loads(body)
    return found


def test_scene_cards_and_every_rejection_show_difficulty_and_causes(tmp_path):
    a, b, c = (Entity(n, Box(0, 0, 4, 4)) for n in ("Chad", "Romania", "Andorra"))
    scene = replace(
        make_sample(1),
        domain="flag",
        target="Chad",
        entities=(a, b, c),
        distractors="hard",
        distractor_similarity=0.875,
        student_k=4,
        student_correct=1,
    )
    landmark = replace(make_sample(2), domain="landmark", target="Eiffel Tower")
    run = write_shards(tmp_path / "run", [scene, landmark])
    twin = tmp_path / "flags" / "chad.png"
    twin.parent.mkdir()
    twin.write_bytes(_png(40, 30, GREY))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "q7.png").write_bytes(_png(50, 20, GREY))
    rows = [
        {
            "item_id": f"dup{i}",
            "stage": "dedup",
            "reason": "duplicate_exact",
            "detail": json.dumps({"kept_key": str(twin), "kept_id": "abc", "distance": 0.0}),
            "source_id": f"/data/copy_{i}.png",
            "sha256": "abc",
            "entity": f"Copy {i}",
        }
        for i in range(7)
    ]
    rows.append(
        {
            "item_id": "bench0",
            "stage": "decontaminate",
            "reason": "contaminated",
            "detail": json.dumps({"benchmark_id": "bench:q7.png", "kind": "perceptual"}),
            "source_id": "/data/leak.png",
            "sha256": "def",
            "entity": "Mali",
        }
    )
    reply = "<think>It is Romania.</think><answer>[1, 2, 3]</answer>"
    rows.append(
        {
            "item_id": "s1",
            "stage": "rationale",
            "reason": "rationale_no_target",
            "detail": json.dumps({"target": "Chad", "reply": reply}),
            "source_id": "/data/chad.png",
            "sha256": "",
            "entity": "Chad",
        }
    )
    write_table(str(run / "rejections.parquet"), rows, REJECTION_SCHEMA, "parquet")
    previews = [
        RejectionPreview(r["item_id"], r["stage"], r["reason"], r["detail"], _jpeg(30, 20), 30, 20)
        for r in (rows[0], rows[7], rows[8])
    ]
    write_table(
        str(run / "rejection_previews.parquet"),
        [preview_to_row(p) for p in previews],
        PREVIEW_SCHEMA,
        "parquet",
    )
    manifest = {
        "recipe": {"name": "r", "domain": "flag", "decontaminate": {"benchmarks": [str(bench)]}}
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    report = Path(write_report(str(run), page_rows=3))
    html = report.read_text()
    page = Page(html)

    assert re.search(r'<b id="domains">flag, landmark</b>', html)
    card = html[html.index(f'data-sample-id="{scene.sample_id}"') :]
    card = card[: card.index("</dl>")]
    assert '<dd class="distractors">Romania, Andorra</dd>' in card
    assert '<dd class="mode">hard</dd>' in card and '<dd class="similarity">0.88</dd>' in card
    assert "<dt>student pass rate</dt>" in card and "1 of 4 (0.25)" in card

    # Every rejection is on some page, with its path and entity; 7 rows make 3 pages of 3.
    groups = {
        g["data-reason"]: int(g["data-count"]) for g in page.having("section", "reason-group")
    }
    assert groups == {"duplicate_exact": 7, "contaminated": 1, "rationale_no_target": 1}
    pages = _page_rows(html)
    pagers = {int(p["data-group"]): int(p["data-pages"]) for p in page.having("div", "pager")}
    assert {g: len(p) for g, p in pages.items()} == pagers
    listed = [row for g in pages.values() for p in sorted(g) for row in g[p]]
    assert sorted(r[:3] for r in listed) == sorted(
        [r["item_id"], r["source_id"], r["entity"]] for r in rows
    )
    dup_group = next(g for g, p in pages.items() if p[0][0][0].startswith("dup"))
    assert [len(pages[dup_group][p]) for p in range(3)] == [3, 3, 1]
    assert pages[dup_group][0][0][3] == str(twin)  # the kept twin beside the copy

    # A duplicate beside its kept twin, a contaminated item beside its benchmark image.
    related = {a["alt"]: (a["width"], a["height"]) for a in page.having("img") if ":" in a["alt"]}
    assert related == {
        f"kept twin: {twin}": ("40", "30"),
        "benchmark image: bench:q7.png": ("50", "20"),
    }
    assert "It is Romania." in html and html.count('<details class="reply" open>') == 1

    entities = {
        (r["data-domain"], r["data-entity"]) for r in page.having("tr") if "data-entity" in r
    }
    assert entities == {("flag", n) for n in ("Chad", "Romania", "Andorra")} | {
        ("landmark", "Eiffel Tower"),
        ("landmark", "entity 2"),
    }
    assert re.search(
        r'data-entity="Chad"><td>flag</td><td>Chad</td><td class="aliases"></td>'
        r"<td[^>]*>1</td><td[^>]*>1</td>",
        html,
    )
    assert re.search(
        r'data-entity="Romania"><td>flag</td><td>Romania</td><td class="aliases"></td>'
        r"<td[^>]*>0</td><td[^>]*>1</td>",
        html,
    )

    # In a browser the first page of each reason is drawn, rows in file order.
    dom = dump_dom(report)
    body = dom[dom.index(f'class="rejection-table" data-group="{dup_group}"') :]
    body = body[: body.index("</table>")]
    assert re.findall(r'data-item-id="([^"]+)"', body) == ["dup0", "dup1", "dup2"]
    assert "/data/copy_0.png" in body and "Copy 0" in body


def test_demo_report_lists_every_rejection_and_names_distractors(demo_run, demo_report):
    html = demo_report.read_text()
    listed = [row for g in _page_rows(html).values() for p in g.values() for row in p]
    table = read_rejections(str(demo_run / "rejections.parquet"))
    assert sorted(r[:3] for r in listed) == sorted(
        [r.item_id, r.source_id, r.entity] for r in table
    )
    assert all(r[1] and r[2] for r in listed)  # every drop names its file and its entity
    by_id = {s.sample_id: s for s in read_samples(str(demo_run / "shards"))}
    cards = re.findall(
        r'data-sample-id="([^"]+)".*?<dd class="distractors">([^<]*)</dd>', html, re.S
    )
    assert cards
    for sample_id, shown in cards:
        s = by_id[sample_id]
        names = [e.name for e in s.entities if e.name != s.target]
        assert shown.replace("&#39;", "'") == ", ".join(names)
    assert re.search(r'<b id="domains">flag</b>', html)
