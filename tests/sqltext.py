"""The text of a ``psycopg2.sql.Composable``, without a server.

``Composable.as_string`` needs a connection or a cursor (libpq quotes by the
connection's encoding and settings), so the statement builders' table-driven tests,
which start no server, render with :func:`text_of` instead.  It writes what libpq
writes on a UTF-8 connection with ``standard_conforming_strings`` on (every server
since 9.1): identifiers always double-quoted, an embedded ``"`` doubled; string
literals single-quoted, an embedded ``'`` doubled, a backslash left alone.
``tests/test_sqltext.py`` holds it to ``as_string`` on a real connection.
"""

from __future__ import annotations

from psycopg2 import sql


def quoted_identifier(name: str) -> str:
    """``name`` as libpq's PQescapeIdentifier writes it."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: object) -> str:
    """A value of ``sql.Literal`` as psycopg2 adapts it: the types the engine's
    builders pass (None, bool, int, str); anything else is refused, not guessed."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f" {value}" if value < 0 else str(value)  # never ``--``, a comment
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no server-less rendering for a literal of {type(value).__name__}")


def text_of(statement: sql.Composable) -> str:
    """The statement's text, placeholders left as ``%(name)s`` or ``%s``."""
    if isinstance(statement, sql.Composed):
        return "".join(text_of(part) for part in statement.seq)
    if isinstance(statement, sql.SQL):
        return statement.string
    if isinstance(statement, sql.Identifier):
        return ".".join(quoted_identifier(name) for name in statement.strings)
    if isinstance(statement, sql.Literal):
        return literal(statement.wrapped)
    if isinstance(statement, sql.Placeholder):
        return "%s" if statement.name is None else f"%({statement.name})s"
    raise TypeError(f"no server-less rendering for {type(statement).__name__}")


def words_of(statement: sql.Composable) -> str:
    """``text_of`` with each run of white space one space: a multi-line statement compared
    on one line."""
    return " ".join(text_of(statement).split())
