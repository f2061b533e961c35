"""Catalog inspection: what the database looks like now, read from pg_catalog.

Every function here only reads.  Definitions come from the server's own
deparsers (``pg_get_indexdef``, ``pg_get_constraintdef``, ``pg_get_expr``),
which is how pg_dump reproduces objects exactly.  The engine's session runs
with ``search_path = pg_catalog`` so these texts are fully schema-qualified
and mean the same thing whenever they are replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from psycopg2 import sql

from migration.connection import Connection
from migration.model import KeyColumn, Table


class ColumnState(StrEnum):
    MISSING = "missing"
    STRING = "string"
    BACKFILLING = "backfilling"  # string column with its temporary uuid column beside it
    UUID = "uuid"
    OTHER = "other"


@dataclass(frozen=True)
class ColumnInfo:
    type: str
    is_string: bool
    not_null: bool
    default: str | None


@dataclass(frozen=True)
class IndexDef:
    """An index that involves a key column, as the server prints it."""

    table: Table
    name: str
    definition: str
    constraint_type: str | None  # 'p' or 'u' when the index backs a constraint
    deferrable: bool
    deferred: bool
    uses_expression: bool  # the key column appears inside an expression


@dataclass(frozen=True)
class ForeignKeyDef:
    table: Table  # the referencing table
    column: str
    name: str
    definition: str
    validated: bool


def regclass(table: Table) -> str:
    """A table name as to_regclass() parses it: both parts quoted as identifiers."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (table.schema, table.name))


def column_info(conn: Connection, table: Table, column: str) -> ColumnInfo | None:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT format_type(a.atttypid, a.atttypmod), t.typcategory = 'S', a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attribute a
            JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
              AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (regclass(table), column),
        )
        row = cur.fetchone()
    return None if row is None else ColumnInfo(*row)


@dataclass(frozen=True)
class ColumnGrant:
    """A column-level privilege (``GRANT SELECT (id) ON users TO reporting``)."""

    grantee: str | None  # None: PUBLIC
    privilege: str
    grantable: bool


def column_grants(conn: Connection, table: Table, column: str) -> list[ColumnGrant]:
    """Privileges granted on the column itself: dropping the column drops them."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT CASE WHEN g.grantee = 0 THEN NULL ELSE pg_get_userbyid(g.grantee) END,
                   g.privilege_type, g.is_grantable
            FROM pg_attribute a CROSS JOIN LATERAL aclexplode(a.attacl) g
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
            ORDER BY 1, 2
            """,
            (regclass(table), column),
        )
        return [ColumnGrant(*row) for row in cur.fetchall()]


def column_state(conn: Connection, key: KeyColumn) -> ColumnState:
    info = column_info(conn, key.table, key.column)
    if info is None:
        return ColumnState.MISSING
    if info.type == "uuid":
        return ColumnState.UUID
    if not info.is_string:
        return ColumnState.OTHER
    if column_info(conn, key.table, key.temp) is not None:
        return ColumnState.BACKFILLING
    return ColumnState.STRING


def primary_key(conn: Connection, table: Table) -> list[str]:
    """The primary key's columns in key order; empty when there is none."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT a.attname
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(%s) AND i.indisprimary
            ORDER BY k.pos
            """,
            (regclass(table),),
        )
        return [name for (name,) in cur.fetchall()]


def indexes_on(conn: Connection, key: KeyColumn) -> list[IndexDef]:
    """Indexes that use the column: as a key, an INCLUDE column, in an expression or predicate."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT ic.relname, pg_get_indexdef(i.indexrelid), k.contype,
                   coalesce(k.condeferrable, false), coalesce(k.condeferred, false),
                   NOT (a.attnum = ANY (i.indkey))
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = %s
            LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid
                 AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u')
            WHERE i.indrelid = to_regclass(%s)
              AND (a.attnum = ANY (i.indkey) OR EXISTS (
                    SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                      AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum))
            ORDER BY ic.relname
            """,
            (key.column, regclass(key.table)),
        )
        rows = cur.fetchall()
    return [IndexDef(key.table, name, definition, contype, deferrable, deferred, expr)
            for name, definition, contype, deferrable, deferred, expr in rows]


def foreign_keys_from(conn: Connection, key: KeyColumn) -> list[ForeignKeyDef]:
    """FK constraints whose referencing columns include the column."""
    return _foreign_keys(conn, key, "conrelid", "conkey")


def foreign_keys_to(conn: Connection, key: KeyColumn) -> list[ForeignKeyDef]:
    """FK constraints, in any table, that reference the column."""
    return _foreign_keys(conn, key, "confrelid", "confkey")


def _foreign_keys(conn: Connection, key: KeyColumn, rel: str, cols: str) -> list[ForeignKeyDef]:
    query = f"""
        SELECT n.nspname, c.relname, a.attname, k.conname,
               pg_get_constraintdef(k.oid), k.convalidated
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
        JOIN pg_attribute ka ON ka.attrelid = k.{rel} AND ka.attnum = ANY (k.{cols})
        WHERE k.contype = 'f' AND k.{rel} = to_regclass(%s) AND ka.attname = %s
        ORDER BY n.nspname, c.relname, k.conname
    """  # rel/cols are one of two fixed catalog column pairs chosen above, never input
    with conn.cursor() as cur:
        cur.execute(query, (regclass(key.table), key.column))
        rows = cur.fetchall()
    return [ForeignKeyDef(Table(s, t), col, name, definition, valid)
            for s, t, col, name, definition, valid in rows]


def blockers(conn: Connection, key: KeyColumn) -> list[str]:
    """Objects that depend on the column and that the swap cannot carry over.

    Views and rules, triggers, policies, CHECK and exclusion constraints and
    generated columns that mention the column would make ``DROP COLUMN`` fail
    or silently change meaning; they must be dealt with by a person first.
    The engine's own sync trigger and fill proof are not counted.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            WITH col AS (
                SELECT a.attrelid, a.attnum FROM pg_attribute a
                WHERE a.attrelid = to_regclass(%(table)s) AND a.attname = %(column)s
            )
            SELECT DISTINCT CASE d.classid
                WHEN 'pg_rewrite'::regclass THEN
                    'view or rule ' || (SELECT ev_class::regclass::text FROM pg_rewrite
                                        WHERE oid = d.objid)
                WHEN 'pg_trigger'::regclass THEN
                    'trigger ' || (SELECT tgname FROM pg_trigger WHERE oid = d.objid)
                WHEN 'pg_policy'::regclass THEN
                    'policy ' || (SELECT polname FROM pg_policy WHERE oid = d.objid)
                WHEN 'pg_constraint'::regclass THEN
                    'constraint ' || (SELECT conname FROM pg_constraint WHERE oid = d.objid)
                WHEN 'pg_statistic_ext'::regclass THEN
                    'statistics ' || (SELECT stxname FROM pg_statistic_ext WHERE oid = d.objid)
                WHEN 'pg_class'::regclass THEN
                    CASE WHEN d.objid = col.attrelid THEN 'generated column'
                         ELSE 'object ' || d.objid::regclass::text END
                END
            FROM col
            JOIN pg_depend d ON d.refobjid = col.attrelid AND d.refobjsubid = col.attnum
            WHERE d.deptype IN ('n', 'a')
              AND NOT (d.classid = 'pg_class'::regclass
                       AND d.objid IN (SELECT indexrelid FROM pg_index
                                       WHERE indrelid = col.attrelid))
              AND NOT (d.classid = 'pg_attrdef'::regclass)
              AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid IN (
                    SELECT oid FROM pg_constraint WHERE contype IN ('p', 'u', 'f', 'n')))
              AND NOT (d.classid = 'pg_trigger'::regclass AND d.objid IN (
                    SELECT oid FROM pg_trigger WHERE tgname = %(sync)s))
              AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid IN (
                    SELECT oid FROM pg_constraint WHERE conrelid = col.attrelid
                    AND contype = 'c' AND conname = %(filled)s))
            ORDER BY 1
            """,
            {"table": regclass(key.table), "column": key.column, "sync": key.helper("sync"),
             "filled": key.helper("filled")},
        )
        found = [text for (text,) in cur.fetchall()]
    found += [f"expression index {ix.name}" for ix in indexes_on(conn, key) if ix.uses_expression]
    return found


def relation_bytes(conn: Connection, table: Table) -> tuple[int, int]:
    """(heap bytes, index bytes) of a table."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_table_size(to_regclass(%s)), pg_indexes_size(to_regclass(%s))",
            (regclass(table), regclass(table)),
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1] or 0)


def relation_exists(conn: Connection, relation: sql.Composable) -> bool:
    """Whether ``relation`` (a name built with psycopg2.sql) names a table or view now."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (relation.as_string(conn),))
        row = cur.fetchone()
    return bool(row and row[0])


def table_exists(conn: Connection, table: Table) -> bool:
    return relation_exists(conn, table.ident)


def server_version(conn: Connection) -> int:
    return int(conn.server_version)


def estimated_rows(conn: Connection, table: Table) -> int:
    """The planner's row estimate (pg_class.reltuples): free, for progress and ordering.

    A table never analyzed has none (reltuples -1, or 0 on no pages before
    PostgreSQL 14), as right after pg_restore: it is counted instead.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT CASE WHEN reltuples < 0 OR (relpages = 0 AND reltuples <= 0) "
                    "THEN NULL ELSE reltuples::bigint END FROM pg_class "
                    "WHERE oid = to_regclass(%s)", (regclass(table),))
        row = cur.fetchone()
        if row is None:
            return 0
        if row[0] is not None:
            return int(row[0])
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
        return int((cur.fetchone() or [0])[0])
