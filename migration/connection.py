"""Connections: how the tool reaches the database, and how it shows where it went.

The password of a DSN never leaves this module: everything printed or logged
uses :func:`redact_dsn`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeAlias

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

Connection: TypeAlias = psycopg2.extensions.connection

APPLICATION_NAME = "uuid-migration"
# The engine's application_name: which process on which host a backend works
# for, so that a rerun can tell a run whose client was killed from one still
# going.  The server keeps 63 bytes of it; the host name comes last.
_CLIENT_NAME = re.compile(r"uuid-migration pid ([0-9]+) on .*")

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class ConnectError(RuntimeError):
    """The database could not be reached; the message carries no password."""


def redact_dsn(text: str) -> str:
    """Hide any password in a DSN, URL or message that quotes one."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


def describe_dsn(dsn: str) -> str:
    """user@host:port/dbname, for headers and reports."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return redact_dsn(dsn)
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"{params.get('user', '')}@{host}:{port}/{params.get('dbname', '')}"


def engine_application_name(pid: int | None = None) -> str:
    """``uuid-migration pid 1234 on host``, as the server will show it (63 bytes, ASCII)."""
    name = f"{APPLICATION_NAME} pid {os.getpid() if pid is None else pid} on {socket.gethostname()}"
    return name.encode("ascii", "replace").decode("ascii")[:63]


def client_pid(application_name: str) -> int | None:
    """The client pid an engine application_name names; None for any other client."""
    match = _CLIENT_NAME.fullmatch(application_name)
    return None if match is None else int(match[1])


def lift_statement_timeout(cur: psycopg2.extensions.cursor) -> None:
    """No statement timeout for the rest of this transaction: for a step that reads or
    rewrites a whole table, whose time grows with the table, not with a runaway query."""
    cur.execute("SET LOCAL statement_timeout = 0")


def lock_tables(cur: psycopg2.extensions.cursor, relations: Sequence[sql.Composable],
                mode: str, *, wait: bool = True) -> None:
    """Lock ``relations`` in ``mode`` (``ACCESS EXCLUSIVE``, ...) waiting for one lock only.

    The first waits up to the transaction's ``lock_timeout`` (not at all
    without ``wait``), every other is asked ``NOWAIT``: a lock that is not free
    at once ends the attempt (``LockNotAvailable``), and ``Session.ddl`` gives
    back every lock with the transaction and tries again later.  So the engine
    never holds one table's lock while it waits in the queue of another (which
    queued the application behind the lock held, once per table), and an
    attempt delays the application by one ``lock_timeout`` at most.
    """
    for number, relation in enumerate(relations):
        nowait = sql.SQL(" NOWAIT" if number or not wait else "")
        cur.execute(sql.SQL("LOCK TABLE {} IN {} MODE{}").format(relation, sql.SQL(mode),
                                                                 nowait))


def connect(
    dsn: str,
    *,
    application_name: str | None = None,
    readonly: bool = False,
    autocommit: bool = False,
) -> Connection:
    """Open a connection with the tool's session settings.

    ``readonly`` makes every transaction of the session read-only on the
    server side, so a read-only command cannot write even by mistake.  The
    application_name defaults to :func:`engine_application_name`.
    """
    try:
        conn = psycopg2.connect(dsn, application_name=application_name or engine_application_name(),
                                connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise ConnectError(
            f"cannot connect to {describe_dsn(dsn)}: {redact_dsn(str(exc)).strip()}"
        ) from None
    except psycopg2.ProgrammingError as exc:  # malformed DSN
        raise ConnectError(f"invalid database URL: {redact_dsn(str(exc)).strip()}") from None
    if readonly:
        conn.set_session(readonly=True)
    conn.autocommit = autocommit
    return conn


@contextmanager
def connected(dsn: str, **kwargs: bool | str) -> Iterator[Connection]:
    conn = connect(dsn, **kwargs)  # type: ignore[arg-type]
    try:
        yield conn
    finally:
        conn.close()
