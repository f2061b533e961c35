"""Smoke writes: what an application does to each table of the plan, tried and rolled back.

No catalog query can tell that a trigger body uses the id as text
(``NEW.user_id := lower(NEW.user_id)``), or that a generated column or a
policy no longer compiles once the key is a ``uuid``: PL/pgSQL plans a body
at its first call.  So, for every table of the plan, in one transaction
rolled back at the end, a generated row (:mod:`migration.rehearsal.generate`,
its key columns referring to existing parents) is INSERTed, UPDATEd (a
non-key column set to itself, the parent key to a new UUID, a child key to
the parent it already names) and DELETEd, each statement in a savepoint so
that one failure does not hide the others: when the INSERT fails, the
UPDATE is tried on a row already there (its keys set to what they hold),
and the DELETE is reported not tried.

Each write binds the key values two ways: ``unknown``, an untyped literal
(psycopg2's ``%s``, JDBC with ``stringtype=unspecified``), which the server
casts to the column's type whatever it is; and ``varchar``, a
``character varying`` parameter (``%s::varchar``, JDBC's ``setString``).

How the two kinds of failure are told apart: after the swap ``uuid =
character varying`` has no operator (and a varchar is not assigned to a
uuid column), so a ``varchar`` write fails with SQLSTATE 42883 or 42804.
That is the application's binding, not the migration: a failure counts as
a *binding* failure (:func:`binding_failures`, :data:`BINDING_ADVICE`) when
it is a ``varchar`` write failing with one of those two SQLSTATEs while the
same write with the ``unknown`` binding passed.  Every other failure is a
*migration* failure (:func:`migration_failures`): the schema no longer takes
the application's writes, whatever the client does.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import cursor as Cursor

from migration.connection import Connection
from migration.plan import Plan
from migration.rehearsal.generate import Loader, TableSpec, read_schema

Operation = Literal["insert", "update", "delete"]
Binding = Literal["unknown", "varchar"]
BINDINGS: tuple[Binding, ...] = ("unknown", "varchar")
OPERATIONS: tuple[Operation, ...] = ("insert", "update", "delete")
TYPE_MISMATCH = frozenset({"42883", "42804"})
"""undefined_function (``operator does not exist: uuid = character varying``) and
datatype_mismatch (``column "id" is of type uuid but expression is of type character varying``)."""
BINDING_ADVICE = ("the application must bind the id untyped: a varchar/text-typed parameter "
                  "no longer compares with a uuid column (JDBC: setString needs "
                  "stringtype=unspecified, or use setObject with a java.util.UUID)")


@dataclass(frozen=True)
class SmokeResult:
    table: str
    operation: Operation
    binding: Binding
    ok: bool
    error: str | None
    sqlstate: str | None = None


def binding_failures(results: Sequence[SmokeResult]) -> list[SmokeResult]:
    """``varchar`` writes refused for the parameter's type where the untyped one passed:
    the application's binding to change (:data:`BINDING_ADVICE`), not a migration failure."""
    passed = {(r.table, r.operation) for r in results if r.binding == "unknown" and r.ok}
    return [r for r in results if not r.ok and r.binding == "varchar"
            and r.sqlstate in TYPE_MISMATCH and (r.table, r.operation) in passed]


def migration_failures(results: Sequence[SmokeResult]) -> list[SmokeResult]:
    """Every failed write that is not a binding failure."""
    binding = binding_failures(results)
    return [r for r in results if not r.ok and r not in binding]


def smoke_writes(conn: Connection, plan: Plan) -> list[SmokeResult]:
    """INSERT, UPDATE and DELETE a generated row in every table of the plan, each key bound
    both ways; all in one transaction, rolled back (``conn`` must have none open)."""
    if conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
        raise RuntimeError("smoke_writes runs in its own transaction: commit or roll back first")
    autocommit = conn.autocommit
    conn.autocommit = False
    results: list[SmokeResult] = []
    try:
        specs = {spec.table: spec for spec in read_schema(conn, plan)}
        with conn.cursor() as cur:
            loader = Loader(cur, seed=0, plan=plan, rows=0, deferred=set())
            for table in plan.tables:
                spec = specs[table]
                keys = [key.column for key in plan.columns if key.table == table]
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
                (existing,) = cur.fetchone() or (0,)
                row = loader.candidate(spec, start=10 * existing + 100, required=keys)
                for binding in BINDINGS:
                    cur.execute("SAVEPOINT migration_smoke")
                    results += _Writes(cur, spec, row, keys, plan).run(binding)
                    cur.execute("ROLLBACK TO SAVEPOINT migration_smoke")
    finally:
        conn.rollback()
        conn.autocommit = autocommit
    return results


@dataclass
class _Writes:
    """The three writes of one row in one table, for one binding."""

    cur: Cursor
    spec: TableSpec
    row: dict[str, str | None] | None
    keys: list[str]
    plan: Plan

    def run(self, binding: Binding) -> list[SmokeResult]:
        table = str(self.spec.table)
        if self.row is None:
            return [SmokeResult(table, op, binding, ok=False,
                                error="not tried: no generated row meets the table's constraints")
                    for op in OPERATIONS]
        row = self.row
        inserted = self._try(table, "insert", binding, self._insert(binding), self._values(row))
        results = [inserted[0]]
        tid = inserted[1]
        if tid is None:  # the update and delete still need a row: the untyped INSERT's
            tid = self._try(table, "insert", "unknown", self._insert("unknown"),
                            self._values(row))[1]
        if tid is None:  # an existing row is updated to what it holds; none is deleted
            return [*results, *self._update_existing(table, binding),
                    SmokeResult(table, "delete", binding, ok=False,
                                error="not tried: no row of its own (the INSERT failed)")]
        moved = {key: self._new_key(key, row[key]) for key in self.keys}
        updated = self._try(table, "update", binding, self._update(binding),
                            [*moved.values(), tid, *(row[key] for key in self.keys)])
        results.append(updated[0])
        if updated[1] is not None:
            tid, row = updated[1], {**row, **moved}
        deleted = self._try(table, "delete", binding, self._delete(binding),
                            [tid, *(row[key] for key in self.keys)])
        return [*results, deleted[0]]

    def _update_existing(self, table: str, binding: Binding) -> list[SmokeResult]:
        """The UPDATE on a row already there, its keys set to the values they hold (so no
        foreign key acts): the INSERT failed, and the UPDATE may fail on its own."""
        self.cur.execute(sql.SQL("SELECT ctid, {} FROM {} WHERE {} ORDER BY ctid LIMIT 1").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in self.keys),
            self.spec.table.ident, sql.SQL(" AND ").join(
                sql.SQL("{} IS NOT NULL").format(sql.Identifier(k)) for k in self.keys)))
        found = self.cur.fetchone()
        if found is None:
            return [SmokeResult(table, "update", binding, ok=False,
                                error="not tried: the INSERT failed and the table has no row")]
        tid, *keys = found
        return [self._try(table, "update", binding, self._update(binding),
                          [*keys, tid, *keys])[0]]

    def _try(self, table: str, operation: Operation, binding: Binding,
             statement: sql.Composable, params: list[object]) -> tuple[SmokeResult, str | None]:
        """The statement in a savepoint: its result, and the ctid of the row it returned."""
        self.cur.execute("SAVEPOINT migration_smoke_write")
        try:
            self.cur.execute(statement, params)
        except psycopg2.Error as exc:
            self.cur.execute("ROLLBACK TO SAVEPOINT migration_smoke_write")
            return SmokeResult(table, operation, binding, ok=False, error=_message(exc),
                               sqlstate=exc.pgcode), None
        found = self.cur.fetchone()
        self.cur.execute("RELEASE SAVEPOINT migration_smoke_write")
        if found is None:
            return SmokeResult(table, operation, binding, ok=False,
                               error="the row written just before was not found"), None
        return SmokeResult(table, operation, binding, ok=True, error=None), str(found[0])

    def _bound(self, column: str, binding: Binding) -> sql.Composable:
        """A parameter: a key as the application binds it, any other value cast to its type."""
        if column in self.keys:
            return sql.SQL("%s" if binding == "unknown" else "%s::varchar")
        return sql.SQL("%s::" + self.spec.column(column).type.staging)

    def _values(self, row: dict[str, str | None]) -> list[object]:
        return list(row.values())

    def _insert(self, binding: Binding) -> sql.Composable:
        assert self.row is not None
        return sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING ctid").format(
            self.spec.table.ident, sql.SQL(", ").join(map(sql.Identifier, self.row)),
            sql.SQL(", ").join(self._bound(c, binding) for c in self.row))

    def _update(self, binding: Binding) -> sql.Composable:
        other = [c.name for c in self.spec.columns if c.name not in self.keys][:1]
        assignments = [sql.SQL("{0} = {0}").format(sql.Identifier(c)) for c in other]
        assignments += [sql.SQL("{} = {}").format(sql.Identifier(key), self._bound(key, binding))
                        for key in self.keys]
        return sql.SQL("UPDATE {} SET {} WHERE {} RETURNING ctid").format(
            self.spec.table.ident, sql.SQL(", ").join(assignments), self._where(binding))

    def _delete(self, binding: Binding) -> sql.Composable:
        return sql.SQL("DELETE FROM {} WHERE {} RETURNING ctid").format(
            self.spec.table.ident, self._where(binding))

    def _where(self, binding: Binding) -> sql.Composable:
        """The row by its ctid, and by its keys as the application names them."""
        return sql.SQL(" AND ").join([sql.SQL("ctid = %s::tid"), *(
            sql.SQL("{} = {}").format(sql.Identifier(key), self._bound(key, binding))
            for key in self.keys)])

    def _new_key(self, key: str, value: str | None) -> str | None:
        """The parent key moves to a new UUID (the new row has no children); a child key
        keeps naming the parent it names."""
        parent = self.plan.parent
        if self.spec.table == parent.table and key == parent.column and value is not None:
            return str(uuid.uuid5(uuid.NAMESPACE_OID, value))
        return value


def _message(exc: psycopg2.Error) -> str:
    """The server's message, with the first line of its context (which names the trigger
    function or the statement in it that failed)."""
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.context:
        message += f" ({diag.context.splitlines()[0]})"
    return message
