"""``tests.sqltext.text_of``, the server-less rendering the statement builders' tests read:
by hand for each kind of ``Composable``, and against libpq's own quoting on a connection."""

from __future__ import annotations

import pytest
from psycopg2 import sql

from tests.operate import connected
from tests.sqltext import text_of

NAMES = ("users", "Users", 'we"ird', "my table", "ünïcode", "a.b", "")
VALUES = (None, True, False, 0, -7, "plain", "it's", "back\\slash", "ünïcode", "")


@pytest.mark.parametrize(("statement", "expected"), [
    (sql.Identifier("users"), '"users"'),
    (sql.Identifier('we"ird'), '"we""ird"'),
    (sql.Identifier("public", "My Table"), '"public"."My Table"'),
    (sql.Literal("it's"), "'it''s'"),
    (sql.Literal(None), "NULL"),
    (sql.Literal(wrapped=True), "true"),
    (sql.Literal(42), "42"),
    (sql.Literal(-1), " -1"),  # after a minus sign, not a comment: 1 - -1
    (sql.Placeholder(), "%s"),
    (sql.Placeholder("n"), "%(n)s"),
    (sql.SQL("SELECT {} FROM {} WHERE {} = {}").format(
        sql.SQL(", ").join([sql.Identifier("a"), sql.Identifier("B")]),
        sql.Identifier("s", "t"), sql.Identifier("a"), sql.Literal("x")),
     'SELECT "a", "B" FROM "s"."t" WHERE "a" = \'x\''),
])
def test_each_kind_of_composable_is_written_as_libpq_writes_it(
        statement: sql.Composable, expected: str) -> None:
    assert text_of(statement) == expected


@pytest.mark.parametrize("value", [1.5, b"bytes", ["a"]])
def test_a_literal_it_cannot_write_exactly_is_refused(value: object) -> None:
    with pytest.raises(TypeError, match="no server-less rendering"):
        text_of(sql.Literal(value))


def test_it_writes_what_as_string_writes_on_a_connection(legacy_db: str) -> None:
    """The names and values the builders may be given, each rendered by psycopg2 on a
    UTF-8 connection and without one."""
    statements: list[sql.Composable] = [sql.Identifier(name) for name in NAMES]
    statements += [sql.Identifier("s", name) for name in NAMES]
    statements += [sql.Literal(value) for value in VALUES]
    with connected(legacy_db) as conn:
        assert conn.encoding == "UTF8"
        for statement in statements:
            assert text_of(statement) == statement.as_string(conn), statement
