import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from groundforge.filters.verdict import Verdict
from groundforge.pipelines.metrics import read_funnel
from groundforge.pipelines.stage import apply_check
from groundforge.schemas.records import SourceItem, item_id_of


def own(i: int) -> str:
    """The rejection id of item ``i`` (never read, so no sha256)."""
    return item_id_of(f"/loc/{i}", "")


def parity(item: SourceItem) -> Verdict:
    n = int(item.item_id)
    if n == 7:
        raise RuntimeError("boom on 7")
    if n % 3 == 0:
        return Verdict.drop("multiple_of_three", n=n)
    if n % 5 == 0:
        return Verdict.drop("multiple_of_five")
    return Verdict.ok(SourceItem(str(n * 10), "", "d")) if n == 1 else Verdict.ok()


def test_stage_counts_routes_and_survives_exceptions():
    items = [SourceItem(str(i), f"/loc/{i}", "d") for i in range(20)]
    p = beam.Pipeline()
    kept, rejected, _ = apply_check(p | beam.Create(items), "parity", parity)
    apply_check(kept, "second", lambda x: Verdict.ok())
    assert_that(
        kept | "ids" >> beam.Map(lambda x: x.item_id),
        equal_to(["10", "2", "4", "8", "11", "13", "14", "16", "17", "19"]),
        label="kept",
    )
    assert_that(
        rejected | beam.Map(lambda r: (r.item_id, r.stage, r.reason, r.source_id)),
        equal_to(
            [(own(i), "parity", "multiple_of_three", f"/loc/{i}") for i in (0, 3, 6, 9, 12, 15, 18)]
            + [(own(i), "parity", "multiple_of_five", f"/loc/{i}") for i in (5, 10)]
            + [(own(7), "parity", "error", "/loc/7")]
        ),
        label="rejected",
    )
    assert_that(
        rejected
        | "details" >> beam.Filter(lambda r: r.reason == "error")
        | beam.Map(lambda r: r.detail),
        equal_to(['{"error": "RuntimeError: boom on 7"}']),
        label="error detail",
    )
    result = p.run()
    result.wait_until_finish()
    funnel = read_funnel(result, ["parity", "second", "never_ran"])
    parity_count, second, never = funnel
    assert (parity_count.total, parity_count.kept) == (20, 10)
    assert parity_count.dropped == {"multiple_of_three": 7, "multiple_of_five": 2, "error": 1}
    assert parity_count.balanced
    assert (second.total, second.kept, second.dropped) == (10, 10, {})
    assert (never.total, never.kept) == (0, 0)
