"""The application's sessions that connected before the swap: their prepared statements
may fail after it.

A statement prepared before the swap was planned for the old column: ``SELECT *`` fails
with "cached plan must not change result type", a parameter the server inferred as
text (``WHERE id = $1``) with "operator does not exist: uuid = text", an ``INSERT``
whose parameters were typed as strings with a type error.  The server does not replan
them; a new session prepares them afresh.  So right after the swap the engine names
the sessions connected before it (``pg_stat_activity``: application name, user, client
address, how many), to be recycled; ``status`` keeps naming those still connected.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from migration.connection import APPLICATION_NAME, Connection
from migration.log import logger
from migration.session import Session


@dataclass(frozen=True)
class Sessions:
    """The sessions of one application, user and client address."""

    application: str
    user: str
    address: str  # "local" for a Unix socket
    count: int
    unseen: int  # of which this role may not see when they connected

    def __str__(self) -> str:
        text = (f"application {self.application or '(none)'!r}, user {self.user}, from "
                f"{self.address}: {self.count} session(s)")
        if self.unseen:
            text += (f" ({self.unseen} connected at a time this role may not see: "
                     "pg_read_all_stats shows it)")
        return text


def now(conn: Connection) -> datetime:
    """The server's clock: what a session's ``backend_start`` is compared with."""
    with conn.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        row = cur.fetchone()
    conn.rollback()
    assert row is not None
    assert isinstance(row[0], datetime)
    return row[0]


def connected_before(conn: Connection, at: datetime) -> list[Sessions]:
    """The client sessions of this database connected before ``at``, the engine's own left
    out, and so are the WAL senders (a subscriber's, say: they prepare nothing).  A
    session of a role this one is not a member of shows no start time (nor address)
    without ``pg_read_all_stats``: it is counted, as one that may be older."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT coalesce(application_name, ''), coalesce(usename::text, '?'),
                   coalesce(host(client_addr), CASE WHEN backend_start IS NULL THEN '?'
                                                    ELSE 'local' END),
                   count(*), count(*) FILTER (WHERE backend_start IS NULL)
            FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND usesysid IS NOT NULL
              AND coalesce(backend_type, 'client backend') = 'client backend'
              AND coalesce(backend_start < %s, true)
              AND application_name NOT LIKE %s
              AND pid NOT IN (SELECT pid FROM pg_stat_replication)
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            """, (at, APPLICATION_NAME + "%"))
        found = [Sessions(*row) for row in cur.fetchall()]
    conn.rollback()
    return found


def advice(found: list[Sessions]) -> str:
    """The operator's line about them."""
    return (f"{sum(group.count for group in found)} client session(s) connected before the "
            "swap: statements they prepared over the converted tables may fail (cached plan "
            "must not change result type; operator does not exist: uuid = text); recycle "
            "them (restart the application's connection pools): "
            + "; ".join(map(str, found)))


@dataclass(frozen=True)
class Recycled:
    """What ``recycle`` did: the idle sessions it ended, and those of the named roles it
    left (busy, or of a role this one may not signal), each as ``pid (user, state)``."""

    ended: list[str]
    left: list[str]


def recycle(conn: Connection, at: datetime, roles: tuple[str, ...]) -> Recycled:
    """End the idle sessions of ``roles`` that connected before ``at`` (the swap), so that
    their pools open new ones, which prepare against the new column types.

    Only sessions idle outside a transaction are ended: such a session has no
    work in flight, and a pool that checks its connections on checkout replaces
    it unseen.  One that is busy, or idle in a transaction, is left and named.
    The check and the signal are two steps: a session that starts a statement
    in between gets a connection error for it (its transaction never commits
    half done).  Signalling needs membership of the session's role or of
    ``pg_signal_backend``, and a superuser's sessions only a superuser may end;
    the others are left and named.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT a.pid, a.usename::text, a.state,
                   coalesce(a.state = 'idle', false)
                   AND (pg_has_role(a.usesysid, 'MEMBER')
                        OR pg_has_role('pg_signal_backend', 'MEMBER'))
                   AND (NOT r.rolsuper
                        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))
            FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
            WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
              AND coalesce(a.backend_type, 'client backend') = 'client backend'
              AND coalesce(a.backend_start < %s, true)
              AND a.usename = ANY (%s) AND a.application_name NOT LIKE %s
            ORDER BY a.pid
            """, (at, list(roles), APPLICATION_NAME + "%"))
        found = cur.fetchall()
        ended: list[str] = []
        left: list[str] = []
        for pid, user, state, may_end in found:
            described = f"{pid} ({user}, {state or 'state hidden'})"
            if may_end:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                row = cur.fetchone()
                (ended if row and row[0] else left).append(described)
            else:
                left.append(described)
    conn.rollback()
    return Recycled(ended, left)


def after_swap(session: Session) -> dict[str, Any]:
    """Right after a swap: the client sessions connected before it, named as a warning
    (their prepared statements may fail) and kept with the swap's time in its log row,
    where ``status`` finds them.  With ``--recycle-sessions``, the idle ones of the roles
    it names are ended first (``recycle``)."""
    swapped_at = now(session.conn)
    recycled = None
    if session.settings.recycle_roles:
        recycled = recycle(session.conn, swapped_at, session.settings.recycle_roles)
        if recycled.ended:
            logger.info("ended %d idle session(s) connected before the swap "
                        "(--recycle-sessions): %s", len(recycled.ended),
                        ", ".join(recycled.ended))
        if recycled.left:
            logger.warning("--recycle-sessions left %d session(s) of %s (busy, idle in a "
                           "transaction, or of a role this one may not signal): %s",
                           len(recycled.left), ", ".join(session.settings.recycle_roles),
                           ", ".join(recycled.left))
    sessions = connected_before(session.conn, swapped_at)
    if sessions:
        logger.warning("%s", advice(sessions))
    details: dict[str, Any] = {"swapped_at": swapped_at.isoformat(),
                               "sessions_before_swap": [str(group) for group in sessions]}
    if recycled is not None:
        details["sessions_recycled"] = recycled.ended
        details["sessions_not_recycled"] = recycled.left
    return details
