"""The engine's waits for locks are bounded, and it never holds one lock while it waits for
another (issues 20 and 22).

An application session holds a row or a table; the engine's statement that
needs it gives back what it took within ``lock_timeout`` and tries again,
while another application statement gets through.  The swap and the change
log's triggers take their tables' locks waiting for the first only.  An
autovacuum really holding a table (started on cue by per-table settings and a
short ``autovacuum_naptime``) does not stop the rollback of an ordinary owner,
and whoever holds a lock is named as far as that role may see.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
import pytest

from migration.connection import connect, engine_application_name
from migration.engine import expand, fill, rollback, swap
from migration.errors import MigrationError
from migration.operations import OPERATIONS, run
from migration.rehearsal.sandbox import Sandbox
from migration.session import Session, Settings
from tests.operate import (
    connected,
    execute,
    print_of,
    run_in_process,
    run_ok,
    sampled,
    seeded,
    wait_until,
)

USERS = 12
# Users whose ids are not canonical text (uppercase), each with journal entries that
# spell the id the same way: the rollback's respell and follow update exactly these.
SHOUTING = ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "B1EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12",
            "C2EEBC99-9C0B-4EF8-BB6D-6BB9BD380A13", "D3EEBC99-9C0B-4EF8-BB6D-6BB9BD380A14"]
HELD = SHOUTING[2]  # the application's row
# Short pauses, and attempts enough that the engine is still retrying when it is looked at.
SETTINGS = Settings(show_progress=False, batch_size=1000, jobs=1, ddl_pause_cap_s=0.3,
                    ddl_attempts=300)
PLAN_TABLES = ["users", "journal_entries", "tags", "reminders"]
# Modes that block the application's writes, held by the engine while it waits: the defect.
WRITE_BLOCKING = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"]


@pytest.fixture
def db(legacy_db: str) -> str:
    seeded(legacy_db, users=USERS)
    for user in SHOUTING:
        execute(legacy_db, "INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@x"))
        execute(legacy_db, "INSERT INTO journal_entries (user_id, title) "
                           "SELECT %s, 'entry ' || k FROM generate_series(1, 3) k", (user,))
    return legacy_db


class Warnings(logging.Handler):
    """The engine's warnings, as they are logged, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)


@contextmanager
def engine_warnings() -> Iterator[Warnings]:
    handler, engine = Warnings(), logging.getLogger("migration")
    engine.addHandler(handler)
    try:
        yield handler
    finally:
        engine.removeHandler(handler)


@dataclass
class Background:
    """An engine call in a thread of its own: its result or its error once it ends."""

    call: Callable[[], Any]
    result: list[Any] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(self.call())
        except BaseException as exc:  # handed to the test's thread
            self.error.append(exc)

    def join(self) -> Any:
        self.thread.join()
        if self.error:
            raise self.error[0]
        return self.result[0]


def lock_waits_while_holding(dsn: str) -> AbstractContextManager[list[tuple[Any, ...]]]:
    """Samples ``pg_locks`` while the with-block runs: every moment an engine backend of
    this process waited for a lock while it held a lock on a table of the plan that
    blocks the application's writes."""
    return sampled(dsn, """
        SELECT w.locktype, w.relation::regclass::text, h.mode, h.relation::regclass::text
        FROM pg_stat_activity a
        JOIN pg_locks w ON w.pid = a.pid AND NOT w.granted
        JOIN pg_locks h ON h.pid = a.pid AND h.granted AND h.locktype = 'relation'
         AND h.relation = ANY (%s::regclass[]) AND h.mode = ANY (%s)
        WHERE a.application_name = %s""",
                   (PLAN_TABLES, WRITE_BLOCKING, engine_application_name()))


# -- 1. the engine's whole-table UPDATEs and fill batches ------------------------------------

def _fill(session: Session, dsn: str) -> Callable[[], Any]:
    fill.add_temporary_column(session, session.plan.parent)  # its DDL before the hold
    return lambda: fill.fill(session, (session.plan.parent,), 0)


def _fill_missed(session: Session, dsn: str) -> Callable[[], Any]:
    parent = session.plan.parent
    fill.fill(session, (parent,), 0)
    # A write the sync trigger does not see (as with the table's triggers disabled): an
    # application's own write to a row fills its copy.
    execute(dsn, "SET uuid_migration.engine = 'on'; "
                 "UPDATE users SET id_uuid = NULL WHERE id = ANY (%s)", (SHOUTING,))
    return lambda: fill.fill_missed_rows(session, parent, 0)


def _respell(session: Session, dsn: str) -> Callable[[], Any]:
    back = session.plan.reversed()
    fill.fill(session, (back.parent,), 0)
    return lambda: rollback.respell(session, back.parent)


def _follow(session: Session, dsn: str) -> Callable[[], Any]:
    back = session.plan.reversed()
    child = next(key for key in back.children if key.table.name == "journal_entries")
    fill.fill(session, (back.parent,), 0)
    rollback.respell(session, back.parent)
    fill.fill(session, (child,), 0, follows={child: back.parent})
    return lambda: rollback.follow(session, child, back.parent)


@dataclass(frozen=True)
class Phase:
    steps: tuple[str, ...]  # the operations before it
    prepare: Callable[[Session, str], Callable[[], Any]]  # the engine up to it; the call
    table: str  # whose rows it updates
    label: str  # its retries are logged under
    returns: int | None  # rows updated


PHASES = {
    "fill batches": Phase(("backup_data",), _fill, "users", "batch public.users.id",
                          USERS + len(SHOUTING)),
    "fill_missed_rows": Phase(("backup_data",), _fill_missed, "users",
                              "fill missed public.users.id", None),
    "respell": Phase(("full_migration",), _respell, "users", "respell public.users.id",
                     len(SHOUTING)),
    "follow": Phase(("full_migration",), _follow, "journal_entries",
                    "respell public.journal_entries.user_id", 3 * len(SHOUTING)),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_row_the_application_holds_is_waited_for_a_bounded_time_holding_nothing(
        db: str, phase: str) -> None:
    """An application holds one row the engine must update; the engine's statement waits
    for it at most ``lock_timeout`` and gives back the rows it took, then tries again: while
    the row is held, another application statement locks every other row the engine
    updates, and the engine is still retrying.  One whole-table UPDATE (or a fill batch
    without lock_timeout) held them all while it waited for the one (2.2 s behind 3 s)."""
    steps, prepare, label = PHASES[phase].steps, PHASES[phase].prepare, PHASES[phase].label
    before = print_of(db)
    for step in steps:
        run_ok(db, step)
    held = ("SELECT 1 FROM journal_entries WHERE user_id::text = lower(%s) FOR UPDATE"
            if PHASES[phase].table == "journal_entries" else
            "SELECT 1 FROM users WHERE id::text = lower(%s) OR id::text = %s FOR UPDATE")
    others = held.replace("= lower(%s)", "<> lower(%s)").replace(" OR id::text = %s",
                                                                 " AND id::text <> %s")
    application = connect(db, application_name="application", autocommit=False)
    with engine_warnings() as warnings, Session.open(db, SETTINGS) as session:
        action = prepare(session, db)
        try:
            with application.cursor() as cur:
                cur.execute(held, (HELD,) * held.count("%s"))
                assert cur.rowcount > 0
            engine = Background(action)
            wait_until(lambda: warnings.count(f"{label}: lock not granted") >= 2
                       or not engine.thread.is_alive())
            assert warnings.count(f"{label}: lock not granted") >= 2, warnings.messages
            assert engine.thread.is_alive()
            with connected(db) as other, other.cursor() as cur:
                cur.execute("SET lock_timeout = '10s'")
                cur.execute(others, (HELD,) * others.count("%s"))  # every other row, at once
                assert cur.rowcount > 0
            assert engine.thread.is_alive()  # still retrying: the held row is still held
        finally:
            application.rollback()
            application.close()
        assert engine.join() == PHASES[phase].returns
    run_ok(db, "rollback")
    after = print_of(db)
    assert after == before, "\n".join(before.diff(after))


def blockers(dsn: str, application_name: str) -> list[tuple[Any, ...]]:
    """Whoever the sessions named ``application_name`` wait for a lock behind, by name."""
    return execute(dsn, "SELECT b.application_name FROM pg_stat_activity a, "
                        "unnest(pg_blocking_pids(a.pid)) blocker "
                        "JOIN pg_stat_activity b ON b.pid = blocker "
                        "WHERE a.application_name = %s", (application_name,))


def test_respell_by_content_holds_no_row_but_its_batch_s_while_it_waits(db: str) -> None:
    """A table without a unique key is respelled by content: its rows are paired across the
    whole table, and the pairs were updated by one statement, which held every row it had
    respelled while it waited for the one an application held.  Now it updates them in
    batches: with the engine waiting for the held row (a long ``lock_timeout``, so that
    the wait lasts until the test ends it), the application writes the other rows the
    walk respells, and waits for nobody."""
    execute(db, "CREATE TABLE user_roles (user_id varchar(36) NOT NULL REFERENCES users (id), "
                "role text NOT NULL)")
    execute(db, "INSERT INTO user_roles SELECT id, 'reader' FROM users WHERE id <> %s "
                "ORDER BY id", (HELD,))
    execute(db, "INSERT INTO user_roles VALUES (%s, 'reader')", (HELD,))  # walked last
    before = print_of(db)
    run_ok(db, "full_migration")
    settings = dataclasses.replace(SETTINGS, batch_size=1, lock_timeout_ms=600_000)
    others = [user.lower() for user in SHOUTING if user != HELD]

    def write_the_others() -> None:
        with connected(db) as conn, conn.cursor() as cur:
            cur.execute("SET application_name = 'writer'")
            cur.execute("UPDATE user_roles SET role = role WHERE user_id::text = ANY (%s)",
                        (others,))

    waited: list[tuple[Any, ...]] = []
    application = connect(db, application_name="application", autocommit=False)
    with Session.open(db, settings) as session:
        back = session.plan.reversed()
        roles = next(key for key in back.children if key.table.name == "user_roles")
        fill.fill(session, (back.parent,), 0)
        fill.fill(session, (roles,), 0, follows={roles: back.parent})
        try:
            with application.cursor() as cur:
                cur.execute("SELECT 1 FROM user_roles WHERE user_id::text = lower(%s) "
                            "FOR UPDATE", (HELD,))
            engine = Background(lambda: rollback.respell(session, roles))
            assert wait_until(lambda: blockers(db, engine_application_name()) == [
                ("application",)])
            writer = Background(write_the_others)
            wait_until(lambda: bool(blockers(db, "writer")) or not writer.thread.is_alive())
            waited = blockers(db, "writer")
            assert engine.thread.is_alive()  # still waiting for the held row
        finally:
            application.rollback()
            application.close()
        writer.join()
        assert engine.join() == len(SHOUTING)
    assert waited == []
    run_ok(db, "rollback")
    after = print_of(db)
    assert after == before, "\n".join(before.diff(after))


# -- 2. the swap and the change log take their tables' locks waiting for one -------------------

def expanded(dsn: str, *, referenced: bool = True) -> None:
    """Every column expanded and referenced: all that is left is the swap (without
    ``referenced``, the foreign keys between the copies are left too)."""
    run_ok(dsn, "backup_data")
    run_ok(dsn, "migrate_users")
    with Session.open(dsn, SETTINGS) as session:
        plan = session.plan
        fill.fill(session, plan.children, 0)
        for key in plan.children:
            fill.prove_filled(session, key, 0)
            expand.build_indexes(session, key)
        if referenced:
            expand.reference(session, plan)


@contextmanager
def statements_sent(session: Session) -> Iterator[list[str]]:
    """Every statement the session's cursors send in the with-block, as text, in order:
    each one a round trip (a query's text in ``pg_stat_activity`` stops at 1 kB)."""
    sent: list[str] = []

    class Recording(psycopg2.extensions.cursor):  # type: ignore[misc]
        def execute(self, query: Any, variables: Any = None) -> None:
            sent.append(query if isinstance(query, str) else query.as_string(self))
            super().execute(query, variables)

    original, session.conn.cursor_factory = session.conn.cursor_factory, Recording
    try:
        yield sent
    finally:
        session.conn.cursor_factory = original


@contextmanager
def table_held(dsn: str, statement: str) -> Iterator[None]:
    """An application's transaction holding a table's lock for the with-block."""
    application = connect(dsn, application_name="application", autocommit=False)
    try:
        with application.cursor() as cur:
            cur.execute(statement)
        yield
    finally:
        application.rollback()
        application.close()


def run_while_held(dsn: str, statement: str, label: str,
                   call: Callable[[], Any]) -> tuple[Any, list[tuple[Any, ...]], int]:
    """``call`` in the engine while an application holds a table (``statement``), released
    once the engine has failed three attempts; its result, every moment it waited while
    holding a write-blocking lock, and its failed attempts."""
    with engine_warnings() as warnings, lock_waits_while_holding(dsn) as waits:
        with table_held(dsn, statement):
            engine = Background(call)
            wait_until(lambda: warnings.count(f"{label}: lock not granted") >= 3
                       or not engine.thread.is_alive())
        result = engine.join()
    return result, waits, warnings.count(f"{label}: lock not granted")


def test_the_swap_never_holds_a_table_while_it_waits_for_another(db: str) -> None:
    """A child held by an application: the swap waits for one lock at most per attempt and
    holds none while it waits (it held users and two children 100 ms per attempt while it
    waited for the third, and the application's INSERT INTO users waited behind them)."""
    expanded(db)
    with Session.open(db, SETTINGS) as session:
        held, waits, failed = run_while_held(
            db, "LOCK TABLE tags IN ACCESS SHARE MODE", "swap",
            lambda: swap.swap(session, session.plan).held_s)
    assert failed >= 3
    assert waits == []
    assert held >= 0
    assert execute(db, "SELECT data_type FROM information_schema.columns "
                       "WHERE table_name = 'tags' AND column_name = 'user_id'") == [("uuid",)]


def test_the_change_log_never_holds_a_table_while_it_waits_for_another(db: str) -> None:
    """A writer's open transaction on tags (the third table in order): CREATE TRIGGER held
    journal_entries and reminders (SHARE ROW EXCLUSIVE, which blocks writes) while it
    waited for tags; now it takes them all waiting for the first only."""
    _, waits, failed = run_while_held(
        db, "LOCK TABLE tags IN ROW EXCLUSIVE MODE", "backup_data: change log",
        lambda: run_in_process(db, "backup_data", settings=SETTINGS))
    assert failed >= 3
    assert waits == []
    assert execute(db, "SELECT count(*) FROM pg_trigger WHERE tgname = 'migration_change_log'"
                   ) == [(4,)]


def test_the_change_log_blocks_writes_only_for_its_triggers_in_one_round_trip(
        db: str) -> None:
    """backup_data's change log reads what its triggers need from the catalog under SHARE
    UPDATE EXCLUSIVE (no DDL, the application writes on), then takes SHARE ROW EXCLUSIVE,
    which blocks writes, for one round trip of statements: read under it, with every
    statement a round trip of its own, it held the writes for 28 (issue 22).  At its
    commit's fault point it holds both locks on every table (locks are held to the commit),
    and the last query its backend received holds every table's trigger statements."""
    seen: dict[str, Any] = {}

    def look(label: str, pid: int) -> None:
        if label == "backup_data: change log#1":  # just before its commit
            seen["locks"] = execute(
                db, "SELECT relation::regclass::text, mode FROM pg_locks WHERE pid = %s "
                    "AND locktype = 'relation' AND relation = ANY (%s::regclass[])",
                (pid, PLAN_TABLES))
            seen["sent"] = len(sent)

    with Session.open(db, SETTINGS) as session, statements_sent(session) as sent:
        session.fault = look
        run(session, "backup_data", OPERATIONS["backup_data"])
    assert set(seen["locks"]) == {(table, mode) for table in PLAN_TABLES for mode in (
        "ShareUpdateExclusiveLock", "ShareRowExclusiveLock")}
    locked = [number for number, text in enumerate(sent) if "SHARE ROW EXCLUSIVE MODE" in text]
    assert len(locked) == 1, sent
    under = sent[locked[0]:seen["sent"]]
    assert len(under) == 2, under
    for table in PLAN_TABLES:
        for statement in ('CREATE OR REPLACE TRIGGER "migration_change_log" AFTER INSERT OR '
                          f'UPDATE OR DELETE ON "public"."{table}"',
                          f'ALTER TABLE "public"."{table}" ENABLE ALWAYS TRIGGER '
                          '"migration_change_log_truncate"'):
            assert statement in under[1], under[1]


def test_a_foreign_key_copy_never_holds_the_parent_while_it_waits_for_the_child(
        db: str) -> None:
    """A writer's open transaction on tags: adding the FK copy from tags to users held
    users in SHARE ROW EXCLUSIVE, which blocks every write to users, while it waited up to
    lock_timeout for tags, in each attempt; now it asks the child NOWAIT, as the swap
    does (issue 22)."""
    expanded(db, referenced=False)
    with Session.open(db, SETTINGS) as session:
        _, waits, failed = run_while_held(
            db, "LOCK TABLE tags IN ROW EXCLUSIVE MODE", "fk tags_user_id_fkey",
            lambda: expand.reference(session, session.plan))
    assert failed >= 3
    assert waits == []
    assert execute(db, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                       "AND conname LIKE %s", ("migration_fk_%",)) == [(3,)]


@pytest.mark.parametrize("catalog_table", ["pg_description", "pg_policy"])
def test_the_swap_reads_the_catalog_before_it_blocks_writes(
        db: str, sandbox: Sandbox, catalog_table: str) -> None:
    """The swap reads what it carries over (indexes, constraints, comments, grants,
    policies...) under SHARE UPDATE EXCLUSIVE, which lets the application write, and asks
    ACCESS EXCLUSIVE for its statements only: read under it, the catalog's dozens of round
    trips were most of the application's write stall (issue 22).  A superuser holding
    pg_description (the comments it carries) or pg_policy stops the swap in its reads: it
    waits there holding nothing that blocks a write."""
    expanded(db)
    with Session.open(db, SETTINGS) as session:
        _, waits, failed = run_while_held(
            admin_for(sandbox, db), f"LOCK TABLE pg_catalog.{catalog_table} IN ACCESS "
            "EXCLUSIVE MODE", "swap", lambda: swap.swap(session, session.plan).held_s)
    assert failed >= 3
    assert waits == []
    assert execute(db, "SELECT data_type FROM information_schema.columns "
                       "WHERE table_name = 'users' AND column_name = 'id'") == [("uuid",)]


CARRIED = """
    CREATE VIEW user_ids AS SELECT id, email FROM users;
    CREATE VIEW user_id_count AS SELECT count(DISTINCT id) AS n FROM user_ids;
    GRANT SELECT ON user_ids TO PUBLIC;
    COMMENT ON VIEW user_ids IS 'the ids';
    CREATE STATISTICS entries_by_user ON user_id, title FROM journal_entries;
    ALTER TABLE tags ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own_tags ON tags USING (user_id IS NOT NULL);
    CREATE FUNCTION touched() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
    CREATE TRIGGER entry_moved BEFORE UPDATE OF user_id ON journal_entries
        FOR EACH ROW EXECUTE FUNCTION touched();
    COMMENT ON COLUMN users.id IS 'the key';
    COMMENT ON CONSTRAINT reminders_user_id_fkey ON reminders IS 'its user';
"""


@pytest.mark.parametrize("carried", ["", CARRIED], ids=["runbook", "views-policy-statistics"])
def test_under_its_write_blocking_locks_the_swap_makes_three_round_trips(
        db: str, carried: str) -> None:
    """Under the swap's ACCESS EXCLUSIVE every round trip is the application's wait too
    (issue 22: 4 to 10 ms each on a busy two-core machine, 40 of them at 1M were 146 ms).
    What the swap carries is read before, under SHARE UPDATE EXCLUSIVE; under the lock go
    the locks in one statement, one check, every statement in one, whatever it carries."""
    if carried:
        execute(db, carried)
    expanded(db)
    with Session.open(db, SETTINGS) as session, statements_sent(session) as sent:
        swap.swap(session, session.plan)
        swapped = len(sent)  # the session's own after it (its run lock's release) are not
    locked = [number for number, text in enumerate(sent) if "IN ACCESS EXCLUSIVE MODE" in text]
    under = sent[locked[-1]:swapped]
    assert len(locked) == 1, under
    assert len(under) == 3, under
    assert '"public"."users", "public"."journal_entries"' in under[0], under
    assert under[0].endswith("NOWAIT"), under
    for statement in ('DROP TRIGGER "migration_sync_user_id" ON "public"."journal_entries"',
                      'ALTER TABLE "public"."journal_entries" DROP COLUMN "user_id"',
                      'RENAME COLUMN "user_id_uuid" TO "user_id"',
                      'RENAME TO "ix_journal_entries_user_id"',
                      'ALTER TABLE "public"."users" RENAME COLUMN "id_uuid" TO "id"',
                      'RENAME CONSTRAINT "migration_fk_'):
        assert statement in under[2], under[2]
    if carried:
        for statement in ('CREATE VIEW "public"."user_id_count"', 'CREATE POLICY "own_tags"',
                          "CREATE STATISTICS public.entries_by_user", "CREATE TRIGGER entry_moved",
                          "COMMENT ON COLUMN \"public\".\"users\".\"id\" IS 'the key'"):
            assert statement in under[2], under[2]
        assert execute(db, "SELECT n FROM user_id_count") == [(USERS + len(SHOUTING),)]


def test_the_copy_column_blocks_writes_for_one_round_trip_of_statements(db: str) -> None:
    """The copy column's transaction does what needs no write-blocking lock first, under
    SHARE UPDATE EXCLUSIVE (the reads, the engine's records and functions, the default's
    probe); under ACCESS EXCLUSIVE it sent about a dozen round trips (issue 22), now the
    lock and one: the column, its mark, its default, the sync trigger and the slices."""
    run_ok(db, "backup_data")
    execute(db, "ALTER TABLE users ALTER COLUMN id SET DEFAULT gen_random_uuid()::text")
    with Session.open(db, SETTINGS) as session, statements_sent(session) as sent:
        fill.add_temporary_column(session, session.plan.parent)
        added = len(sent)
    locked = [number for number, text in enumerate(sent) if "ACCESS EXCLUSIVE MODE" in text]
    assert len(locked) == 1, sent
    under = sent[locked[0]:added]
    assert len(under) == 2, under
    for statement in ('ALTER TABLE "public"."users" ADD COLUMN "id_uuid" uuid',
                      'ALTER COLUMN "id_uuid" SET DEFAULT gen_random_uuid()',
                      'CREATE OR REPLACE TRIGGER "migration_sync_id"',
                      'ENABLE ALWAYS TRIGGER "migration_sync_id"',
                      'INSERT INTO "migration_backup"."backfill_progress"'):
        assert statement in under[1], under[1]


def lock_requests_waiting(dsn: str) -> AbstractContextManager[list[tuple[Any, ...]]]:
    """Samples ``pg_locks`` while the with-block runs: every lock request of the engine or of
    the application (``application_name`` 'application') waiting in a queue, as (who, mode,
    relation, the application_names of the sessions it waits behind)."""
    return sampled(dsn, """
        SELECT CASE WHEN a.application_name = 'application' THEN 'application'
               ELSE 'engine' END, l.mode, l.relation::regclass::text,
               ARRAY(SELECT b.application_name FROM pg_stat_activity b
                     WHERE b.pid = ANY (pg_blocking_pids(a.pid)) ORDER BY 1)
        FROM pg_locks l JOIN pg_stat_activity a USING (pid)
        WHERE NOT l.granted AND l.locktype = 'relation'
          AND a.application_name IN ('application', %s)""", (engine_application_name(),))


def application_writes(dsn: str, until: Callable[[], bool]) -> list[str]:
    """Users inserted by the application, each in its own transaction, one after the other
    until ``until()`` (20 at least); their ids."""
    ids: list[str] = []
    with connected(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET application_name = 'application'")
        while len(ids) < 20 or not until():
            user = f"00000000-0000-4000-8000-{len(ids):012d}"
            cur.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@x"))
            ids.append(user)
    return ids


def test_the_swap_never_waits_in_the_lock_queue_so_the_application_never_queues_behind_it(
        db: str) -> None:
    """A reader holds users (the first table the swap locks) in an open transaction.  The
    swap's ACCESS EXCLUSIVE request waited in the queue up to lock_timeout per attempt, and
    the application's INSERT INTO users, which the reader does not block, queued behind it:
    the write stall of issue 22 was that wait plus the hold.  Now every try asks NOWAIT and
    queues nobody; the application writes throughout, and the swap gets through once the
    reader lets go.  (The queueing fallback is ``lock_timeout`` x ``ddl_attempts`` away:
    five minutes here.)"""
    expanded(db)
    settings = Settings(show_progress=False, jobs=1, lock_timeout_ms=100, ddl_attempts=3000)
    with (Session.open(db, settings) as session, engine_warnings() as warnings,
          lock_requests_waiting(db) as waiting):
        with table_held(db, "LOCK TABLE users IN ACCESS SHARE MODE"):
            engine = Background(lambda: swap.swap(session, session.plan).held_s)
            wait_until(lambda: warnings.count("swap: lock not granted") >= 3
                       or not engine.thread.is_alive())
            tries = warnings.count("swap: lock not granted")
            written = application_writes(  # over two more tries at least
                db, lambda: warnings.count("swap: lock not granted") >= tries + 2
                or not engine.thread.is_alive())
            assert engine.thread.is_alive(), "the swap went through a held table"
        held = engine.join()
    assert held >= 0
    assert [sample for sample in waiting if sample[0] == "engine"] == []
    assert [sample for sample in waiting if sample[0] == "application"] == []
    assert warnings.count("from now on the first lock waits in the queue") == 0
    assert execute(db, "SELECT count(*) FROM users WHERE id = ANY (%s::uuid[])",
                   (written,)) == [(len(written),)]
    assert execute(db, "SELECT data_type FROM information_schema.columns "
                       "WHERE table_name = 'users' AND column_name = 'id'") == [("uuid",)]


def _copy_column(session: Session) -> Callable[[], Any]:
    return lambda: fill.add_temporary_column(session, session.plan.parent)


def _fill_proof(session: Session) -> Callable[[], Any]:
    fill.add_temporary_column(session, session.plan.parent)
    fill.fill(session, (session.plan.parent,), 0)
    return lambda: fill.prove_filled(session, session.plan.parent, 0)


EXCLUSIVE_DDL = {"copy column": (_copy_column, "add id_uuid to public.users"),
                 "fill proof": (_fill_proof, "add migration_filled_id")}


@pytest.mark.parametrize("ddl", EXCLUSIVE_DDL)
def test_the_expansion_s_exclusive_ddl_never_waits_in_the_lock_queue(db: str, ddl: str) -> None:
    """A reader holds users.  ``ALTER TABLE ... ADD COLUMN`` (the copy) and ``ADD CONSTRAINT
    ... CHECK NOT VALID`` (the fill's proof) asked their ACCESS EXCLUSIVE in the queue, up
    to lock_timeout per attempt, and the application's writes to users queued behind each
    attempt; now the table is locked NOWAIT first, as for the swap, and nobody queues."""
    prepare, label = EXCLUSIVE_DDL[ddl]
    run_ok(db, "backup_data")
    with (Session.open(db, SETTINGS) as session, engine_warnings() as warnings,
          lock_requests_waiting(db) as waiting):
        action = prepare(session)
        with table_held(db, "LOCK TABLE users IN ACCESS SHARE MODE"):
            engine = Background(action)
            wait_until(lambda: warnings.count(f"{label}: lock not granted") >= 3
                       or not engine.thread.is_alive())
            tries = warnings.count(f"{label}: lock not granted")
            written = application_writes(
                db, lambda: warnings.count(f"{label}: lock not granted") >= tries + 2
                or not engine.thread.is_alive())
            assert engine.thread.is_alive(), "the DDL went through a held table"
        engine.join()
    assert waiting == []
    assert execute(db, "SELECT count(*) FROM users WHERE id = ANY (%s)",
                   (written,)) == [(len(written),)]


def test_a_swap_never_given_its_tables_at_once_waits_in_the_queue_in_the_end(db: str) -> None:
    """A table never free at once (a reader holding it throughout, as a steady stream of
    overlapping short transactions would): after ``lock_timeout`` x ``ddl_attempts`` of
    tries that queue nobody, each attempt waits in the queue for the first lock, and the
    swap gets it as soon as the holder lets go."""
    expanded(db)
    settings = Settings(show_progress=False, jobs=1, lock_timeout_ms=100, ddl_attempts=3,
                        ddl_pause_cap_s=0.05)
    with (Session.open(db, settings) as session, engine_warnings() as warnings,
          lock_requests_waiting(db) as waiting):
        with table_held(db, "LOCK TABLE users IN ACCESS SHARE MODE"):
            engine = Background(lambda: swap.swap(session, session.plan).held_s)
            wait_until(lambda: bool(waiting) or not engine.thread.is_alive())
            queued = list(waiting)
            fallback = warnings.count("from now on the first lock waits in the queue")
        engine.join()
    assert fallback == 1, warnings.messages
    assert queued, "the swap never waited in the queue"
    assert {sample[:3] for sample in queued} == {("engine", "AccessExclusiveLock", "users")}
    assert warnings.count("lock not granted at once (try 1,") == 1
    assert execute(db, "SELECT data_type FROM information_schema.columns "
                       "WHERE table_name = 'users' AND column_name = 'id'") == [("uuid",)]


# -- 3. autovacuum and the holders an ordinary owner can see ---------------------------------

def admin_for(sandbox: Sandbox, dsn: str) -> str:
    return sandbox.admin_dsn_for(urlsplit(dsn).path.lstrip("/"))


@contextmanager
def autovacuum_naptime(sandbox: Sandbox, seconds: int) -> Iterator[None]:
    """The server's autovacuum_naptime for the with-block (the server is the test
    session's: it is reset after)."""
    execute(sandbox.admin_dsn, "ALTER SYSTEM SET autovacuum_naptime = %s", (seconds,))
    execute(sandbox.admin_dsn, "SELECT pg_reload_conf()")
    try:
        yield
    finally:
        execute(sandbox.admin_dsn, "ALTER SYSTEM RESET autovacuum_naptime")
        execute(sandbox.admin_dsn, "SELECT pg_reload_conf()")


def autovacuum_holding(admin: str, table: str) -> list[tuple[Any, ...]]:
    """Autovacuum workers holding a lock on ``table`` (seen by the superuser)."""
    return execute(admin, "SELECT a.pid, l.mode FROM pg_stat_activity a JOIN pg_locks l "
                          "USING (pid) WHERE a.backend_type = 'autovacuum worker' "
                          "AND l.granted AND l.relation = to_regclass(%s)", (table,))


def test_the_rollback_of_an_ordinary_owner_gets_past_an_autovacuum_holding_a_table(
        legacy_db: str, sandbox: Sandbox) -> None:
    """The rollback's fill starts autovacuums, which yield to no lock request as short as
    the engine's, and the owner (no pg_read_all_stats) cannot tell them from
    pg_stat_activity: 'could not lock the tables after 30 attempts', naming no holder.
    Here a slow autovacuum (100 ms a page) really holds journal_entries when the rollback
    starts, and more start as it writes (naptime 1 s, no threshold)."""
    seeded(legacy_db, users=1000)
    before = print_of(legacy_db)
    run_ok(legacy_db, "full_migration")
    execute(legacy_db, "ALTER TABLE journal_entries SET (autovacuum_vacuum_cost_delay = 100, "
                       "autovacuum_vacuum_cost_limit = 1, autovacuum_vacuum_threshold = 0, "
                       "autovacuum_vacuum_scale_factor = 0)")
    # dead rows for it, whether or not an autovacuum already came after the migration's fill
    # (the engine's marker: the change log leaves the rewrite out, as the engine's own)
    execute(legacy_db, "SET uuid_migration.engine = 'on'; UPDATE journal_entries SET title = title")
    assert execute(legacy_db, "SELECT rolsuper OR pg_has_role('pg_read_all_stats', 'USAGE') "
                              "FROM pg_roles WHERE rolname = current_user") == [(False,)]
    admin = admin_for(sandbox, legacy_db)
    settings = Settings(show_progress=False, batch_size=1000, ddl_attempts=3,
                        ddl_pause_cap_s=0.2)
    with autovacuum_naptime(sandbox, 1), engine_warnings() as warnings:
        assert wait_until(lambda: bool(autovacuum_holding(admin, "public.journal_entries")),
                          patience=60.0), "no autovacuum started on journal_entries"
        assert autovacuum_holding(admin, "public.journal_entries")[0][1] == (
            "ShareUpdateExclusiveLock")
        run_in_process(legacy_db, "rollback", settings=settings)
    assert any("VACUUM" in message and "vacuuming it ourselves" in message
               for message in warnings.messages), warnings.messages
    execute(legacy_db, "ALTER TABLE journal_entries RESET (autovacuum_vacuum_cost_delay, "
                       "autovacuum_vacuum_cost_limit, autovacuum_vacuum_threshold, "
                       "autovacuum_vacuum_scale_factor)")  # the test's, not the engine's
    after = print_of(legacy_db)
    assert after == before, "\n".join(before.diff(after))


def test_a_holder_of_another_role_is_named_in_the_hint(db: str, sandbox: Sandbox) -> None:
    """pg_stat_activity hides another role's session from the owner (its backend_type is
    NULL, which the query compared with =): the hint said 'another session'."""
    run_ok(db, "backup_data")
    with connected(admin_for(sandbox, db), autocommit=False) as holder:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
            cur.execute("SELECT pg_backend_pid()")
            pid = (cur.fetchone() or [None])[0]
        with pytest.raises(MigrationError) as failed, Session.open(
                db, Settings(show_progress=False, ddl_attempts=1)) as session:
            run(session, "migrate_users", OPERATIONS["migrate_users"])
    assert f"pid {pid} (" in failed.value.hint
    assert "AccessShareLock on public.users" in failed.value.hint
