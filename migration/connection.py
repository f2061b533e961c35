"""Connections: how the tool reaches the database, and how it shows where it went.

The password of a DSN never leaves this module: everything printed or logged
uses :func:`redact_dsn`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeAlias

import psycopg2
import psycopg2.extensions

Connection: TypeAlias = psycopg2.extensions.connection

APPLICATION_NAME = "uuid-migration"

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


def connect(
    dsn: str,
    *,
    application_name: str = APPLICATION_NAME,
    readonly: bool = False,
    autocommit: bool = False,
) -> Connection:
    """Open a connection with the tool's session settings.

    ``readonly`` makes every transaction of the session read-only on the
    server side, so a read-only command cannot write even by mistake.
    """
    try:
        conn = psycopg2.connect(dsn, application_name=application_name, connect_timeout=10)
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
