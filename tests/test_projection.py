"""The rehearsal's projection (a fit over sizes, as a range) and its choice of batch size."""

from __future__ import annotations

import pytest

from migration.plan import build_plan
from migration.rehearsal import rehearse as rehearse_module
from migration.rehearsal.batching import choose, sizes_to_try
from migration.rehearsal.projection import (
    SIZES,
    Line,
    fit,
    project,
    project_step,
    slope_error,
    table_sizes,
)
from migration.rehearsal.rehearse import RehearsalOptions
from migration.rehearsal.report import Report, Run, StepTiming, render_text
from migration.rehearsal.seed import seed
from tests.operate import connected, execute

OVERHEAD, PER_ROW = 2.0, 1e-5  # seconds; seconds a row
PRODUCTION = 1_000_000


def synthetic(users: int) -> list[StepTiming]:
    """A rehearsal of ``users`` (and 3 journal entries each), timed at each of its fit's
    sizes: every step a fixed overhead plus a cost per row."""
    timings = []
    for divisor in SIZES:
        n = users // divisor
        for step, tables, rows in (("migrate_users", ("users",), n),
                                   ("migrate_foreign_keys", ("journal_entries",), 3 * n)):
            timings.append(StepTiming(step, OVERHEAD + PER_ROW * rows, rows, tables))
    return timings


def test_the_projection_no_longer_depends_on_the_rehearsal_size() -> None:
    production = {"users": PRODUCTION, "journal_entries": 3 * PRODUCTION}
    small, large = (project(synthetic(users), production, users=[users], source="test",
                            stalls=[]) for users in (2_000, 50_000))
    truth = 2 * OVERHEAD + PER_ROW * 4 * PRODUCTION  # 42 s
    for projection in (small, large):
        assert projection.low == pytest.approx(truth)
        assert projection.high == pytest.approx(truth)

    def single_rate(users: int) -> float:
        """The method before the fit: the full size's seconds a row, times production rows."""
        full = [t for t in synthetic(users)[:2]]
        return sum(t.seconds / t.rows * production[t.tables[0]] for t in full)

    # the bug: 2,000 users projected ~20 times what 50,000 did, both far from the truth
    assert single_rate(2_000) > 10 * single_rate(50_000)
    assert single_rate(50_000) > 2 * truth


def test_fit_recovers_overhead_and_cost_per_row() -> None:
    line = fit([(100, 1.1), (1000, 2.0), (10_000, 11.0)])
    assert line.overhead == pytest.approx(1.0)
    assert line.per_row == pytest.approx(1e-3)
    assert line.at(1_000_000) == pytest.approx(1001.0)


def test_fit_never_gives_negative_parts() -> None:
    # noise made the small size faster than a line through zero would be
    through_origin = fit([(100, 0.0), (1000, 2.0)])
    assert through_origin.overhead == 0.0
    assert through_origin.per_row > 0
    # the larger size faster than the smaller: no cost per row is measured
    assert fit([(100, 2.0), (1000, 1.0)]) == Line(1.5, 0.0)
    with pytest.raises(ValueError, match="two sizes"):
        fit([(100, 1.0), (100, 1.2)])


def test_the_range_is_the_cost_per_row_less_and_more_its_standard_error() -> None:
    points = [(1000, 1.1), (3000, 1.3), (9000, 2.5)]
    step = project_step("migrate_users", points, 1_000_000)
    # by hand: cost per row 1.8077e-4 s, overhead 0.85 s, residual sum of squares 0.013846
    # over 1 degree of freedom, rows' sum of squares 34.667e6: standard error 1.9985e-5
    assert step.line.per_row == pytest.approx(1.8077e-4, rel=1e-4)
    assert slope_error(points, step.line) == pytest.approx(1.9985e-5, rel=1e-3)
    assert step.low == pytest.approx(0.85 + (1.8077e-4 - 1.9985e-5) * 1e6, rel=1e-3)
    assert step.high == pytest.approx(0.85 + (1.8077e-4 + 1.9985e-5) * 1e6, rel=1e-3)
    # two sizes leave no residual: one value
    assert slope_error(points[:2], fit(points[:2])) == 0.0


def test_noise_at_the_small_sizes_does_not_take_the_range_to_zero() -> None:
    # the two small sizes equally fast (noise): the rate between them is zero, the fit's is not
    step = project_step("migrate_foreign_keys", [(10_000, 1.17), (3333, 0.5), (1111, 0.5)],
                        5_000_000)
    assert 0.5 * step.line.at(5_000_000) < step.low < step.line.at(5_000_000) < step.high


def test_the_write_stall_is_projected_apart_and_does_not_grow_with_rows() -> None:
    timings = synthetic(2_000)
    stalls = [0.031, 0.024, 0.040]
    projections = [project(timings, {"users": n, "journal_entries": 3 * n}, users=[2_000],
                           source="test", stalls=stalls) for n in (10**6, 10**8)]
    assert [p.stall for p in projections] == [(0.024, 0.040)] * 2
    assert projections[1].low > 50 * projections[0].low
    assert project(timings, {"users": 1, "journal_entries": 1}, users=[1], source="test",
                   stalls=[]).stall is None


# --- the batch size ------------------------------------------------------------------------------

def test_only_sizes_smaller_than_the_largest_table_are_timed() -> None:
    rows = {"users": 2000, "journal_entries": 6000}
    tried, skipped = sizes_to_try((1000, 10_000, 50_000), rows)
    assert tried == [1000]
    assert [why.split(":")[0] for why in skipped] == ["10,000", "50,000"]
    assert "journal_entries, 6,000 rows" in skipped[0]
    # a size equal to the table's rows is no smaller
    assert sizes_to_try((100, 600), {"t": 600})[0] == [100]
    # none smaller: the smallest is timed all the same
    assert sizes_to_try((10_000, 50_000), rows)[0] == [10_000]


def test_a_difference_within_noise_keeps_the_default() -> None:
    # the case: 0.28 s against 0.30 s
    choice = choose({1000: [0.30, 0.31], 10_000: [0.28, 0.29]})
    assert choice.batch_size == 1000
    assert choice.tied == (1000, 10_000)
    assert "no size is faster beyond noise" in choice.reason
    assert "the default" in choice.reason
    assert "fastest" not in choice.reason


def test_without_the_default_the_smallest_within_noise_is_kept() -> None:
    choice = choose({500: [1.02, 1.0], 5000: [0.97, 1.01], 50_000: [3.0, 3.1]})
    assert (choice.batch_size, choice.tied) == (500, (500, 5000))
    assert "the smallest" in choice.reason


def test_a_difference_beyond_noise_names_the_fastest() -> None:
    choice = choose({1000: [2.0, 2.1], 10_000: [1.0, 1.05]})
    assert (choice.batch_size, choice.tied) == (10_000, (10_000,))
    assert choice.reason.startswith("10,000 is the fastest: 1.02 s against 2.05 s for 1,000")
    # the spread of the repeats is the noise: far apart repeats make it a tie
    assert choose({1000: [2.0, 2.1], 10_000: [0.5, 1.9]}).batch_size == 1000
    assert choose({10_000: [1.0, 1.0]}).reason == "10,000: the only size timed"


# --- the sizes of a real database ----------------------------------------------------------------

def test_table_sizes_read_estimates_and_count_tables_never_analyzed(legacy_db: str) -> None:
    with connected(legacy_db, autocommit=False) as conn:
        seed(conn, 40)
        plan = build_plan(conn)
    execute(legacy_db, "ANALYZE public.users")
    execute(legacy_db, "INSERT INTO public.users (id, email) SELECT gen_random_uuid()::text, "
                       "'extra' || g || '@example.com' FROM generate_series(1, 5) g")
    sizes = table_sizes(legacy_db, plan)
    assert sizes["users"] == 40  # the estimate ANALYZE left, not the 45 rows there now
    [(entries,)] = execute(legacy_db, "SELECT count(*) FROM public.journal_entries")
    assert sizes["journal_entries"] == entries  # never analyzed: counted
    assert set(sizes) == {"users", "journal_entries", "tags", "reminders"}


def test_a_rehearsal_too_small_for_a_second_size_says_so() -> None:
    """Under 30 users no smaller size of 10 users is left: no fit, and the report says why
    rather than "not requested" (nothing is loaded for it: no database is needed)."""
    report = Report(server="", users=20, dirty=False, final=Run(100, synthetic(20)[:2]))
    rehearse_module._project(None, RehearsalOptions(users=20), report, None,  # type: ignore[arg-type]
                             {"users": 10**6}, "--production-rows", lambda _: None)
    assert report.projection is None
    assert report.projection_note.startswith("not projected: a fit needs two sizes")
    assert report.projection_note in render_text(report)
