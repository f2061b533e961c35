"""rehearse: the whole runbook on scratch databases, its report, and its clean-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from click.testing import CliRunner
from psycopg2.extensions import parse_dsn

from migration.cli import main
from migration.connection import ConnectError, connect, connected
from migration.errors import MigrationError
from migration.operations import OPERATIONS, run
from migration.plan import build_plan
from migration.rehearsal import rehearse as rehearse_module
from migration.rehearsal import throwaway
from migration.rehearsal.fingerprint import fingerprint
from migration.rehearsal.rehearse import (
    STAGES,
    RehearsalOptions,
    Report,
    Scratch,
    parse_batch_sizes,
    parse_production_rows,
    planted_checks,
    production_rows,
    rehearse,
    render_text,
    rollback_copy,
    schema_database,
)
from migration.rehearsal.report import render_markdown
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox
from migration.rehearsal.seed import Planted, seed
from migration.rehearsal.throwaway import Server
from migration.report import Finding, Status
from migration.session import Session, Settings
from tests.operate import Terminal

# Rehearsals start their own throwaway servers: once per tox run is enough.
pytestmark = pytest.mark.once

SMALL = {"users": 200, "batch_sizes": (100, 1000)}


# --- the arithmetic and the options --------------------------------------------------------------

def test_production_rows_follow_users_in_the_rehearsal_proportions() -> None:
    measured = {"users": 100, "journal_entries": 300, "tags": 100, "reminders": 100}
    assert production_rows({"users": 1000}, measured, "users") == {
        "users": 1000, "journal_entries": 3000, "tags": 1000, "reminders": 1000}
    assert production_rows({"users": 1000, "tags": 7}, measured, "users")["tags"] == 7


def test_schema_from_names_the_database_to_project_for_unless_it_is_a_file(
        tmp_path: Path) -> None:
    dump = tmp_path / "schema"
    dump.write_text("CREATE TABLE users (id text);")
    assert schema_database("postgresql://app@db/app") == "postgresql://app@db/app"
    assert schema_database("dbname=app") == "dbname=app"
    assert schema_database("schema.sql") is None
    assert schema_database(str(dump)) is None
    assert schema_database(None) is None


def test_option_parsing() -> None:
    assert parse_batch_sizes("1000, 50000,1000") == (1000, 50000)
    assert parse_production_rows("1_000_000") == {"users": 1_000_000}
    assert parse_production_rows("users=10,tags=5") == {"users": 10, "tags": 5}
    every = "users=1,journal_entries=2,tags=3,reminders=4"
    assert parse_production_rows(every)["reminders"] == 4
    for bad in ("0", "", "10,-1"):
        with pytest.raises(ValueError, match="positive whole numbers"):
            parse_batch_sizes(bad)
    with pytest.raises(ValueError, match="expected a whole number, got 'ten'"):
        parse_batch_sizes("100, ten")
    with pytest.raises(ValueError, match="expected a whole number, got '1e6'"):
        parse_production_rows("users=1e6")
    with pytest.raises(ValueError, match="unknown table"):
        parse_production_rows("users=1,accounts=2")
    with pytest.raises(ValueError, match="give users=N"):
        parse_production_rows("tags=5")
    with pytest.raises(ValueError, match="positive"):
        parse_production_rows("0")


def test_a_planted_problem_not_reported_fails_the_rehearsal(legacy_no_fk_db: str) -> None:
    with connected(legacy_no_fk_db) as conn:
        plan = build_plan(conn)
    planted = Planted(invalid_ids=["not-a-uuid", "1234"],
                      orphans={"tags": ["00000000-0000-4000-8000-000000000001"]})
    findings = [Finding("invalid_uuid", Status.FAIL, "", subject="public.users.id",
                        samples=[{"table": "public.users", "id": "not-a-uuid"}])]
    checks = planted_checks(planted, findings, plan)
    assert [(c.value, c.found) for c in checks] == [
        ("not-a-uuid", True), ("1234", False), ("00000000-0000-4000-8000-000000000001", False)]
    report = Report(server="", users=1, dirty=True, planted=checks)
    assert any("'1234'" in problem for problem in report.problems())
    assert not report.passed


# --- the rollback comparison sees what a rollback leaves behind ----------------------------------

@pytest.mark.parametrize("leftover", [False, True])
def test_rollback_copy_compares_the_fingerprint(sandbox: Sandbox, request: pytest.FixtureRequest,
                                                *, leftover: bool) -> None:
    scratch = Scratch(sandbox.admin_dsn, "test", f"{sandbox.prefix}_rb{int(leftover)}",
                      OWNER_ROLE, sandbox.owner_password)
    source = scratch.create("source", template=sandbox.template("legacy"))
    try:
        with connected(scratch.dsn(source)) as conn:
            seed(conn, 20)
            with conn, conn.cursor() as cur:
                baseline = fingerprint(conn)
                if leftover:  # something rollback does not undo
                    cur.execute("CREATE TABLE public.stray (n int)")
        with Session.open(scratch.dsn(source), Settings(show_progress=False)) as session:
            run(session, "backup_data", OPERATIONS["backup_data"])
            run(session, "migrate_users", OPERATIONS["migrate_users"])
        check = rollback_copy(scratch, source, "migrate_users", baseline,
                              Settings(show_progress=False), "public")
    finally:
        scratch.drop(source)
    assert check.passed is not leftover
    assert check.differences == (("table public.stray: added",) if leftover else ())
    assert scratch.created == []


# --- whole rehearsals ----------------------------------------------------------------------------

Recorded = list[tuple[Server, str]]


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    """The throwaway servers rehearse starts, with their data directories."""
    started: Recorded = []
    real = throwaway.start_server

    def recording(*args: Any, **kwargs: Any) -> Server:
        server = real(*args, **kwargs)
        with connected(server.admin_dsn) as conn, conn.cursor() as cur:
            cur.execute("SHOW data_directory")
            started.append((server, str((cur.fetchone() or [""])[0])))
        return server

    monkeypatch.setattr(throwaway, "start_server", recording)
    return started


def assert_gone(started: Recorded) -> None:
    (server, data_directory), = started
    with pytest.raises(ConnectError):
        connect(server.admin_dsn).close()
    if server.backend != "docker":  # a container's folder is not on this machine
        assert not Path(data_directory).exists()


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> list[Planted]:
    """What the generated dataset of a rehearsal holds on purpose."""
    seen: list[Planted] = []
    real: Callable[..., Planted] = seed

    def recording(*args: Any, **kwargs: Any) -> Planted:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(rehearse_module, "seed", recording)
    return seen


def test_dirty_rehearsal_names_what_was_planted_and_rolls_back_from_every_stage(
        servers: Recorded, planted: list[Planted], monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    terminal = Terminal()
    monkeypatch.setattr("migration.progress.sys.stderr", terminal)
    report = rehearse(None, RehearsalOptions(**SMALL, dirty=True,  # type: ignore[arg-type]
                                             production={"users": 100_000}, progress=True),
                      said.append)
    assert report.problems() == []
    generated, *smaller = planted  # the rehearsal's dataset, then the clean ones of the fit
    assert smaller == [Planted(), Planted()]
    expected = [*generated.invalid_ids, *generated.colliding_ids, *generated.non_canonical_ids,
                *(v for values in generated.orphans.values() for v in values)]
    assert len(expected) >= 10
    assert set(generated.orphans) == {"tags", "reminders"}
    assert [p.value for p in report.planted] == expected
    assert all(p.found for p in report.planted)
    text = render_text(report)
    assert all(repr(value) in text for value in expected)
    assert [r.stage for r in report.rollbacks] == list(STAGES)
    assert all(r.passed and r.message.endswith("fingerprint matches") for r in report.rollbacks)
    assert "2 quarantined rows restored" in report.rollbacks[-1].message
    # the smoke writes, on the runbook's tables too: after each rollback and the migration
    assert [run.after for run in report.smoke] == [
        *(f"rollback from {stage}" for stage in STAGES), "full_migration"]
    assert {w.table for w in report.smoke[-1].writes} == {
        f"public.{t}" for t in report.rows}
    assert [w for run in report.smoke for w in run.writes if run.broken(w)] == []
    assert report.rows == {"users": 200, "journal_entries": 600, "tags": 200, "reminders": 200}
    assert report.final is not None
    assert [s.step for s in report.final.steps] == [
        "validate_schema", "backup_data", "migrate_users", "migrate_foreign_keys",
        "validate_migration", "verify"]
    # the batch size: 1,000 is not smaller than journal_entries (600 rows): not timed
    assert [t.batch_size for t in report.trials] == [100, 100]
    assert [why.split(":")[0] for why in report.skipped_sizes] == ["1,000"]
    assert report.batch_choice is not None
    assert report.final.batch_size == report.batch_choice.batch_size == 100
    assert "skipped 1,000: not smaller than the largest table (journal_entries, 600 rows)" \
        in text
    # the projection: fit over the full size and smaller ones, the stall apart
    assert set(report.sized) == {66, 22}
    projection = report.projection
    assert projection is not None
    assert projection.sizes == (200, 66, 22)
    assert projection.rows["journal_entries"] == 300_000
    assert projection.source == "--production-rows"
    assert [s.step for s in projection.steps] == [s.step for s in report.final.steps]
    assert 0 < projection.low <= projection.high
    assert projection.stall is not None
    assert 0 < projection.stall[0] <= projection.stall[1] < 5
    assert report.final.stall is not None
    markdown = render_markdown(report)
    assert "## Projected time for production" in markdown
    assert "- write stall, the time the application's writes wait: " in markdown
    assert "| migrate_users | 100,000 |" in markdown
    # the steps said as they start: which step of which clone
    for line in ("rehearse: batch size 100, timing 2 of 2: migrate_users",
                 "rehearse: runbook step by step, a copy rolled back after each stage: rollback",
                 "rehearse: final migration: migrate_foreign_keys",
                 "rehearse: final migration at 22 users, for the fit: validate_migration"):
        assert line in said, said
    # and the rows done as each fill runs, on a terminal
    drawn = terminal.getvalue()
    assert "\rfill public.users.id: 200 rows, " in drawn
    assert "\rfill public.users.id: 66 rows, " in drawn  # a size of the fit
    assert_gone(servers)


def test_clean_rehearsal_against_a_server_given_by_url(sandbox: Sandbox, legacy_db: str) -> None:
    """A URL names a server to make scratch databases on; its own database is not touched."""
    with connected(legacy_db) as conn:
        seed(conn, 30)
        before = fingerprint(conn)
    given = sandbox.admin_dsn_for(parse_dsn(legacy_db)["dbname"])
    # the schema's database named (--schema-from=DSN): the projection is for its tables' sizes
    report = rehearse(given, RehearsalOptions(**SMALL, dirty=False,  # type: ignore[arg-type]
                                              sizes_from=legacy_db, live_load=True))
    assert report.problems() == []
    assert [f for f in report.found if f.status in (Status.FAIL, Status.WARN)] == []
    assert report.planted == []
    assert report.remedies == []
    assert [r.stage for r in report.rollbacks] == [s for s in STAGES if s != "quarantine"]
    assert all(r.passed for r in report.rollbacks)
    assert report.projection is not None
    assert report.projection.rows == {"users": 30, "journal_entries": 90, "tags": 30,
                                      "reminders": 30}
    assert report.projection.source.startswith("the tables of ")
    # statements an application's pool prepared before the final migration: named, not failed
    assert [(f.subject.split(" ")[0], f.status) for f in report.prepared] == [
        ("uuid_migration_select_all", Status.WARN), ("uuid_migration_select_by_key", Status.WARN),
        ("uuid_migration_select_child", Status.WARN), ("uuid_migration_insert_child", Status.WARN)]
    assert "uuid = text" in render_text(report)
    # ... and executed during the fill too, where the SELECT * ones fail already
    assert [(f.subject.split(" ")[0], f.status) for f in report.prepared_during] == [
        ("uuid_migration_select_all", Status.WARN), ("uuid_migration_select_by_key", Status.WARN),
        ("uuid_migration_select_child", Status.WARN), ("uuid_migration_insert_child", Status.PASS)]
    # --live-load: the migration and the rollback once more under pgbench, on a clone
    assert report.live_load is not None
    assert [p.name for p in report.live_load.phases] == ["before", "full_migration",
                                                         "rollback", "after"]
    assert report.live_load.transactions > 0
    # on a clone taken before the final migration: the migration under load converts rows
    assert report.live_load.rows["full_migration"] > 0
    with connected(legacy_db) as conn:
        assert fingerprint(conn).diff(before) == []
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'uuidmig_rehearse%'")
            assert cur.fetchall() == []


def test_a_url_whose_role_cannot_create_databases_is_refused(legacy_db: str) -> None:
    with pytest.raises(MigrationError, match="CREATEDB"):
        rehearse(legacy_db, RehearsalOptions(users=1))


def test_the_throwaway_server_is_removed_after_an_interrupt(
        servers: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> NoReturn:
        raise KeyboardInterrupt

    monkeypatch.setattr(rehearse_module, "rollbacks_from_each_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rehearse(None, RehearsalOptions(users=50, batch_sizes=(1000,)))
    assert_gone(servers)


# --- the command ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-sizes", "0", "positive whole numbers"),
    ("--production-rows", "accounts=5", "unknown table"),
])
def test_bad_option_values_are_usage_errors(tmp_path: Path, option: str, value: str,
                                            message: str) -> None:
    result = CliRunner().invoke(main, ["--operation=rehearse", option, value,
                                       "--log-file", str(tmp_path / "log")])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_rehearse_command_exit_code_2_when_the_url_cannot_be_used(tmp_path: Path,
                                                                   legacy_db: str) -> None:
    result = CliRunner().invoke(main, ["--operation=rehearse", "--database-url", legacy_db,
                                       "--log-file", str(tmp_path / "log")])
    assert result.exit_code == 2
    assert "CREATEDB" in result.output

