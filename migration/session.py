"""An engine session: one connection, its settings, its lock, its log.

Every operation runs inside a Session.  It holds a session-level advisory
lock, so two runs against one database cannot overlap, and it runs DDL with
a short ``lock_timeout`` and retries with backoff, so the migration waits
politely for a busy table instead of queueing every other query behind it.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, lag, pace
from migration.connection import (
    Connection,
    NotFreeAtOnce,
    client_pid,
    connect,
    engine_application_name,
    queueing,
)
from migration.connection import lift_statement_timeout as lift_statement_timeout
from migration.errors import MigrationError
from migration.log import OperationLog, logger
from migration.model import KeyColumn, Table
from migration.plan import Plan, build_plan, parse_key
from migration.progress import Progress

T = TypeVar("T")

# Two int4 keys for pg_advisory_lock: "uuid" in ASCII, and the lock's purpose.
ADVISORY_KEYS = (0x75756964, 1)

# How often the server looks, during a statement, whether the client is still
# there: a killed run's backend ends its statement and lets go of its locks.
CLIENT_CHECK_INTERVAL = "1s"


@dataclass(frozen=True)
class Settings:
    batch_size: int = 1000
    # Short: an application query queued behind a waiting DDL waits at most this long.
    lock_timeout_ms: int = 100
    statement_timeout_ms: int = 300_000  # 0: none
    ddl_attempts: int = 30  # with the backoff below, about half a minute of retries
    ddl_pause_cap_s: float = 2.0
    dead_run_wait_s: float = 30.0  # for the run lock of a run whose client is gone
    vacuum_wait_s: float = 900.0  # for an autovacuum that holds a table (not attempts)
    orphans: str = "abort"  # or "quarantine"
    force: bool = False
    show_progress: bool = True
    jobs: int = 2  # connections filling temporary columns at once, one slice each
    allow_triggers: bool = False  # the fill may fire application triggers (see preflight)
    refresh_materialized_views: bool = False  # carried: created empty, refreshed after the swap
    allow_publications: bool = False  # publications that would send the copies: accepted
    postpone_swap: bool = False  # stop ready to swap, every column expanded and proven
    recycle_roles: tuple[str, ...] = ()  # their idle sessions older than the swap are ended
    # bulk steps wait while a standby is further behind (seconds; 0: never), see lag.py
    max_replica_lag_s: float = lag.DEFAULT_MAX_REPLICA_LAG_S
    # the steps that write a table's worth, paced to this many rows a second (0: no bound)
    max_rows_per_second: float = 0
    # the engine's sessions write their full-page images lz4-compressed where they may
    wal_compression: bool = True


WAL_COMPRESSION = "lz4"
"""What the engine's sessions set ``wal_compression`` to (``compress_wal``): a third of the
WAL with full-page writes on, for 8% more server CPU (pglz: as small, 70% more CPU)."""


def compress_wal(cur: Cursor) -> bool:
    """Set ``wal_compression`` for this session where the server does not compress whole
    pages already, was built with lz4, and this role may set it (a superuser, or ``GRANT
    SET ON PARAMETER``, PostgreSQL 15 and later); whether it did.

    With full-page writes on, the first change to each page after a checkpoint writes the
    whole page, and the fill changes pages in the keys' random order: whole pages are most
    of its WAL (``preflight.wal_advice``); index builds write theirs whole in any case.
    Compressing them changes only how they are written, in this session's own WAL;
    standbys of the same build replay them.
    """
    cur.execute("SELECT current_setting('wal_compression') = 'off' AND %s = ANY (enumvals) "
                "FROM pg_settings WHERE name = 'wal_compression'", (WAL_COMPRESSION,))
    row = cur.fetchone()
    if row is None or not row[0]:
        return False
    cur.execute("SAVEPOINT wal_compression")
    try:
        cur.execute("SELECT set_config('wal_compression', %s, false)", (WAL_COMPRESSION,))
        compressed = True
    except psycopg2.errors.InsufficientPrivilege:
        cur.execute("ROLLBACK TO SAVEPOINT wal_compression")
        compressed = False
    cur.execute("RELEASE SAVEPOINT wal_compression")
    return compressed


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
        if conn.server_version >= 140000:
            cur.execute("SELECT set_config('client_connection_check_interval', %s, false)",
                        (CLIENT_CHECK_INTERVAL,))
        if settings.wal_compression:
            compress_wal(cur)


def ddl_pause(attempt: int, cap: float) -> float:
    """The pause after a failed attempt: doubling from 100 ms up to ``cap``, its upper half
    at random (jitter, so that retries do not fall into step with the application)."""
    ceiling = min(0.05 * 2.0 ** attempt, cap)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def nowait_pause(tries: int) -> float:
    """The pause after a try whose tables were not free at once: from 2 ms, half again as
    long after each, up to 20 ms, its upper half at random.  Short, as such a try queued
    nobody and the tables may be free in the next gap between application transactions."""
    ceiling = min(0.002 * 1.5 ** (tries - 1), 0.02)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def client_gone(application_name: str) -> bool:
    """Does this application_name name an engine process of this host that no longer runs?

    The name carries the host, so a pid is only looked up on the machine it
    belongs to; a run on another host is never taken for dead.
    """
    pid = client_pid(application_name)
    if pid is None or application_name != engine_application_name(pid):
        return False
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


@dataclass(frozen=True)
class LockHolder:
    """Another session holding a lock on tables of the plan: as the operator should know
    it, and which tables."""

    description: str
    tables: tuple[Table, ...]

    def __str__(self) -> str:
        return self.description


class AmbiguousKey(Exception):
    """No ``--key`` was given, and the database holds backups of several keys."""

    def __init__(self, choices: list[str]) -> None:
        super().__init__("backups of several keys are recorded in this database: pass "
                         + " or ".join(f"--key {choice}" for choice in choices))
        self.choices = choices


def recorded_keys(conn: Connection) -> list[str]:
    """The keys whose backups the database holds, spelled as ``--key`` takes them."""
    with conn.cursor() as cur:
        return list(backup.recorded_keys(cur))


def recorded_key(conn: Connection, schema: str, *, strict: bool = False) -> KeyColumn | None:
    """The key of the database's one backup; None when there is none, or several (with
    ``strict``, several is AmbiguousKey)."""
    keys = recorded_keys(conn)
    if strict and len(keys) > 1:
        raise AmbiguousKey(keys)
    return parse_key(keys[0], schema) if len(keys) == 1 else None


def _unlock(conn: Connection) -> None:
    """Release the run lock now, before the connection closes: the server ends a closed
    connection's backend, and frees its locks, only a moment later, and a run started
    right after this one (the next step of a script) would find the lock still held."""
    if conn.closed:
        return  # a lost connection's backend is gone or going, with its locks
    try:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s, %s)", ADVISORY_KEYS)
        conn.commit()
    except psycopg2.OperationalError:
        pass  # lost on the way: its locks go with its backend


class Session:
    def __init__(self, conn: Connection, plan: Plan, settings: Settings, dsn: str) -> None:
        self.conn = conn
        self.plan = plan
        self.settings = settings
        self.log = OperationLog(conn, plan.schema, plan.key)
        self.active_runs: list[int] = []  # log rows of this process's operations under way
        self.fault: Callable[[str, int], None] | None = None
        """Called at each fault point with its name and the backend pid that reached it."""
        self._dsn = dsn
        self._points: dict[str, int] = {}
        self._points_lock = threading.Lock()
        self.lag = lag.Throttle(settings.max_replica_lag_s)
        """Holds bulk steps back while a standby is behind; shared with the workers."""
        self.pace = pace.Pacer(settings.max_rows_per_second)
        """Paces the batches of bulk steps (--max-rows-per-second); shared with the workers."""

    @cached_property
    def lock_timeout_ms(self) -> int:
        """The ``lock_timeout`` the engine's transactions wait with: the settings', but under
        half the server's ``deadlock_timeout``.

        In a deadlock with the application (a fill batch holds child rows and its copy's
        foreign key waits for the parent row that an application's cascading DELETE holds,
        while the cascade waits for the batch's rows), the server cancels the transaction
        of whichever side checks for deadlock first, once it has waited
        ``deadlock_timeout``; the application started waiting first, so it checks first
        unless the engine gives up before: with a 3 s ``lock_timeout`` and the default 1 s
        ``deadlock_timeout``, the application's DELETE was cancelled (seen on PostgreSQL
        18 under ``rehearse --live-load``).  Under half of it, the engine's wait always
        ends first and it retries; the application's transaction goes on.
        """
        idle = self.conn.get_transaction_status() == TRANSACTION_STATUS_IDLE
        with self.conn.cursor() as cur:
            cur.execute("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'")
            row = cur.fetchone()
        if idle:  # leave a transaction under way as it was
            self.conn.rollback()
        deadlock_ms = int(row[0]) if row else 1000
        wanted = self.settings.lock_timeout_ms
        if wanted > deadlock_ms // 2:
            logger.warning("lock_timeout %s ms is not under half the server's deadlock_timeout "
                           "(%s ms): the engine waits %s ms, so that in a deadlock with the "
                           "application its transaction, not the application's, is the one "
                           "cancelled", wanted, deadlock_ms, max(deadlock_ms // 2, 1))
            return max(deadlock_ms // 2, 1)
        return wanted

    @classmethod
    @contextmanager
    def open(cls, dsn: str, settings: Settings, *, key: KeyColumn | None = None,
             schema: str = "public", lock: bool = True) -> Iterator[Session]:
        """Connect, pin the search path, take the run lock, make sure the log exists.

        ``key`` is the parent key of the plan; None: the key the backup records
        when there is exactly one backup in the database, else the runbook's
        ``users.id`` in ``schema``.  ``lock=False`` is for reading the state
        (status) while a run may be going on.
        """
        conn = connect(dsn)
        try:
            _configure(conn, settings)
            if key is None:
                key = recorded_key(conn, schema)
                conn.rollback()
            session = cls(conn, build_plan(conn, key, schema), settings, dsn)
            if lock:
                session._lock()
                session.log.ensure()
            yield session
        finally:
            if lock:
                _unlock(conn)
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
            worker.lag = self.lag
            worker.pace = self.pace
            yield worker
        finally:
            conn.close()

    def lock_holder(self) -> str | None:
        """Who holds the run lock, other than this session; None when nobody does."""
        holder = self._holder()
        return None if holder is None else holder[0]

    def _holder(self) -> tuple[str, str] | None:
        """The run lock's holder, other than this session: its description and its
        application_name; None when nobody holds it."""
        with self.conn.cursor() as cur:
            cur.execute(
                """
                SELECT format('pid %%s, user %%s, application %%L, client %%s, since %%s',
                              a.pid, a.usename, a.application_name, a.client_addr,
                              a.backend_start), a.application_name
                FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
                  AND l.classid = %s AND l.objid = %s AND l.database = (
                      SELECT oid FROM pg_database WHERE datname = current_database())
                """,
                ADVISORY_KEYS,
            )
            row = cur.fetchone()
        self.conn.rollback()
        return None if row is None else (str(row[0]), str(row[1]))

    def _try_lock(self) -> bool:
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS)
            row = cur.fetchone()
        return bool(row and row[0])

    def _lock(self) -> None:
        """Take the run lock, or refuse at once while another run holds it.

        Only a run whose client process is gone (killed, say, in the middle of
        an index build) is waited for, a bounded time: the server ends its
        backend within ``CLIENT_CHECK_INTERVAL`` of its next check.
        """
        deadline = time.monotonic() + self.settings.dead_run_wait_s
        waiting = False
        while not self._try_lock():
            description, application = self._holder() or ("a session that has just ended", "")
            gone = client_gone(application)
            if not gone or time.monotonic() >= deadline:
                raise MigrationError(
                    f"another migration run holds the lock on this database ({description})",
                    hint=("its client process is gone but the server has not ended its "
                          "backend; end it with pg_terminate_backend(pid), then run this "
                          "command again" if gone else
                          "wait for it to finish, or stop it, then run this command again"),
                )
            if not waiting:
                logger.warning("the run lock is held by %s, whose client process is gone; "
                               "waiting up to %.0f s for the server to end it",
                               description, self.settings.dead_run_wait_s)
                waiting = True
            time.sleep(0.2)

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

        The tables ``work`` locks with ``lock_tables`` are asked ``NOWAIT``: an
        attempt that finds one of them taken is rolled back at once and tried
        again a few milliseconds later (``nowait_pause``), having queued nobody.
        Only once such tries have gone on for ``lock_timeout`` times ``ddl_attempts``
        (3 s by default: as long as the application would have queued, in all,
        behind attempts that each waited) does the first lock wait in the queue,
        up to ``lock_timeout`` per attempt: under a steady stream of short
        transactions the tables are never free at once, and only a request in
        the queue gets them.

        An attempt that waited and failed (on a lock timeout, or a deadlock with
        an application's transaction that the server broke by cancelling ours, as
        it does, our wait being the shorter (``lock_timeout_ms``):
        row locks, other statements' locks, and the first table's lock in the
        queueing phase) is rolled back and tried again after a growing, jittered
        pause (``ddl_pause``, so that retries do not fall into step with the
        application's own), ``ddl_attempts`` times at most; other sessions are
        never blocked behind us for longer than the timeout.  When a VACUUM
        holds a table of the plan (an autovacuum the engine's own writes
        started, most often, which yields to no request that does not wait),
        the engine vacuums it itself (``vacuum``) and tries again without
        spending an attempt.
        """
        attempts = self.settings.ddl_attempts
        attempt, tries = 1, 0  # the next waiting attempt; tries refused at once so far
        started = time.monotonic()
        queue_from = started + self.lock_timeout_ms / 1000 * attempts
        vacuum_deadline = started + self.settings.vacuum_wait_s
        while True:
            queue = time.monotonic() >= queue_from
            try:
                with queueing(allowed=queue), self.transaction(what) as cur:
                    cur.execute("SET LOCAL lock_timeout = %s", (self.lock_timeout_ms,))
                    return work(cur)
            except (psycopg2.errors.LockNotAvailable, psycopg2.errors.DeadlockDetected) as exc:
                reason = ("deadlock" if isinstance(exc, psycopg2.errors.DeadlockDetected)
                          else "lock not granted")
                at_once = isinstance(exc, NotFreeAtOnce) and not queue
                tries += at_once
                # pg_locks stops the server's lock manager while it is read: looked at
                # after a try refused at once only now and then (the 1st, 2nd, 4th, ...)
                seldom = not at_once or tries & (tries - 1) == 0
                vacuums = self.vacuums() if seldom else []
                if vacuums and time.monotonic() < vacuum_deadline:
                    logger.warning("%s: %s; %s holds the table: vacuuming it ourselves, which "
                                   "waits for it without blocking the application", what,
                                   reason, "; ".join(map(str, vacuums)))
                    self.vacuum(sorted({table for holder in vacuums for table in holder.tables}))
                    time.sleep(ddl_pause(1, self.settings.ddl_pause_cap_s))  # never a busy loop
                    continue  # without spending an attempt
                if at_once:
                    pause = nowait_pause(tries)
                    if time.monotonic() + pause >= queue_from:
                        logger.warning("%s: %s at once in %s tries over %.1f s; from now on "
                                       "the first lock waits in the queue, up to %s ms",
                                       what, reason, tries, time.monotonic() - started,
                                       self.lock_timeout_ms)
                    elif seldom:
                        logger.warning("%s: %s at once (try %s, not queueing), retrying in "
                                       "%.3f s", what, reason, tries, pause)
                    time.sleep(pause)
                    continue  # without spending an attempt
                if attempt == attempts:
                    holders = "; ".join(map(str, self.lock_holders())) or "another session"
                    before = f"{tries} tries without queueing, then " if tries else ""
                    raise MigrationError(
                        f"{what}: could not lock the tables after {before}{attempt} attempts "
                        f"of {self.lock_timeout_ms} ms ({reason})",
                        hint=f"{holders} held a lock on them; run this command again "
                             "(or with a longer --lock-timeout)",
                    ) from None
                pause = ddl_pause(attempt, self.settings.ddl_pause_cap_s)
                logger.warning("%s: %s (attempt %s of %s), retrying in %.2f s",
                               what, reason, attempt, attempts, pause)
                time.sleep(pause)
                attempt += 1

    def vacuums(self) -> list[LockHolder]:
        """VACUUMs and ANALYZEs (autovacuum's or another session's) holding a lock on a
        table of the plan.

        Told by their pids in ``pg_stat_progress_vacuum`` and ``_analyze``, which
        every role may read: the tool runs as the tables' owner, to whom
        ``pg_stat_activity`` hides other users' backends (an autovacuum
        worker's ``backend_type`` and user included).
        """
        return self.lock_holders(vacuums=True)

    def vacuum(self, tables: list[Table]) -> None:
        """VACUUM (ANALYZE) the tables a VACUUM holds, waiting for it without a timeout.

        An autovacuum yields its lock only to a request that waits longer than
        ``deadlock_timeout``, which a DDL's short ``lock_timeout`` never does; this
        one does, and yields nothing to the application: SHARE UPDATE EXCLUSIVE,
        asked or held, blocks neither reads nor writes.  An autovacuum against
        wraparound, or another session's VACUUM, does not yield and is waited
        for.  Our own leaves autovacuum nothing to start again for: the dead
        rows of the engine's fill are gone, the statistics new.
        """
        for table in tables:
            with self.unbounded(f"vacuum {table}") as cur:
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table.ident))

    def lock_holders(self, *, vacuums: bool = False) -> list[LockHolder]:
        """Other sessions (VACUUMs and ANALYZEs only, with ``vacuums``) holding a lock on a
        table of the plan, described as far as this role may see them: ``pg_locks`` shows
        every session's locks, ``pg_stat_activity`` only the role's own sessions' details."""
        tables = list(self.plan.tables)
        with self.conn.cursor() as cur:
            cur.execute(
                """
                WITH vacuuming (pid, command) AS (
                    SELECT pid, 'VACUUM' FROM pg_stat_progress_vacuum
                    UNION ALL SELECT pid, 'ANALYZE' FROM pg_stat_progress_analyze)
                SELECT format('pid %%s (%%s)', l.pid, concat_ws(', ',
                              CASE WHEN a.backend_type = 'autovacuum worker'
                                   THEN 'autovacuum: ' ELSE '' END || v.command,
                              'user ' || a.usename,
                              'application ' || quote_literal(nullif(a.application_name, '')),
                              a.state,
                              string_agg(DISTINCT l.mode || ' on ' || l.relation::regclass,
                                         ', ') || coalesce(' since ' || a.xact_start, ''),
                              CASE WHEN a.backend_type IS NULL
                                   THEN 'its other details hidden from this role' END)),
                       array_agg(DISTINCT t.number)
                FROM pg_locks l
                JOIN unnest(%s::text[]) WITH ORDINALITY t (name, number)
                  ON l.relation = to_regclass(t.name)
                LEFT JOIN pg_stat_activity a USING (pid)
                LEFT JOIN vacuuming v USING (pid)
                WHERE l.granted AND l.pid <> pg_backend_pid() AND l.locktype = 'relation'
                  AND (v.pid IS NOT NULL OR NOT %s)
                GROUP BY l.pid, a.backend_type, v.command, a.usename, a.application_name,
                         a.state, a.xact_start
                ORDER BY l.pid
                """,
                ([catalog.regclass(table) for table in tables], vacuums),
            )
            rows = [LockHolder(text, tuple(tables[number - 1] for number in numbers))
                    for text, numbers in cur.fetchall()]
        self.conn.rollback()
        return rows

    def progress(self, label: str, total: int, *, resumed: int = 0) -> Progress:
        return Progress(label, total, resumed=resumed, enabled=self.settings.show_progress)

    @contextmanager
    def unbounded(self, label: str) -> Iterator[Cursor]:
        """Statements that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``), on
        this session's connection in autocommit mode, without a statement or lock timeout.

        They scan a whole table under a lock that lets the application read and
        write, so neither timeout protects anyone: waiting is harmless and the
        scan takes as long as the table.  ``label`` is the fault point after them.
        They write their WAL in one go: they wait first for the standbys (``lag``).
        """
        self.conn.rollback()
        self.lag.wait(self)
        self.conn.autocommit = True
        cur = self.conn.cursor()
        try:
            cur.execute("SET statement_timeout = 0")
            cur.execute("SET lock_timeout = 0")
            yield cur
            self.point(label)
        finally:
            if not self.conn.closed:
                cur.execute("SELECT set_config('statement_timeout', %s, false)",
                            (str(self.settings.statement_timeout_ms),))
                cur.execute("RESET lock_timeout")
                cur.close()
                self.conn.autocommit = False
