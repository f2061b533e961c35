"""With ``--jobs`` above one, the expand's proofs, index builds and validations of the
foreign keys' copies of different tables run at the same time, each on a connection of
its own, and an interrupted build is built again on resume; with one job the engine's own
connection does it all, one after the other."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2
import pytest

from migration.operations import OPERATIONS, run
from migration.rehearsal.fingerprint import Fingerprint, expected_after_migration
from migration.session import Session, Settings
from tests.operate import (
    MIGRATED_DEFAULTS,
    PLAN_KEYS,
    connected,
    execute,
    print_of,
    run_ok,
    seeded,
    wait_until,
)

CHILDREN = ("journal_entries", "tags", "reminders")
# The fault point of the last child's proof, the last step before the index builds.
LAST_PROOF = f"validate migration_filled_user_id#{len(CHILDREN)}"
BUILDING = ("SELECT pid, relid::regclass::text FROM pg_stat_progress_create_index "
            "WHERE datname = current_database() ORDER BY pid")


def expected(dsn: str) -> Fingerprint:
    with connected(dsn, autocommit=False) as conn:
        return expected_after_migration(conn, PLAN_KEYS, defaults=MIGRATED_DEFAULTS)


@contextmanager
def builds_held(dsn: str, react: Callable[[list[tuple[object, ...]]], bool]
                ) -> Iterator[Callable[[str, int], None]]:
    """A fault hook that, at ``LAST_PROOF``, has another session take ROW EXCLUSIVE on the
    child tables, as an application's open transaction that wrote to them would: every
    ``CREATE INDEX CONCURRENTLY`` on them then waits for it, shown in
    ``pg_stat_progress_create_index``.  A watcher calls ``react`` with what that view
    shows until it returns True (at most ``wait_until``'s patience), then the session
    commits and the builds go on."""
    blocker = psycopg2.connect(dsn)
    watcher: list[threading.Thread] = []

    def watch() -> None:
        try:
            wait_until(lambda: react(execute(dsn, BUILDING)))
        finally:
            blocker.commit()

    def fault(point: str, pid: int) -> None:
        if point == LAST_PROOF:
            with blocker.cursor() as cur:
                cur.execute("LOCK TABLE journal_entries, tags, reminders "
                            "IN ROW EXCLUSIVE MODE")
            watcher.append(threading.Thread(target=watch))
            watcher[0].start()

    try:
        yield fault
    finally:
        for thread in watcher:
            thread.join()
        blocker.close()


def migrated_children(dsn: str, settings: Settings, fault: Callable[[str, int], None]
                      ) -> None:
    with Session.open(dsn, settings) as session:
        session.fault = fault
        run(session, "migrate_foreign_keys", OPERATIONS["migrate_foreign_keys"])


def test_two_jobs_build_two_tables_indexes_at_the_same_time(legacy_db: str) -> None:
    seeded(legacy_db, users=60)
    after_migration = expected(legacy_db)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    at_once: list[set[str]] = []

    def two_tables(rows: list[tuple[object, ...]]) -> bool:
        tables = {str(table) for _, table in rows}
        if len(tables) >= 2:
            at_once.append(tables)
        return bool(at_once)

    with builds_held(legacy_db, two_tables) as fault:
        migrated_children(legacy_db, Settings(batch_size=7, jobs=2, show_progress=False),
                          fault)
    assert at_once, "the index builds of the child tables never ran at the same time"
    assert at_once[0] <= set(CHILDREN)
    assert print_of(legacy_db) == after_migration


def validating_at_once(dsn: str, validation: str) -> list[set[str]]:
    """``migrate_foreign_keys`` with two jobs, whose first two fault points that match
    ``validation`` (a pattern of ``validate NAME#N``) wait for each other, their
    transactions open (a barrier that times out, failing the run, if they come one after
    the other); the child tables the server shows locked for validation (SHARE UPDATE
    EXCLUSIVE) while both wait."""
    validating: list[set[str]] = []

    def record() -> None:
        validating.append({str(table) for (table,) in execute(
            dsn, "SELECT relation::regclass::text FROM pg_locks "
                 "WHERE mode = 'ShareUpdateExclusiveLock' AND granted "
                 "AND relation = ANY(%s::regclass[])", (list(CHILDREN),))})

    barrier = threading.Barrier(2, action=record, timeout=20)
    arrived: list[str] = []

    def fault(point: str, pid: int) -> None:
        if re.match(validation, point):
            arrived.append(point)
            if len(arrived) <= 2:
                barrier.wait()

    migrated_children(dsn, Settings(batch_size=7, jobs=2, show_progress=False), fault)
    return validating


@pytest.mark.parametrize("validation", [r"validate migration_filled_user_id#",
                                        r"validate \w+_fkey#"], ids=["proofs", "foreign_keys"])
def test_two_jobs_validate_two_child_tables_at_the_same_time(legacy_db: str,
                                                             validation: str) -> None:
    """The proofs of the children's copies (their CHECKs), and the foreign keys' copies."""
    seeded(legacy_db, users=60)
    after_migration = expected(legacy_db)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    validating = validating_at_once(legacy_db, validation)
    assert [len(tables) for tables in validating] == [2], validating
    assert print_of(legacy_db) == after_migration


def test_one_job_builds_every_index_on_the_engines_own_connection(legacy_db: str) -> None:
    seeded(legacy_db, users=60)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    pids: set[int] = set()

    def fault(point: str, pid: int) -> None:
        pids.add(pid)

    with Session.open(legacy_db, Settings(batch_size=7, jobs=1, show_progress=False)) as s:
        s.fault = fault
        run(s, "migrate_foreign_keys", OPERATIONS["migrate_foreign_keys"])
        own = s.conn.get_backend_pid()
    assert pids == {own}  # the fill, the proofs, the builds, the foreign keys, the swap


def test_a_parallel_build_killed_midway_is_built_again_on_resume(legacy_db: str) -> None:
    """One of two builds waiting at once is ended by pg_terminate_backend, which leaves its
    index INVALID: the step fails, and run again it drops that index, builds it again and
    finishes with the data as a migration leaves it."""
    seeded(legacy_db, users=60)
    after_migration = expected(legacy_db)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    killed: list[object] = []

    def kill_one(rows: list[tuple[object, ...]]) -> bool:
        if len(rows) >= 2 and not killed:
            pid, table = rows[0]
            execute(legacy_db, "SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(table)
        return bool(killed)

    with builds_held(legacy_db, kill_one) as fault, pytest.raises(psycopg2.OperationalError):
        migrated_children(legacy_db, Settings(batch_size=7, jobs=2, show_progress=False),
                          fault)
    assert killed
    invalid = execute(legacy_db, "SELECT indexrelid::regclass::text FROM pg_index "
                                 "WHERE NOT indisvalid AND indrelid = %s::regclass",
                      (str(killed[0]),))
    assert invalid, f"the killed build left no invalid index on {killed[0]}"
    run_ok(legacy_db, "migrate_foreign_keys", "--jobs", "2")
    assert not execute(legacy_db, "SELECT 1 FROM pg_index i JOIN pg_class c "
                                  "ON c.oid = i.indrelid WHERE NOT i.indisvalid "
                                  "AND c.relnamespace = 'public'::regnamespace")
    assert print_of(legacy_db) == after_migration
