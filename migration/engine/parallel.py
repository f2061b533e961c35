"""Whole-table statements of different tables side by side, on up to ``--jobs`` connections.

The expand's index builds (``CREATE INDEX CONCURRENTLY``) and validations (``VALIDATE
CONSTRAINT``) each scan a table under a lock that lets the application read and write,
and each keeps one core of the server busy: on a server with cores to spare, the builds
of two tables take the time of the longer one.  Two of them on the same table do not
overlap (``CREATE INDEX CONCURRENTLY`` takes SHARE UPDATE EXCLUSIVE, which conflicts
with itself, and so does ``VALIDATE``), so a connection only takes a table no other one
is working on; it waits for one otherwise, instead of waiting in the server's lock
queue.  With one job, or work on one table only, the session's own connection does it
all in the order given, as before there were jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg2

from migration.connection import Connection
from migration.model import Table
from migration.session import Session

T = TypeVar("T")


@dataclass(frozen=True)
class Unit(Generic[T]):
    """One piece of work on one table, run on whichever connection takes it."""

    table: Table
    run: Callable[[Session], T]


def side_by_side(session: Session, units: Sequence[Unit[T]]) -> list[T]:
    """Run every unit, each on one of up to ``jobs`` connections of its own, at most one
    at a time per table, in the order given as far as that lets; their results, in that
    order.  An interrupted run resumes as the units themselves do (each finds what it had
    built); after a failure no further unit starts, the ones running end, and the first
    failure is raised.

    The session's own connection is left idle, out of any transaction: ``CREATE INDEX
    CONCURRENTLY`` waits for every transaction whose snapshot is older than its own, one
    left open on this connection, which waits for the builds, included.
    """
    tables = {unit.table for unit in units}
    if session.settings.jobs < 2 or len(tables) < 2:
        return [unit.run(session) for unit in units]
    session.conn.rollback()
    pending = list(enumerate(units))
    busy: set[Table] = set()
    results: dict[int, T] = {}
    connections: list[Connection] = []
    changed = threading.Condition()
    stop = threading.Event()

    def take() -> tuple[int, Unit[T]] | None:
        with changed:
            while not stop.is_set() and pending:
                for place, (number, unit) in enumerate(pending):
                    if unit.table not in busy:
                        del pending[place]
                        busy.add(unit.table)
                        return number, unit
                changed.wait()
            return None

    def work() -> None:
        try:
            with session.worker() as worker:
                with changed:
                    connections.append(worker.conn)
                while (taken := take()) is not None:
                    number, unit = taken
                    try:
                        results[number] = unit.run(worker)
                    except BaseException:
                        stop.set()  # before its table is free: nothing more starts
                        raise
                    finally:
                        with changed:
                            busy.discard(unit.table)
                            changed.notify_all()
        except BaseException:
            with changed:
                stop.set()  # a connection that could not be opened stops the others too
                changed.notify_all()
            raise

    jobs = min(session.settings.jobs, len(tables))
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="expand") as pool:
        futures = [pool.submit(work) for _ in range(jobs)]
        try:
            wait(futures)
        except BaseException:  # interrupted: the statements under way are cancelled
            with changed:
                for conn in connections:
                    with suppress(psycopg2.Error):  # closed meanwhile: nothing to cancel
                        conn.cancel()
            raise
        finally:
            stop.set()
            with changed:
                changed.notify_all()
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return [results[number] for number in range(len(units))]
