"""``--max-rows-per-second``: the pauses the bound asks for, and runs that take them.

The pauses are pinned as arithmetic (``pause_after``, ``Pacer.schedule`` with the
times given), never by timing a run; a run with a bound is pinned by what it
records (``migration_log``'s ``paced``) and by ending exactly where a run without
one ends: the migration verified, the rollback the database as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg2 import sql

from migration import backup
from migration.model import Table
from migration.operations import OPERATIONS, run
from migration.pace import Paced, Pacer, pause_after
from migration.session import Session, Settings
from tests.operate import (
    connected,
    execute,
    operate,
    print_of,
    run_in_process,
    run_verify,
    seeded,
)

# One batch of 10 rows is to take 0.1 s at 100 rows/s: a batch of the tests' small tables
# takes milliseconds, so every run below waits (at most a few seconds in all).
BOUND = 100
PACED = Settings(batch_size=10, max_rows_per_second=BOUND, show_progress=False)
# Batches of 10 rows, at a bound a small table never reaches: many batches, no long wait.
BATCHED = Settings(batch_size=10, max_rows_per_second=1_000_000, show_progress=False)


@pytest.mark.parametrize(("rows", "elapsed", "limit", "pause"), [
    (1000, 0.0, 1000, 1.0),  # an instant batch waits its whole share
    (1000, 0.25, 1000, 0.75),  # its own time counts towards it
    (1000, 1.0, 1000, 0.0),  # exactly at the bound
    (1000, 3.0, 1000, 0.0),  # slower than the bound: no wait, and no credit
    (500, 0.1, 2000, 0.15),
    (7, 0.0, 0.5, 14.0),  # a bound below one row a second
    (0, 0.0, 1000, 0.0),  # a batch that wrote nothing (the walk's last)
    (1000, 0.0, 0, 0.0),  # no bound
])
def test_the_pause_after_a_batch_keeps_its_rows_per_second_under_the_bound(
        rows: int, elapsed: float, limit: float, pause: float) -> None:
    assert pause_after(rows, elapsed, limit) == pytest.approx(pause)


def test_batches_of_several_workers_share_one_bound() -> None:
    """Two workers' batches of 100 rows at 100 rows/s: one batch a second between them,
    however they interleave; a batch after a standstill is paced alone, no credit saved."""
    pacer = Pacer(100)
    assert pacer.schedule(100, started=0.0, now=0.1) == pytest.approx(0.9)  # paid at 1.0
    assert pacer.schedule(100, started=0.0, now=0.2) == pytest.approx(1.8)  # paid at 2.0
    assert pacer.schedule(100, started=1.0, now=1.1) == pytest.approx(1.9)  # paid at 3.0
    assert pacer.schedule(100, started=10.0, now=10.5) == pytest.approx(0.5)  # after a pause
    assert pacer.totals() == Paced(batches=4, rows=400, waits=4, waited_s=pytest.approx(5.1))


def test_without_a_bound_nothing_waits_nor_is_recorded() -> None:
    pacer = Pacer(0)
    assert pacer.schedule(10_000, started=0.0, now=0.0) == 0.0
    assert pacer.record("migrate_users", Paced()) == {}


def test_the_bound_is_a_usage_error_with_an_operation_that_writes_no_table() -> None:
    result = operate("postgresql://nobody@127.0.0.1:1/none", "validate_schema",
                     "--max-rows-per-second=100")
    assert result.exit_code == 2
    assert "--max-rows-per-second belongs to --operation=backup_data" in result.output


def paced_runs(dsn: str) -> dict[str, dict[str, Any]]:
    """Each operation's last ``paced`` record in migration_log."""
    return {str(name): dict(paced) for name, paced in execute(
        dsn, "SELECT DISTINCT ON (operation) operation, details -> 'paced' FROM migration_log "
             "WHERE details ? 'paced' ORDER BY operation, id DESC")}


def test_a_bounded_migration_and_rollback_wait_between_batches_and_end_exactly(
        legacy_db: str) -> None:
    seeded(legacy_db, users=20)
    before = print_of(legacy_db)
    run_in_process(legacy_db, "full_migration", settings=PACED)
    assert run_verify(legacy_db).exit_code == 0
    run_in_process(legacy_db, "rollback", settings=PACED)
    assert print_of(legacy_db) == before
    paced = paced_runs(legacy_db)
    assert set(paced) == {"backup_data", "migrate_users", "migrate_foreign_keys",
                          "full_migration", "rollback"}
    for name, record in paced.items():
        assert record["max_rows_per_second"] == BOUND, name
        assert record["waits"] >= 1, (name, record)
        assert record["waited_s"] > 0, (name, record)
    assert paced["backup_data"]["rows"] == 120  # 20 users, 60 entries, 20 tags, 20 reminders
    assert paced["migrate_users"]["rows"] == 20
    # the rows given a copy: 60 entries, 20 tags, 18 of the 20 reminders (2 have no user)
    assert paced["migrate_foreign_keys"]["rows"] == 98


def test_a_paced_backup_is_copied_in_batches_from_one_snapshot(legacy_db: str) -> None:
    """Between two of the copy's batches the application inserts, updates and deletes
    rows of the table being copied, on pages copied and not yet copied: the copy is
    the tables as they were when it began, and the change log holds those writes."""
    seeded(legacy_db, users=300)  # over several pages: several batches of 10 rows' pages
    tables = ("users", "journal_entries", "tags", "reminders")
    with connected(legacy_db) as conn, conn.cursor() as cur:
        sums = {table: backup.table_checksum(cur, sql.Identifier(table),
                                             backup.columns_of(cur, sql.Identifier(table)))
                for table in tables}
    reached: list[str] = []

    def write(point: str, pid: int) -> None:
        reached.append(point)
        if point == "backup_data: batch public.users#2":
            execute(legacy_db, "UPDATE users SET display_name = 'moved' WHERE id IN "
                               "((SELECT min(id) FROM users), (SELECT max(id) FROM users))")
            execute(legacy_db, "INSERT INTO users (email) VALUES ('during@example.com')")
            execute(legacy_db, "DELETE FROM tags WHERE id = (SELECT max(id) FROM tags)")

    with Session.open(legacy_db, BATCHED) as session:
        session.fault = write
        run(session, "backup_data", OPERATIONS["backup_data"])
    assert "backup_data: batch public.users#3" in reached
    with connected(legacy_db) as conn, conn.cursor() as cur:
        for table in tables:
            copy = backup.backup_name("migration_backup", Table("public", table))
            assert backup.table_checksum(cur, copy, backup.columns_of(
                cur, sql.Identifier(table))) == sums[table], table
    assert execute(legacy_db, "SELECT table_name, operation, count(*) FROM "
                              "migration_backup.change_log GROUP BY 1, 2 ORDER BY 1, 2") == [
        ("tags", "DELETE", 1), ("users", "INSERT", 1), ("users", "UPDATE", 2)]

