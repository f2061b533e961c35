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
from contextvars import ContextVar
from typing import TypeAlias

import psycopg2
import psycopg2.errors
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


_UNPARSED = ("invalid database URL: it cannot be read as a URL or as key=value settings "
             "(in a URL, percent-encode any @ / ? # : or space in the user name or the "
             "password, @ as %40; in key=value settings, quote a value holding spaces)")
"""Why a DSN is refused before connecting.  libpq's own message is never shown: when a
password holds a character its syntax reserves, libpq quotes a piece of it as a host, a
port, a database name or a parameter."""
_TAKEN_APART = ("host", "hostaddr", "port", "dbname")


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's settings as libpq reads them; ConnectError (with ``_UNPARSED``, no piece
    of the DSN) when it cannot read them, or read a URL's password into the host, port
    or database name: an unencoded ``@`` or ``/`` in the password
    (``postgresql://app:S3@Cret4@localhost/db`` reads as the host ``Cret4@localhost``)."""
    try:
        params: dict[str, str] = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise ConnectError(_UNPARSED) from None
    if any("@" in params.get(name, "") for name in _TAKEN_APART):
        raise ConnectError(_UNPARSED)
    return params


def without_password(text: str, dsn: str) -> str:
    """``text`` with the DSN's password hidden wherever it appears, quoted as a URL or
    key=value setting or on its own (as a server's message may)."""
    text = redact_dsn(text)
    try:
        password = psycopg2.extensions.parse_dsn(dsn).get("password")
    except psycopg2.ProgrammingError:
        return text
    return text.replace(password, "***") if password else text


def describe_dsn(dsn: str) -> str:
    """user@host:port/dbname, for headers and reports."""
    try:
        params = parse_dsn(dsn)
    except ConnectError:
        return "(a database URL that cannot be read)"
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


class NotFreeAtOnce(psycopg2.errors.LockNotAvailable):
    """A table's lock asked ``NOWAIT`` was not free: the attempt ended without queueing."""


_QUEUE_FIRST: ContextVar[bool] = ContextVar("queue_first", default=True)


@contextmanager
def queueing(*, allowed: bool) -> Iterator[None]:
    """Whether :func:`lock_tables` may wait in the queue for its first lock, for the
    with-block (``Session.ddl`` decides it per attempt; outside one, it may)."""
    token = _QUEUE_FIRST.set(allowed)
    try:
        yield
    finally:
        _QUEUE_FIRST.reset(token)


def lock_tables(cur: psycopg2.extensions.cursor, relations: Sequence[sql.Composable],
                mode: str, *, wait: bool = True) -> None:
    """Lock ``relations`` in ``mode`` (``ACCESS EXCLUSIVE``, ...) waiting for one lock at most.

    Every lock is asked ``NOWAIT``, except the first when ``wait`` and
    :func:`queueing` allow it, which waits up to the transaction's
    ``lock_timeout``.  A lock that is not free at once ends the attempt
    (:class:`NotFreeAtOnce`), and ``Session.ddl`` gives back every lock with
    the transaction and tries again a few milliseconds later.  A request that
    waits queues every application query that conflicts with it behind it,
    however short the lock it asks for; one that does not wait queues nobody.
    So the engine never holds one table's lock while it waits in the queue of
    another, and waits in a queue only when ``Session.ddl`` lets the first
    lock wait, after many tries never found the tables free.

    The locks asked ``NOWAIT`` go in one statement, which takes them in the
    order given: the first granted blocks the application until the commit,
    so each round trip after it is the application's wait too.
    """
    first_waits = wait and _QUEUE_FIRST.get()
    groups = ([relations[:1], relations[1:]] if first_waits else [relations])
    for number, group in enumerate(filter(None, groups)):
        nowait = bool(number) or not first_waits
        try:
            cur.execute(sql.SQL("LOCK TABLE {} IN {} MODE{}").format(
                sql.SQL(", ").join(group), sql.SQL(mode), sql.SQL(" NOWAIT" if nowait else "")))
        except psycopg2.errors.LockNotAvailable as exc:
            if not nowait:
                raise
            raise NotFreeAtOnce(str(exc).strip()) from exc


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
    parse_dsn(dsn)  # refused before connecting when libpq would take it apart
    try:
        conn = psycopg2.connect(dsn, application_name=application_name or engine_application_name(),
                                connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise ConnectError(
            f"cannot connect to {describe_dsn(dsn)}: {without_password(str(exc), dsn).strip()}"
        ) from None
    except psycopg2.ProgrammingError:  # malformed DSN: parse_dsn refuses it first
        raise ConnectError(_UNPARSED) from None
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
