"""Statements an application's pool prepared before the migration, executed during the
fill and after the swap.

Drivers that cache server-side prepared statements do it on their own (JDBC
after five executions of a statement, asyncpg, pgx, Npgsql, psycopg 3 with
``prepare``), and a pooled connection keeps them for hours.  The server plans
such a statement again after the swap, but not with other types: its result
columns and its parameters keep the types they were prepared with.  So a
statement prepared before the migration fails after it until its connection
is recycled or it is prepared again, where the same statement sent afresh works:

- ``SELECT *`` over the key's table or a child: ``cached plan must not change result
  type`` (also during the fill, from the moment the table's copy column is added);
- ``WHERE key = $1``, the parameter inferred as ``text`` from the string column:
  ``operator does not exist: uuid = text``;
- an ``INSERT`` into a child, the key's parameter inferred as the string type:
  ``column ... is of type uuid but expression is of type character varying``.

The rehearsal does what such a pool does: on a connection opened before the
final migration it prepares these statements, a ``SELECT *`` of the first child too
(``Prepared.open``), runs each once, and runs them again during the fill of the
children's copies and after the swap (``Prepared.after``, ``rehearse.final_migration``);
each that fails is a finding with the server's message and the advice (``ADVICE``), for
the report.  It is the application's to act on, not a failure of the migration.
The INSERT is rolled back each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from migration.connection import Connection, connect
from migration.plan import Plan
from migration.rehearsal.generate import Loader, read_schema
from migration.report import Finding, Status

CHECK = "prepared_statement"
ADVICE = ("recycle the application's connection pools right after the swap: a statement "
          "prepared before it keeps the old types until its connection closes or it is "
          "prepared again (psycopg 3 in transactions and asyncpg prepare again on this error; "
          "JDBC, pgx, Npgsql and SQL PREPARE do not); name the columns rather than SELECT * "
          "(prepared before the expansion, it fails during the fill too); and in statements "
          "prepared after the swap bind the key untyped or cast it explicitly ($1::uuid)")


@dataclass(frozen=True)
class Statement:
    """A statement prepared under ``name``, with the values it is executed with."""

    name: str
    text: str  # as the report shows it
    values: tuple[str | None, ...]
    write: bool = False  # executed in a transaction rolled back


def statements(conn: Connection, plan: Plan) -> list[Statement]:
    """The statements, prepared on ``conn`` (autocommit): ``SELECT *`` of the key's table,
    a SELECT by key with an untyped parameter, and, into the first child of the plan
    (none without a child), a ``SELECT *`` and an INSERT of a generated row (none when
    no generated row meets its constraints)."""
    parent = plan.parent
    table = parent.table.ident.as_string(conn)
    key = sql.Identifier(parent.column).as_string(conn)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {}::text FROM {} WHERE {} IS NOT NULL LIMIT 1").format(
            sql.Identifier(parent.column), parent.table.ident, sql.Identifier(parent.column)))
        found = cur.fetchone()
    made = [Statement("uuid_migration_select_all", f"SELECT * FROM {table} LIMIT 1", ()),
            Statement("uuid_migration_select_by_key", f"SELECT * FROM {table} WHERE {key} = $1",
                      (found[0] if found else "00000000-0000-4000-8000-000000000000",))]
    if plan.children:
        child = plan.children[0].table.ident.as_string(conn)
        made.append(Statement("uuid_migration_select_child", f"SELECT * FROM {child} LIMIT 1",
                              ()))
    insert = _child_insert(conn, plan)
    if insert is not None:
        made.append(insert)
    with conn.cursor() as cur:
        for statement in made:
            cur.execute(sql.SQL("PREPARE {} AS {}").format(sql.Identifier(statement.name),
                                                           sql.SQL(statement.text)))
    return made


def _child_insert(conn: Connection, plan: Plan) -> Statement | None:
    """An INSERT of a generated row into the plan's first child, its values as parameters
    whose types the server infers from the columns (the key's: its string type)."""
    if not plan.children:
        return None
    child = plan.children[0]
    conn.autocommit = False
    try:
        spec = next(s for s in read_schema(conn, plan) if s.table == child.table)
        with conn.cursor() as cur:
            row = Loader(cur, seed=1, plan=plan, rows=0, deferred=set()).candidate(
                spec, start=1_000_000, required=[child.column])
    finally:
        conn.rollback()
        conn.autocommit = True
    if row is None:
        return None
    text = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        child.table.ident, sql.SQL(", ").join(map(sql.Identifier, row)),
        sql.SQL(", ").join(sql.SQL(f"${n}") for n in range(1, len(row) + 1)))
    return Statement("uuid_migration_insert_child", text.as_string(conn), tuple(row.values()),
                     write=True)


def execute(conn: Connection, statement: Statement) -> psycopg2.Error | None:
    """EXECUTE ``statement`` (a write in a transaction rolled back); the error, if any."""
    execute_it = sql.SQL("EXECUTE {}{}").format(
        sql.Identifier(statement.name),
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(statement.values)))
        if statement.values else sql.SQL(""))
    conn.autocommit = not statement.write
    try:
        with conn.cursor() as cur:
            cur.execute(execute_it, statement.values)
        return None
    except psycopg2.Error as exc:
        return exc
    finally:
        if statement.write:
            conn.rollback()
        conn.autocommit = True


class Prepared:
    """A connection with the statements prepared on it, as an application pool's."""

    def __init__(self, conn: Connection, made: list[Statement]) -> None:
        self.conn = conn
        self.statements = made
        self.before = {s.name: execute(conn, s) for s in made}
        """What each gave before the migration: a failure then is no finding after it."""

    @classmethod
    @contextmanager
    def open(cls, dsn: str, plan: Plan) -> Iterator[Prepared]:
        conn = connect(dsn, autocommit=True)
        try:
            yield cls(conn, statements(conn, plan))
        finally:
            conn.close()

    def after(self, moment: str) -> list[Finding]:
        """Each statement executed again: a finding each, WARN with the server's message and
        ``ADVICE`` for one that fails now (``moment``: "after the swap", or "during the
        fill (before the swap)")."""
        findings = []
        for statement in self.statements:
            subject = f"{statement.name} ({statement.text})"
            earlier = self.before[statement.name]
            if earlier is not None:
                findings.append(Finding(CHECK, Status.SKIP, "not tried: it failed before the "
                                        f"migration already: {_message(earlier)}", subject))
                continue
            error = execute(self.conn, statement)
            if error is None:
                findings.append(Finding(CHECK, Status.PASS, "prepared before the migration, "
                                        f"it runs {moment}", subject))
            else:
                findings.append(Finding(
                    CHECK, Status.WARN, f"prepared before the migration, it fails {moment}: "
                    f"{_message(error)} (SQLSTATE {error.pgcode})", subject, hint=ADVICE))
        return findings


def _message(exc: psycopg2.Error) -> str:
    return (exc.diag.message_primary or str(exc)).strip()
