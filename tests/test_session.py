"""Engine sessions beside a live application: the run lock of a killed run, deadlocks and
short lock waits, statement timeouts, row estimates, and what the log can hold."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2.extensions
import pytest

from migration import catalog
from migration.connection import Connection, connect, engine_application_name
from migration.errors import MigrationError
from migration.model import Table
from migration.operations import OPERATIONS, run
from migration.session import ADVISORY_KEYS, Session, Settings, ddl_pause
from tests.operate import (
    connected,
    execute,
    operate,
    run_ok,
    table_locked_past_the_timeout,
    wait_for_engine_lock_wait,
)

QUIET = Settings(show_progress=False)

# A process that opens an engine session (run lock taken), says so, then runs a statement
# far longer than the engine waits for a dead run's lock.
BUSY_RUN = """
import sys
from migration.session import Session, Settings
with Session.open(sys.argv[1], Settings(show_progress=False)) as session:
    with session.conn.cursor() as cur:
        print("locked", flush=True)
        cur.execute("SELECT pg_sleep(60)")
"""


def ended_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def sleeping_backend(dsn: str, application_name: str) -> bool:
    """Whether a backend of that name is (within 10 s) running a pg_sleep."""
    for _ in range(500):
        if execute(dsn, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                        "AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
                   (application_name,)):
            return True
        time.sleep(0.02)
    return False


@contextmanager
def run_lock_held_by(dsn: str, application_name: str) -> Iterator[Connection]:
    """A session holding the run lock under the given application_name."""
    holder = connect(dsn, application_name=application_name, autocommit=True)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s, %s)", ADVISORY_KEYS)
        yield holder
    finally:
        holder.close()


# -- 1. a killed run lets go at once -------------------------------------------------------

def test_every_engine_session_has_the_server_check_its_client(legacy_db: str) -> None:
    with Session.open(legacy_db, QUIET) as session, session.transaction() as cur:
        cur.execute("SHOW client_connection_check_interval")
        assert cur.fetchone() == ("1s",)
        cur.execute("SELECT application_name FROM pg_stat_activity "
                    "WHERE pid = pg_backend_pid()")
        assert cur.fetchone() == (engine_application_name(),)


def test_a_run_killed_during_a_long_statement_does_not_block_the_rerun(legacy_db: str) -> None:
    """SIGKILL while the server runs a 60 s statement: the server notices the client is
    gone and ends it, and the rerun gets the run lock (waiting at most 30 s for it)."""
    with subprocess.Popen([sys.executable, "-c", BUSY_RUN, legacy_db],
                          stdout=subprocess.PIPE, text=True) as busy:
        try:
            assert busy.stdout is not None
            assert busy.stdout.readline() == "locked\n"
            assert sleeping_backend(legacy_db, engine_application_name(busy.pid))
        finally:
            busy.kill()
    rerun = operate(legacy_db, "backup_data")
    assert rerun.exit_code == 0, rerun.output
    assert execute(legacy_db, "SELECT to_regnamespace('migration_backup') IS NOT NULL") == [
        (True,)]


def test_a_rerun_waits_for_the_lock_of_a_run_whose_client_is_gone(legacy_db: str) -> None:
    gone = engine_application_name(ended_pid())
    with run_lock_held_by(legacy_db, gone) as holder:
        ender = threading.Timer(1.0, holder.close)  # as the server ends the dead backend
        ender.start()
        try:
            rerun = operate(legacy_db, "backup_data")
        finally:
            ender.join()
    assert rerun.exit_code == 0, rerun.output
    assert "whose client process is gone; waiting up to 30 s" in rerun.output
    assert gone in rerun.output  # the holder is named


def test_the_wait_for_a_dead_run_is_bounded(legacy_db: str) -> None:
    with (run_lock_held_by(legacy_db, engine_application_name(ended_pid())),
          pytest.raises(MigrationError) as refused,
          Session.open(legacy_db, Settings(show_progress=False, dead_run_wait_s=0.5))):
        pass
    assert "another migration run holds the lock" in refused.value.message
    assert "pg_terminate_backend" in refused.value.hint


@pytest.mark.parametrize("holder", ["alive here", "gone elsewhere"])
def test_a_run_alive_or_on_another_host_is_refused_without_waiting(legacy_db: str,
                                                                    holder: str) -> None:
    name = (engine_application_name() if holder == "alive here"
            else f"uuid-migration pid {ended_pid()} on another-host.example")
    with run_lock_held_by(legacy_db, name):
        result = operate(legacy_db, "backup_data")
    assert result.exit_code == 1
    assert "another migration run holds the lock" in result.output
    assert "waiting" not in result.output
    assert "pg_terminate_backend" not in result.output


# -- 2. deadlocks and short lock waits ----------------------------------------------------

def test_a_deadlock_with_the_application_is_retried(legacy_db: str) -> None:
    """The engine's DDL takes tags then users; the application holds users and asks for
    tags once the engine waits: the server cancels the engine's transaction, which retries."""
    application = connect(legacy_db, application_name="application", autocommit=False)
    attempts: list[int] = []

    def ask_for_tags_once_the_engine_waits() -> None:
        wait_for_engine_lock_wait(legacy_db, [])
        with application.cursor() as cur:
            cur.execute("LOCK TABLE tags IN ACCESS SHARE MODE")  # granted once the engine's
        application.commit()                                      # transaction is cancelled

    def work(cur: psycopg2.extensions.cursor) -> int:
        attempts.append(len(attempts) + 1)
        cur.execute("LOCK TABLE public.tags IN ACCESS EXCLUSIVE MODE")  # search_path: pg_catalog
        if len(attempts) == 1:
            threading.Thread(target=ask_for_tags_once_the_engine_waits, daemon=True).start()
        cur.execute("LOCK TABLE public.users IN ACCESS EXCLUSIVE MODE")
        return len(attempts)

    try:
        with application.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
        # lock_timeout longer than deadlock_timeout (1 s): the deadlock is detected first
        with Session.open(legacy_db, Settings(show_progress=False, lock_timeout_ms=10_000)) as s:
            assert s.ddl("deadlocking ddl", work) == 2
    finally:
        application.close()


def test_the_default_lock_wait_is_short_and_its_retries_jittered_and_capped() -> None:
    settings = Settings()
    assert settings.lock_timeout_ms == 100
    pauses = [ddl_pause(attempt, settings.ddl_pause_cap_s)
              for attempt in range(1, settings.ddl_attempts)]
    assert all(0 < pause <= settings.ddl_pause_cap_s for pause in pauses)
    assert 20 < sum(pauses) + settings.ddl_attempts * 0.1 < 90  # a busy table: about 30-60 s
    assert len({ddl_pause(4, 2.0) for _ in range(10)}) > 1  # random: no two runs in step
    assert all(0.4 <= ddl_pause(4, 2.0) <= 0.8 for _ in range(50))  # half fixed, half random


def test_the_lock_timeout_default_reaches_the_ddl(legacy_db: str) -> None:
    run_ok(legacy_db, "backup_data")
    blocker = connect(legacy_db, application_name="application", autocommit=False)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
        with pytest.raises(MigrationError) as failed, Session.open(
                legacy_db, Settings(show_progress=False, ddl_attempts=1)) as session:
            run(session, "migrate_users", OPERATIONS["migrate_users"])
    finally:
        blocker.close()
    assert "1 attempts of 100 ms" in failed.value.message


@pytest.mark.parametrize(("asked", "waited"), [(100, 100), (499, 499), (3000, 500)])
def test_the_engine_s_lock_wait_ends_before_the_server_looks_for_a_deadlock(
        legacy_db: str, asked: int, waited: int) -> None:
    """Under half the server's deadlock_timeout (1 s here, as by default), whatever was
    asked: in a deadlock with the application, the engine's wait ends first and it retries,
    where with 3 s the server cancelled the application's DELETE."""
    assert execute(legacy_db, "SHOW deadlock_timeout") == [("1s",)]
    with Session.open(legacy_db, Settings(show_progress=False, lock_timeout_ms=asked)) as s:
        in_force = s.ddl("read it", lambda cur: (cur.execute("SHOW lock_timeout"),
                                                 cur.fetchone())[1])
    assert in_force == (f"{waited}ms",)


# -- 3. timeouts ---------------------------------------------------------------------------

def test_the_statement_timeout_option_reaches_the_session(legacy_db: str) -> None:
    run_ok(legacy_db, "validate_schema")  # creates migration_log, which status reads
    with table_locked_past_the_timeout(legacy_db, "migration_log", hold=2.0):
        result = operate(legacy_db, "status", "--statement-timeout=200")
    assert result.exit_code == 1
    assert "statement timeout" in result.output


def test_the_pre_flight_scans_are_not_cut_by_the_statement_timeout(legacy_db: str) -> None:
    """Its scan of tags waits a second for a lock, five times the statement timeout."""
    with table_locked_past_the_timeout(legacy_db, "tags", hold=1.0) as waited:
        result = operate(legacy_db, "validate_schema", "--statement-timeout=200")
    assert waited == [True]
    assert result.exit_code == 0, result.output


# -- 4. never analyzed tables --------------------------------------------------------------

def test_a_never_analyzed_table_is_counted_an_analyzed_one_estimated(legacy_db: str) -> None:
    users = Table("public", "users")
    execute(legacy_db, "ALTER TABLE users SET (autovacuum_enabled = off)")
    execute(legacy_db, "INSERT INTO users (email) SELECT 'u' || n FROM generate_series(1, 500) n")
    assert execute(legacy_db, "SELECT reltuples < 0 FROM pg_class WHERE oid = 'users'::regclass"
                   ) == [(True,)]
    with connected(legacy_db, autocommit=False) as conn:
        assert catalog.estimated_rows(conn, users) == 500
    execute(legacy_db, "ANALYZE users")
    execute(legacy_db, "INSERT INTO users (email) SELECT 'v' || n FROM generate_series(1, 100) n")
    with connected(legacy_db, autocommit=False) as conn:
        assert catalog.estimated_rows(conn, users) == 500  # the estimate, not a count


# -- 5. what the log can hold --------------------------------------------------------------

def test_samples_keyed_by_a_timestamp_are_logged(legacy_db: str) -> None:
    """A primary key (id, created_at) and non-canonical user ids: validate_schema warns,
    and the log row keeps the samples, their timestamps as text."""
    execute(legacy_db, "ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_pkey, "
                       "ADD PRIMARY KEY (id, created_at)")
    shouting = str(uuid.uuid4()).upper()
    execute(legacy_db, "INSERT INTO users (id, email) VALUES (%s, 'loud@example.com')",
            (shouting,))
    execute(legacy_db, "INSERT INTO journal_entries (user_id, title, created_at) "
                       "VALUES (%s, 'entry', '2024-02-29 12:34:56.789+00')", (shouting,))
    result = operate(legacy_db, "validate_schema")
    assert result.exit_code == 0, result.output
    assert "non_canonical" in result.output
    logged = execute(legacy_db, "SELECT s FROM migration_log, jsonb_array_elements("
                                "details -> 'findings') f, jsonb_array_elements(f -> 'samples') s "
                                "WHERE operation = 'validate_schema' "
                                "AND s ->> 'table' = 'public.journal_entries'")
    assert len(logged) == 1
    sample = logged[0][0]
    assert isinstance(sample, dict)
    assert sample["user_id"] == shouting
    assert sample["created_at"].startswith("2024-02-29 12:34:56.789")


class Lingering(psycopg2.extensions.connection):
    """A connection whose close is held back, as a backend's end is on the server."""

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


def test_the_run_lock_is_released_before_the_connection_closes(
        legacy_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server frees a closed connection's locks only once its backend has ended, a
    moment later: the next step of a script found the lock still held (seen on CI).  The
    session gives it back itself; here the close is held back to show it."""
    opened: list[Lingering] = []

    def lingering(dsn: str, **_: object) -> Lingering:
        conn = psycopg2.connect(dsn, connection_factory=Lingering)
        opened.append(conn)
        return conn

    monkeypatch.setattr("migration.session.connect", lingering)
    with Session.open(legacy_db, Settings(show_progress=False)):
        pass
    try:
        assert execute(legacy_db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                  "AND (classid, objid) = (%s, %s) AND granted",
                       ADVISORY_KEYS) == [(0,)]
    finally:
        for conn in opened:
            conn.really_close()
