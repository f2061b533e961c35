"""The two reference methods the engine is measured against.

- ``one_shot``: what a DBA would type during a maintenance window: one transaction
  that drops the foreign keys referencing the parent key, converts every key column
  with ``ALTER TABLE ... ALTER COLUMN ... TYPE uuid USING ...::uuid`` (one rewrite per
  table), and adds the foreign keys back.  The physical-limit reference: nothing can
  move the rows with less work, and the tables are locked for all of it.
- ``naive_loop``: THE RUNBOOK READ LITERALLY, not the engine.  Per column: add
  ``c_uuid``; fill it in keyset batches of 1000 rows along the primary key, a commit
  per batch; then one swap transaction that drops the old column (and with it the
  primary key, indexes and foreign keys), renames, ``SET NOT NULL`` (a scan), and
  recreates indexes, constraints and foreign keys (builds and validating scans), all
  under the swap's ACCESS EXCLUSIVE lock.

Each is a function of an owner DSN (the test suite calls them in-process); the
benchmark runs each in its own process, ``python -m bench.methods NAME`` with
``DATABASE_URL`` set, so that the peak memory measured is that method's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog
from migration.connection import Connection, connect
from migration.engine import fill
from migration.model import KeyColumn, Table
from migration.plan import build_plan

RUNBOOK_BATCH = 1000


def _open(dsn: str) -> Connection:
    conn = connect(dsn)
    with conn, conn.cursor() as cur:
        # Deparsed definitions come out schema-qualified, as the engine replays them.
        cur.execute("SET search_path = pg_catalog, pg_temp")
    return conn


def _by_table(keys: tuple[KeyColumn, ...]) -> dict[Table, list[KeyColumn]]:
    grouped: dict[Table, list[KeyColumn]] = {}
    for key in keys:
        grouped.setdefault(key.table, []).append(key)
    return grouped


def one_shot(dsn: str) -> int:
    """The one-transaction ``ALTER COLUMN ... TYPE uuid``; rows in the converted tables."""
    conn = _open(dsn)
    try:
        plan = build_plan(conn)
        referencing = catalog.foreign_keys_to(conn, plan.parent)
        infos = {key: catalog.column_info(conn, key.table, key.column) for key in plan.columns}
        defaults = {key: info.default if info else None for key, info in infos.items()}
        rows = 0
        with conn, conn.cursor() as cur:
            for fk in referencing:
                cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    fk.table.ident, sql.Identifier(fk.name)))
            for table, keys in _by_table(plan.columns).items():
                actions = []
                for key in keys:
                    column = sql.Identifier(key.column)
                    if defaults[key] is not None:
                        actions.append(sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(column))
                    actions.append(sql.SQL("ALTER COLUMN {c} TYPE uuid USING ({c})::uuid")
                                   .format(c=column))
                cur.execute(sql.SQL("ALTER TABLE {} {}").format(
                    table.ident, sql.SQL(", ").join(actions)))
                for key in keys:
                    if defaults[key] is not None:
                        fill.converted_default(cur, key, defaults[key] or "")
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
                rows += int((cur.fetchone() or [0])[0])
            for fk in referencing:  # validated in the same statement, as typed by hand
                cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    fk.table.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))
        return rows
    finally:
        conn.close()


def naive_loop(dsn: str, batch_size: int = RUNBOOK_BATCH) -> int:
    """The runbook's steps 3 and 4 read literally; rows filled."""
    conn = _open(dsn)
    try:
        plan = build_plan(conn)
        # The parent's swap drops the FKs that point at it; each comes back with its child.
        pending_fks = {(fk.table, fk.column): fk
                       for fk in catalog.foreign_keys_to(conn, plan.parent)}
        rows = 0
        for key in plan.columns:
            rows += _fill_literally(conn, key, batch_size)
            _swap_literally(conn, key, plan.parent, pending_fks)
        return rows
    finally:
        conn.close()


def _fill_literally(conn: Connection, key: KeyColumn, batch_size: int) -> int:
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} uuid").format(
            key.table.ident, sql.Identifier(key.temp)))
    (pk,) = catalog.primary_key(conn, key.table)  # the runbook's tables have an id key
    table, column, temp = key.table.ident, sql.Identifier(key.column), sql.Identifier(key.temp)
    first = sql.SQL("SELECT {pk} FROM {t} ORDER BY {pk} LIMIT %(n)s")
    after = sql.SQL("SELECT {pk} FROM {t} WHERE {pk} > %(last)s ORDER BY {pk} LIMIT %(n)s")
    batch = sql.SQL(
        "WITH b AS ({select}), u AS (UPDATE {t} x SET {temp} = (x.{c})::uuid FROM b "
        "WHERE x.{pk} = b.{pk} RETURNING x.{pk}) SELECT count(*), max({pk}) FROM u")
    statements = {
        is_first: batch.format(select=(first if is_first else after).format(
            pk=sql.Identifier(pk), t=table), t=table, temp=temp, c=column,
            pk=sql.Identifier(pk))
        for is_first in (True, False)}
    last, done = None, 0
    while True:
        with conn, conn.cursor() as cur:  # a commit per batch
            cur.execute(statements[last is None], {"n": batch_size, "last": last})
            count, last_key = cur.fetchone() or (0, None)
        if not count:
            return done
        done += int(count)
        last = last_key


def _swap_literally(conn: Connection, key: KeyColumn, parent: KeyColumn,
                    pending_fks: dict[tuple[Table, str], catalog.ForeignKeyDef]) -> None:
    info = catalog.column_info(conn, key.table, key.column)
    assert info is not None
    indexes = catalog.indexes_on(conn, key)
    outgoing = [pending_fks.pop((key.table, key.column))] \
        if key != parent and (key.table, key.column) in pending_fks else []
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(key.table.ident))
        if key == parent:
            for fk in catalog.foreign_keys_to(conn, key):
                cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    fk.table.ident, sql.Identifier(fk.name)))
        cur.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
            key.table.ident, sql.Identifier(key.column)))
        cur.execute(sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            key.table.ident, sql.Identifier(key.temp), sql.Identifier(key.column)))
        if info.not_null:
            cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                key.table.ident, sql.Identifier(key.column)))
        if info.default is not None:
            fill.converted_default(cur, key, info.default)
        for index in indexes:
            _restore_index(cur, index)
        for fk in outgoing:
            cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                fk.table.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))


def _restore_index(cur: Cursor, index: catalog.IndexDef) -> None:
    """Build an index again (and the constraint it backs) from the server's own text of it,
    read before the column was dropped: the one-shot method builds under its lock."""
    table = catalog.regclass(index.table)
    cur.execute("SET LOCAL statement_timeout = 0")  # an index build as long as the table
    cur.execute("SELECT 1 FROM pg_class WHERE relname = %s AND relnamespace = "
                "(SELECT relnamespace FROM pg_class WHERE oid = to_regclass(%s))",
                (index.name, table))
    if cur.fetchone() is None:
        cur.execute(sql.SQL(index.definition))  # as pg_get_indexdef printed it
    if index.constraint_type and catalog.constraint_validity(
            cur.connection, index.table, index.name) is None:
        kind = sql.SQL("PRIMARY KEY" if index.constraint_type == "p" else "UNIQUE")
        timing = sql.SQL("")
        if index.deferrable:
            timing = sql.SQL(" DEFERRABLE INITIALLY DEFERRED" if index.deferred
                             else " DEFERRABLE INITIALLY IMMEDIATE")
        cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}{}").format(
            index.table.ident, sql.Identifier(index.name), kind, sql.Identifier(index.name),
            timing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=("one_shot", "naive_loop"))
    parser.add_argument("--batch-size", type=int, default=RUNBOOK_BATCH)
    args = parser.parse_args(argv)
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        parser.error("set DATABASE_URL to the owner DSN of the database")
    rows = one_shot(dsn) if args.method == "one_shot" else naive_loop(dsn, args.batch_size)
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
