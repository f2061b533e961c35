"""The checks' heavy reads side by side, on up to ``--jobs`` connections reading one snapshot.

``validate_migration`` and ``verify`` judge the database as of one moment: every check
runs in one REPEATABLE READ transaction.  Their heavy reads (each table's digest and its
backup copy's, the rows compared where they differ, the orphan counts) are independent
scans, each keeping one server core busy.  With ``jobs`` above one they run on
connections of their own, one read at a time each, whose transactions import the checking
transaction's snapshot (``pg_export_snapshot``, ``SET TRANSACTION SNAPSHOT``): they see
exactly what it sees, nothing committed since.  They are ``READ ONLY`` and run only the
queries they are given, so they write and create nothing (no ``pg_temp`` function: the
checks never need one) and need no more rights than the checking transaction has.  With
one job, the checking transaction's own cursor runs the reads in order, as before.

A reader asks each lock with a short ``lock_timeout``: the checking transaction holds the
locks of what it read, and a DDL statement queued behind one of them would queue a reader
too, which the checking transaction would wait for, without the server seeing a
deadlock.  A read that times out is left to the checking transaction itself, after the
others: it holds the lock already, or waits in the queue as it would have alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import cursor as Cursor

from migration.connection import Connection

T = TypeVar("T")

Opener = Callable[[], AbstractContextManager[Connection]]
"""Opens one more connection to the database being checked, closed when its block ends."""

READ_LOCK_TIMEOUT = "200ms"
"""How long a reader waits for a lock before it leaves its read to the checking transaction."""


@dataclass(frozen=True)
class Read(Generic[T]):
    """One heavy read of a check: the relation it names, and the work, given a cursor."""

    relation: str
    run: Callable[[Cursor], T]


before_read: Callable[[str], None] | None = None
"""Called before each read with the relation it names, on the thread that runs it, and with
``OPENING`` before a reader's transaction begins: for the tests, which commit a change
there to show that no reader sees it."""

OPENING = "(opening a reader)"


class Readers:
    """Runs reads in the snapshot of ``cur``'s transaction, which must be REPEATABLE READ
    (or SERIALIZABLE); with ``jobs`` above one and an ``opener``, on up to ``jobs``
    connections of their own, opened by the first reads and kept until ``close``.  Used as
    a context manager, entered before the transaction opens a savepoint."""

    def __init__(self, cur: Cursor, jobs: int = 1, opener: Opener | None = None) -> None:
        self.cur = cur
        self.jobs = jobs if opener is not None else 1
        self._opener = opener
        self._connections: list[Connection] = []
        self._stack = ExitStack()
        self._snapshot: str | None = None

    def __enter__(self) -> Readers:
        """Export the snapshot now: a transaction cannot once a subtransaction is open (a
        check's savepoint may be left open until the end).  The checking transaction is
        idle while the readers read: a server's ``idle_in_transaction_session_timeout``
        must not end it."""
        if self.jobs > 1:
            self.cur.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            self.cur.execute("SELECT pg_export_snapshot()")
            row = self.cur.fetchone()
            assert row is not None
            self._snapshot = str(row[0])
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the readers' connections (their transactions end with them)."""
        self._connections.clear()
        self._stack.close()

    def run(self, reads: Sequence[Read[T]]) -> list[T]:
        """The results of ``reads``, in their order.  After a failure no further read
        starts, the ones running end, and the first failure is raised."""
        if self.jobs < 2 or not reads:
            return [_run(read, self.cur) for read in reads]
        connections = self._open(min(self.jobs, len(reads)))
        pending = list(enumerate(reads))
        results: dict[int, T] = {}
        left: list[int] = []  # reads whose lock a reader could not have at once
        taking = threading.Lock()
        stop = threading.Event()

        def work(conn: Connection) -> None:
            with conn.cursor() as cur:
                while not stop.is_set():
                    with taking:
                        if not pending:
                            return
                        number, read = pending.pop(0)
                    cur.execute("SAVEPOINT check_read")
                    try:
                        results[number] = _run(read, cur)
                    except psycopg2.errors.LockNotAvailable:
                        cur.execute("ROLLBACK TO SAVEPOINT check_read")
                        left.append(number)
                    except BaseException:
                        stop.set()
                        raise
                    cur.execute("RELEASE SAVEPOINT check_read")

        with ThreadPoolExecutor(max_workers=len(connections),
                                thread_name_prefix="check") as pool:
            futures = [pool.submit(work, conn) for conn in connections]
            try:
                wait(futures)
            except BaseException:  # interrupted: the reads under way are cancelled
                stop.set()
                for conn in connections:
                    with suppress(psycopg2.Error):
                        conn.cancel()
                raise
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        for number in sorted(left):
            results[number] = _run(reads[number], self.cur)
        return [results[number] for number in range(len(reads))]

    def _open(self, count: int) -> list[Connection]:
        """At least ``count`` readers, each in a read-only transaction that imported the
        checking transaction's snapshot."""
        assert self._opener is not None
        assert self._snapshot is not None, "used outside its with-block"
        while len(self._connections) < count:
            if before_read is not None:
                before_read(OPENING)
            conn = self._stack.enter_context(self._opener())
            conn.autocommit = True  # the transaction below is run statement by statement
            with conn.cursor() as cur:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur.execute("SET TRANSACTION SNAPSHOT %s", (self._snapshot,))
                cur.execute("SET LOCAL search_path = pg_catalog, pg_temp")
                cur.execute("SELECT set_config('lock_timeout', %s, true), set_config("
                            "'idle_in_transaction_session_timeout', '0', true)",
                            (READ_LOCK_TIMEOUT,))
            self._connections.append(conn)
        return self._connections[:count]


def _run(read: Read[T], cur: Cursor) -> T:
    if before_read is not None:
        before_read(read.relation)
    return read.run(cur)
