"""An engine session: one connection, its settings, its lock, its log.

Every operation runs inside a Session.  It holds a session-level advisory
lock, so two runs against one database cannot overlap, and it runs DDL with
a short ``lock_timeout`` and retries with backoff, so the migration waits
politely for a busy table instead of queueing every other query behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import psycopg2.errors
from psycopg2.extensions import cursor as Cursor

from migration.connection import Connection, connect
from migration.errors import MigrationError
from migration.log import OperationLog, logger
from migration.plan import Plan, build_plan
from migration.progress import Progress

T = TypeVar("T")

# Two int4 keys for pg_advisory_lock: "uuid" in ASCII, and the lock's purpose.
ADVISORY_KEYS = (0x75756964, 1)


@dataclass(frozen=True)
class Settings:
    batch_size: int = 1000
    lock_timeout_ms: int = 3000
    statement_timeout_ms: int = 300_000
    ddl_attempts: int = 6
    orphans: str = "abort"  # or "quarantine"
    force: bool = False
    keep_changes: bool = False  # rollback: keep rows written after the migration
    show_progress: bool = True
    jobs: int = 2  # connections filling temporary columns at once, one slice each


def _configure(conn: Connection, settings: Settings) -> None:
    """The session settings every engine connection runs with."""
    with conn, conn.cursor() as cur:
        # Deparsed definitions come out fully qualified and replay identically.
        cur.execute("SET search_path = pg_catalog, pg_temp")
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET uuid_migration.engine = 'on'")  # the change log ignores our writes
        # For every transaction; a step that must scan a whole table
        # lifts it with SET LOCAL for its own transaction only.
        cur.execute("SELECT set_config('statement_timeout', %s, false)",
                    (str(settings.statement_timeout_ms),))


class Session:
    def __init__(self, conn: Connection, plan: Plan, settings: Settings, dsn: str) -> None:
        self.conn = conn
        self.plan = plan
        self.settings = settings
        self.log = OperationLog(conn, plan.schema)
        self.active_runs: list[int] = []  # log rows of this process's operations under way
        self.fault: Callable[[str, int], None] | None = None
        """Called at each fault point with its name and the backend pid that reached it."""
        self._dsn = dsn
        self._points: dict[str, int] = {}
        self._points_lock = threading.Lock()

    @classmethod
    @contextmanager
    def open(cls, dsn: str, settings: Settings, *, schema: str = "public",
             lock: bool = True) -> Iterator[Session]:
        """Connect, pin the search path, take the run lock, make sure the log exists.

        ``lock=False`` is for reading the state (status) while a run may be going on.
        """
        conn = connect(dsn)
        try:
            _configure(conn, settings)
            session = cls(conn, build_plan(conn, schema), settings, dsn)
            if lock:
                session._lock()
                session.log.ensure()
            yield session
        finally:
            conn.close()

    @contextmanager
    def worker(self) -> Iterator[Session]:
        """A second connection working alongside this session, from another thread.

        It shares the plan, the settings, the fault hook and the count of
        fault points; the run lock stays with this session, which waits for it.
        """
        conn = connect(self._dsn)
        try:
            _configure(conn, self.settings)
            worker = Session(conn, self.plan, self.settings, self._dsn)
            worker.fault = self.fault
            worker._points, worker._points_lock = self._points, self._points_lock
            yield worker
        finally:
            conn.close()

    def lock_holder(self) -> str | None:
        """Who holds the run lock, other than this session; None when nobody does."""
        with self.conn.cursor() as cur:
            cur.execute(
                """
                SELECT format('pid %%s, user %%s, application %%L, client %%s, since %%s',
                              a.pid, a.usename, a.application_name, a.client_addr,
                              a.backend_start)
                FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
                  AND l.classid = %s AND l.objid = %s AND l.database = (
                      SELECT oid FROM pg_database WHERE datname = current_database())
                """,
                ADVISORY_KEYS,
            )
            row = cur.fetchone()
        self.conn.rollback()
        return None if row is None else str(row[0])

    def _lock(self) -> None:
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS)
            row = cur.fetchone()
        if row and row[0]:
            return
        raise MigrationError(
            "another migration run holds the lock on this database "
            f"({self.lock_holder() or 'a session that has just ended'})",
            hint="wait for it to finish, or stop it, then run this command again",
        )

    def point(self, label: str) -> None:
        """A named place where the engine is about to commit or has just run DDL.

        Nothing happens here unless ``fault`` is set: the crash tests set it to
        kill the connection or the process at each point in turn (the label
        carries a count, ``batch public.users.id#3``, so every batch is its own point).
        """
        with self._points_lock:
            count = self._points[label] = self._points.get(label, 0) + 1
        if self.fault is not None:
            self.fault(f"{label}#{count}", self.conn.get_backend_pid())

    @contextmanager
    def transaction(self, label: str | None = None) -> Iterator[Cursor]:
        """One transaction: committed on success, rolled back on any error.

        A labelled transaction is a fault-injection point just before its commit.
        """
        cur = self.conn.cursor()
        try:
            yield cur
            if label is not None:
                self.point(label)
            self.conn.commit()
        except BaseException:
            if not self.conn.closed:  # a lost connection has nothing left to roll back
                self.conn.rollback()
            raise
        finally:
            if not cur.closed:
                cur.close()

    def ddl(self, what: str, work: Callable[[Cursor], T]) -> T:
        """Run ``work`` in a transaction whose locks wait at most ``lock_timeout``.

        When a lock cannot be had in time the transaction is rolled back and
        tried again after a growing pause; other sessions are never blocked
        behind us for longer than the timeout.
        """
        pause = 0.2
        for attempt in range(1, self.settings.ddl_attempts + 1):
            try:
                with self.transaction(what) as cur:
                    cur.execute("SET LOCAL lock_timeout = %s", (self.settings.lock_timeout_ms,))
                    return work(cur)
            except psycopg2.errors.LockNotAvailable:
                if attempt == self.settings.ddl_attempts:
                    raise MigrationError(
                        f"{what}: could not lock the tables after {attempt} attempts "
                        f"of {self.settings.lock_timeout_ms} ms",
                        hint="another session holds a lock on them; stop the application "
                             "(the runbook requires downtime) and run again",
                    ) from None
                logger.warning("%s: lock not granted (attempt %s), retrying in %.1f s",
                               what, attempt, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        raise AssertionError("unreachable")

    def progress(self, label: str, total: int, *, resumed: int = 0) -> Progress:
        return Progress(label, total, resumed=resumed, enabled=self.settings.show_progress)

    def other_sessions(self) -> list[str]:
        """Other sessions connected to this database (the swap expects none)."""
        with self.conn.cursor() as cur:
            cur.execute(
                """
                SELECT format('pid %s, user %s, application %L, state %s',
                              pid, usename, application_name, state)
                FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend'
                ORDER BY pid
                """
            )
            rows = [text for (text,) in cur.fetchall()]
        self.conn.rollback()
        return rows
