"""Statements an application's pool prepared before the migration, executed during the
fill and after the swap.

The rehearsal prepares them as a pool would (``rehearsal.prepared``) and reports
each one the fill or the swap breaks, with the server's message and the advice; the
report names them in every format, and a rehearsal does not fail for them.
"""

from __future__ import annotations

import json

from migration.plan import build_plan
from migration.rehearsal.prepared import ADVICE, CHECK, Prepared
from migration.rehearsal.rehearse import RehearsalOptions, final_migration
from migration.rehearsal.report import Report, as_json, render_junit, render_text
from migration.report import Finding, Status
from tests.operate import connected, print_of, run_ok, seeded

BROKEN = {
    "uuid_migration_select_all": "cached plan must not change result type",
    "uuid_migration_select_by_key": "operator does not exist: uuid = text",
    "uuid_migration_select_child": "cached plan must not change result type",
    "uuid_migration_insert_child": "is of type uuid but expression is of type character varying",
}


def test_statements_prepared_before_the_migration_are_named_with_the_servers_message(
        legacy_db: str) -> None:
    seeded(legacy_db, users=10)
    with connected(legacy_db) as conn:
        plan = build_plan(conn)
    with Prepared.open(legacy_db, plan) as pool:
        assert [s.name for s in pool.statements] == list(BROKEN)
        assert pool.before == dict.fromkeys(BROKEN)  # each ran before the migration
        before = print_of(legacy_db)
        run_ok(legacy_db, "full_migration")
        migrated = print_of(legacy_db)
        findings = pool.after("after the swap")
    assert print_of(legacy_db) == migrated  # the INSERT was rolled back
    assert migrated != before
    assert [(f.check, f.status) for f in findings] == [(CHECK, Status.WARN)] * len(BROKEN)
    for finding, (name, message) in zip(findings, BROKEN.items(), strict=True):
        assert finding.subject.startswith(f"{name} ("), finding
        assert message in finding.message, finding
        assert finding.hint == ADVICE
    assert findings[2].subject.endswith('(SELECT * FROM "public"."journal_entries" LIMIT 1)')
    assert 'INSERT INTO "public"."journal_entries"' in findings[3].subject


def test_the_final_migration_executes_them_during_the_fill_and_after_the_swap(
        legacy_db: str) -> None:
    """Prepared before the final full_migration, executed once while migrate_foreign_keys
    fills the children's copies (every copy column of the plan added, the swap still to
    come) and once after the swap: the three ``SELECT *`` fail already during the fill,
    their result having grown by the copy column, the child's too; the INSERT into the
    child fails only after the swap."""
    seeded(legacy_db, users=10)
    with connected(legacy_db) as conn:
        plan = build_plan(conn)
    run, during, after = final_migration(legacy_db, plan, RehearsalOptions(),
                                         {t.name: 0 for t in plan.tables}, batch_size=1000,
                                         orphans="abort")
    assert run.error == ""
    assert [(f.subject.split(" ")[0], f.status) for f in during] == [
        ("uuid_migration_select_all", Status.WARN), ("uuid_migration_select_by_key", Status.WARN),
        ("uuid_migration_select_child", Status.WARN), ("uuid_migration_insert_child", Status.PASS)]
    for finding in during[:3]:
        assert finding.message.startswith("prepared before the migration, it fails during the "
                                          "fill (before the swap): cached plan must not "
                                          "change result type (SQLSTATE 0A000)"), finding
        assert finding.hint == ADVICE
    assert "runs during the fill" in during[3].message
    assert [(f.subject.split(" ")[0], f.status) for f in after] == [
        (name, Status.WARN) for name in BROKEN]
    for finding, message in zip(after, BROKEN.values(), strict=True):
        assert "it fails after the swap: " in finding.message
        assert message in finding.message


def test_a_statement_prepared_after_the_swap_runs(legacy_db: str) -> None:
    """The same statements prepared afresh after the migration run: the findings are about
    the statements' age, not about the migrated schema."""
    seeded(legacy_db, users=10)
    run_ok(legacy_db, "full_migration")
    with connected(legacy_db) as conn:
        plan = build_plan(conn)
    with Prepared.open(legacy_db, plan) as pool:
        assert [(f.status, f.subject.split(" ")[0]) for f in pool.after("again")] == [
            (Status.PASS, name) for name in BROKEN]


def test_the_report_names_each_failing_prepared_statement_and_still_passes() -> None:
    finding = Finding(CHECK, Status.WARN, "prepared before the migration, it fails after the "
                      "swap: operator does not exist: uuid = text (SQLSTATE 42883)",
                      "uuid_migration_select_by_key (SELECT * FROM public.users WHERE id = $1)",
                      hint=ADVICE)
    during = Finding(CHECK, Status.WARN, "prepared before the migration, it fails during the "
                     "fill (before the swap): cached plan must not change result type "
                     "(SQLSTATE 0A000)", "uuid_migration_select_all (SELECT * FROM public.users "
                     "LIMIT 1)", hint=ADVICE)
    report = Report(server="test", users=1, dirty=False, prepared=[finding],
                    prepared_during=[during])
    text = render_text(report)
    assert "executed during the fill" in text
    assert "cached plan must not change result type" in text
    assert "1 statement(s) prepared before the migration fail during the fill " \
           "(uuid_migration_select_all)" in text
    assert "uuid_migration_select_by_key" in text
    assert "operator does not exist: uuid = text" in text
    assert "recycle the application's connection pools" in text
    data = json.loads(as_json(report))
    assert any("uuid_migration_select_by_key" in note for note in data["compatibility"])
    assert data["prepared"][0]["subject"].startswith("uuid_migration_select_by_key")
    assert "operator does not exist: uuid = text" in render_junit(report)
    assert 'classname="rehearsal.prepared.during_expansion"' in render_junit(report)
    assert data["prepared_during"][0]["subject"].startswith("uuid_migration_select_all")
    assert "prepared" not in " ".join(report.problems())
