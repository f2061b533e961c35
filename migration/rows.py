"""Queries over the rows of key columns, shared by the pre-flight, the checks and the
rollback's quarantine: how to read a column as uuid, which rows are orphans, and the
offending rows to name in a finding."""

from __future__ import annotations

from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog
from migration.catalog import ColumnState
from migration.model import KeyColumn
from migration.report import SAMPLE_LIMIT
from migration.sqlexpr import UuidReader, column_list, reader


def samples_query(
    cur: Cursor, key: KeyColumn, pk: list[str], where: sql.Composable
) -> tuple[int, list[dict[str, Any]]]:
    """Count the rows matching ``where`` and return up to 20 of them by ``pk`` (the
    walk key: a ``ctid`` names a row of a table with no unique key, for now).

    A bare count is what clean data needs, and the planner can run it in
    parallel and from an index alone.  Only when it finds rows are they
    gathered, by one scan (a materialized CTE): asked for in key order
    directly, the planner may walk the whole primary key index and fetch
    every row in random order to find a few.
    """
    cur.execute(sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(key.table.ident, where))
    count = int((cur.fetchone() or [0])[0])
    if not count:
        return 0, []
    keys = [f"k{i}" for i in range(len(pk))]  # the key column may be part of the pk
    cur.execute(
        sql.SQL("WITH m ({keys}, v) AS MATERIALIZED ("
                "SELECT {pk}, {col} FROM {table} t WHERE {where}) "
                "SELECT {keys}, v FROM m ORDER BY {keys} LIMIT %s").format(
            keys=column_list(keys), pk=column_list(pk, "t"),
            col=sql.Identifier("t", key.column), table=key.table.ident, where=where),
        (SAMPLE_LIMIT,),
    )
    samples = [{"table": str(key.table), **dict(zip(pk, row[:-1], strict=True)),
                key.column: row[-1]} for row in cur.fetchall()]
    return count, samples


def key_reader(cur: Cursor, key: KeyColumn) -> UuidReader:
    """How to read a key column as uuid, whatever stage it is in: a ``char(n)`` column as
    the migration's cast reads it, with its padding."""
    if catalog.column_state(cur.connection, key) is ColumnState.UUID:
        return UuidReader(cur.connection, every_value_casts=True, string=False)
    info = catalog.column_info(cur.connection, key.table, key.column)
    padded = info is not None and info.type.split("(")[0] == "character"
    return reader(cur, key.table.ident, key.column, padded=padded)


def orphan_condition(cur: Cursor, key: KeyColumn, parent: KeyColumn,
                     readers: tuple[UuidReader, UuidReader] | None = None) -> sql.Composable:
    """Rows of ``key.table`` (alias t) whose valid UUID matches no parent row.

    ``readers`` (child's, parent's) saves probing the columns again.  When
    both columns hold only canonical strings they are compared as strings,
    byte for byte: the same answer without a cast of every row on each side
    (1.5 s instead of 5.7 s for 3M rows against 1M).
    """
    child_reader, parent_reader = readers or (key_reader(cur, key), key_reader(cur, parent))
    col, pcol = sql.Identifier("t", key.column), sql.Identifier("p", parent.column)
    match = (sql.SQL('{} COLLATE "C" = {}').format(pcol, col)
             if child_reader.canonical_strings and parent_reader.canonical_strings
             else sql.SQL("{} = {}").format(parent_reader.cast(pcol), child_reader.cast(col)))
    return sql.SQL("{valid} AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {match})").format(
        valid=child_reader.valid(col), parent=parent.table.ident, match=match)
