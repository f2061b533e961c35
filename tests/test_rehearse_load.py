"""``rehearse --live-load``: the migration and the rollback under pgbench, as the report says.

The load itself (pgbench, the ledger, the prober) is proven in test_live_load.py; here
its wiring: each step its own phase, what the application saw reaching the report,
and a problem under load failing the rehearsal.
"""

from __future__ import annotations

import pytest

from migration.rehearsal import under_load as under_load_module
from migration.rehearsal.load import LoadUnavailable, PhaseStats
from migration.rehearsal.rehearse import live_load_wanted
from migration.rehearsal.report import Report, render_junit, render_text
from migration.rehearsal.under_load import STEPS, LoadRun, under_load
from tests.operate import execute, operate, seeded


def under_load_problems(report: Report) -> list[str]:
    """The report's problems from the load (a report made here has no final migration)."""
    return [p for p in report.problems() if p.startswith("under live load")]


def test_the_migration_and_the_rollback_run_under_load_each_a_phase(legacy_db: str) -> None:
    seeded(legacy_db, users=500)
    ran: list[str] = []

    def step(name: str) -> str | None:
        ran.append(name)
        result = operate(legacy_db, name, "--batch-size=100")
        return None if result.exit_code == 0 else result.output

    load = under_load(legacy_db, step, baseline_s=1.0)
    assert ran == list(STEPS)
    assert load.failed() == []
    assert [p.name for p in load.phases] == ["before", *STEPS, "after"]
    assert load.transactions > 0
    assert execute(legacy_db, "SELECT data_type FROM information_schema.columns WHERE "
                              "(table_name, column_name) = ('users', 'id')") == [
        ("character varying",)]  # rolled back, with the load's rows kept
    report = Report(server="test", users=500, dirty=False, live_load=load)
    assert under_load_problems(report) == []
    text = render_text(report)
    assert "Under live load (4 pgbench clients at 150 transactions/s" in text
    assert "no application transaction failed" in text


def test_a_step_that_fails_under_load_ends_the_run_and_is_named(legacy_db: str) -> None:
    seeded(legacy_db, users=50)
    load = under_load(legacy_db, lambda name: "refused: something", baseline_s=0.2)
    assert load.error == "full_migration: refused: something"
    assert [p.name for p in load.phases] == ["before", "full_migration", "after"]


def test_what_the_application_saw_go_wrong_fails_the_rehearsal() -> None:
    phase = PhaseStats("full_migration", 2.0, 300, 1, 1.0, 5.0, 40.0, 0.04, 0.5)
    load = LoadRun(150.0, 4, [phase], 300, problems=[
        "1 of 301 application transactions failed: 1x new_tag: failed (42P01)"])
    report = Report(server="test", users=1, dirty=False, live_load=load)
    assert under_load_problems(report) == [
        "under live load: 1 of 301 application transactions failed: 1x new_tag: failed (42P01)"]
    assert not report.passed
    assert "new_tag: failed (42P01)" in render_text(report)
    assert "new_tag: failed (42P01)" in render_junit(report)


def test_live_load_is_a_usage_error_with_schema_from_and_with_other_operations() -> None:
    result = operate("postgresql://nobody@127.0.0.1:1/none", "rehearse", "--live-load",
                     "--schema-from=schema.sql")
    assert result.exit_code == 2
    assert "--live-load drives the runbook's tables" in result.output
    result = operate("postgresql://nobody@127.0.0.1:1/none", "full_migration", "--live-load")
    assert result.exit_code == 2
    assert "--live-load belongs to --operation=rehearse" in result.output
    result = operate("postgresql://nobody@127.0.0.1:1/none", "full_migration", "--no-live-load")
    assert result.exit_code == 2
    assert "--live-load belongs to --operation=rehearse" in result.output


def test_live_load_is_on_by_default_where_pgbench_is_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not given: on where pgbench 15 or later is found (the suite's hosts have one), off
    with --schema-from (pgbench's scripts write the runbook's tables); given, as given."""
    assert live_load_wanted(given=None, schema_from=None) is True
    assert live_load_wanted(given=None, schema_from="schema.sql") is False
    assert live_load_wanted(given=False, schema_from=None) is False
    assert live_load_wanted(given=True, schema_from=None) is True

    def missing() -> None:
        raise LoadUnavailable("no pgbench 15 or later among nothing")

    monkeypatch.setattr(under_load_module, "find_pgbench", missing)
    assert live_load_wanted(given=None, schema_from=None) is False
    assert live_load_wanted(given=True, schema_from=None) is True  # asked for: its absence reported
