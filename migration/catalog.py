"""Catalog inspection: what the database looks like now, read from pg_catalog.

Every function here only reads.  Definitions come from the server's own
deparsers (``pg_get_indexdef``, ``pg_get_constraintdef``, ``pg_get_expr``),
which is how pg_dump reproduces objects exactly.  The engine's session runs
with ``search_path = pg_catalog`` so these texts are fully schema-qualified
and mean the same thing whenever they are replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import psycopg2.errors
from psycopg2 import sql

from migration import sqlexpr
from migration.connection import Connection
from migration.model import BACKUP_SCHEMA, BACKUP_SCHEMA_LIKE, KeyColumn, Table


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
    tablespace: str | None = None  # None: the database's default (pg_get_indexdef omits it)


@dataclass(frozen=True)
class ForeignKeyDef:
    table: Table  # the referencing table
    column: str
    name: str
    definition: str
    validated: bool


T = TypeVar("T")


def _value(conn: Connection, kind: Callable[[Any], T], query: str,
           params: tuple[object, ...]) -> T | None:
    """The first column of the one row a catalog query returns, as ``kind``; None when
    there is no row."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    return None if row is None else kind(row[0])


def regclass(table: Table) -> str:
    """A table name as to_regclass() parses it: both parts quoted as identifiers."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (table.schema, table.name))


def marked_copies(conn: Connection, key: KeyColumn) -> set[str]:
    """The columns of the key's table that the engine created as copies of ``key`` (they
    bear its mark), whichever names they were given, both ways."""
    with conn.cursor() as cur:
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                    "AND attnum > 0 AND NOT attisdropped "
                    "AND col_description(attrelid, attnum) = %s",
                    (regclass(key.table), key.mark))
        return {str(name) for (name,) in cur.fetchall()}


def is_engines(conn: Connection, key: KeyColumn) -> bool:
    """Whether the table has a temporary column of ``key`` that the engine created (it
    bears the engine's mark); False when there is none, or when it is the application's."""
    return key.temp in marked_copies(conn, key)


def names_taken(conn: Connection, key: KeyColumn) -> list[str]:
    """The application's objects on the key's table that bear a name the engine would
    create for ``key`` (its temporary column, sync trigger, fill proofs), as "kind name".

    The engine's temporary column bears its mark; the trigger and the proofs
    are only ever created with it, so beside a marked column none is taken.
    """
    if is_engines(conn, key):
        return []
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT 'column ' || attname FROM pg_attribute
            WHERE attrelid = to_regclass(%(t)s) AND attname = %(temp)s AND NOT attisdropped
            UNION ALL
            SELECT 'trigger ' || tgname FROM pg_trigger
            WHERE tgrelid = to_regclass(%(t)s) AND tgname = %(sync)s
            UNION ALL
            SELECT 'constraint ' || conname FROM pg_constraint
            WHERE conrelid = to_regclass(%(t)s) AND conname IN (%(filled)s, %(not_null)s)
            """,
            {"t": regclass(key.table), "temp": key.temp, "sync": key.helper("sync"),
             "filled": key.helper("filled"), "not_null": key.helper("not_null")})
        return [text for (text,) in cur.fetchall()]


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
class ColumnTuning:
    """What a DBA set on a column for the planner, which a new column does not have."""

    statistics_target: int | None  # ALTER COLUMN ... SET STATISTICS; None: the default
    options: tuple[str, ...]  # attoptions: n_distinct=-0.5, ...


COLUMN_OPTIONS = ("n_distinct", "n_distinct_inherited")
"""The options ``ALTER COLUMN ... SET (...)`` takes; a server may keep others of its own
in attoptions (one seen here stamps every column with ``pg_attver``), not for copying."""


def column_tuning(conn: Connection, table: Table, column: str) -> ColumnTuning:
    with conn.cursor() as cur:
        cur.execute("SELECT nullif(attstattarget, -1), ARRAY(SELECT o FROM unnest(attoptions) o "
                    "WHERE split_part(o, '=', 1) = ANY (%s)) "
                    "FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s",
                    (list(COLUMN_OPTIONS), regclass(table), column))
        row = cur.fetchone()
    return ColumnTuning(None, ()) if row is None else ColumnTuning(row[0], tuple(row[1]))


def clustered_index(conn: Connection, table: Table) -> str | None:
    """The index ``CLUSTER`` last used (``ALTER TABLE ... CLUSTER ON``), if any."""
    return _value(conn, str, "SELECT c.relname FROM pg_index i JOIN pg_class c "
                             "ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) "
                             "AND i.indisclustered", (regclass(table),))


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


PAGES = "ctid"
"""The walk key of a table with no unique key over NOT NULL columns, and the walk of
every new fill of a plain table (``fill.fill_walk``): its physical pages, walked in
ranges of ``ctid`` (no user column can be named ``ctid``)."""


def walk_key(conn: Connection, table: Table) -> list[str]:
    """The columns that name each of the table's rows, in index order, by which the
    pre-flight names rows, the rollback finds them in the backup, and a fill walks a
    partitioned table: the primary key; else the unique index with the fewest columns
    that is valid, immediate, not partial, without expressions, over NOT NULL columns
    only (so that it names each row once); else ``[PAGES]``."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT array_agg(a.attname ORDER BY k.pos)
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            CROSS JOIN LATERAL unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY k(attnum, pos)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indisvalid
              AND i.indimmediate AND i.indexprs IS NULL AND i.indpred IS NULL
            GROUP BY i.indexrelid, i.indisprimary, i.indnkeyatts, ic.relname
            HAVING bool_and(a.attnotnull)
            ORDER BY i.indisprimary DESC, i.indnkeyatts, ic.relname
            LIMIT 1
            """,
            (regclass(table),),
        )
        row = cur.fetchone()
    return list(row[0]) if row else [PAGES]


def heap_pages(conn: Connection, table: Table) -> int:
    """The table's size in pages now (exact and free, unlike ``relpages``, which is
    only as recent as the last VACUUM or ANALYZE)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {}").format(heap_pages_expression(table)))
        row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def heap_pages_expression(table: Table) -> sql.Composable:
    """``heap_pages`` as an expression, for a statement that must read it when it runs."""
    return sql.SQL("pg_relation_size(to_regclass({})) / current_setting('block_size')::bigint"
                   ).format(sql.Literal(regclass(table)))


def indexes_on(conn: Connection, key: KeyColumn) -> list[IndexDef]:
    """Indexes that use the column: as a key, an INCLUDE column, in an expression or predicate
    (the engine's own ``KeyColumn.invalid_index`` left out: it is not carried)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT ic.relname, pg_get_indexdef(i.indexrelid), k.contype,
                   coalesce(k.condeferrable, false), coalesce(k.condeferred, false),
                   NOT (a.attnum = ANY (i.indkey)),
                   (SELECT spcname FROM pg_tablespace WHERE oid = ic.reltablespace)
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = %s
            LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid
                 AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u')
            WHERE i.indrelid = to_regclass(%s) AND ic.relname <> %s
              AND (a.attnum = ANY (i.indkey) OR EXISTS (
                    SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                      AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum))
            ORDER BY ic.relname
            """,
            (key.column, regclass(key.table), key.invalid_index),
        )
        rows = cur.fetchall()
    return [IndexDef(key.table, name, definition, contype, deferrable, deferred, expr, space)
            for name, definition, contype, deferrable, deferred, expr, space in rows]


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
        JOIN pg_attribute ka ON ka.attrelid = k.{rel} AND ka.attnum = ANY (k.{cols})
        JOIN pg_attribute a ON a.attrelid = k.conrelid  -- the column paired with the key's
             AND a.attnum = k.conkey[array_position(k.{cols}, ka.attnum)]
        WHERE k.contype = 'f' AND k.{rel} = to_regclass(%s) AND ka.attname = %s
          AND k.conparentid = 0  -- a partition's clone of its table's FK is not one of its own
        ORDER BY n.nspname, c.relname, k.conname
    """  # rel/cols are one of two fixed catalog column pairs chosen above, never input
    with conn.cursor() as cur:
        cur.execute(query, (regclass(key.table), key.column))
        rows = cur.fetchall()
    return [ForeignKeyDef(Table(s, t), col, name, definition, valid)
            for s, t, col, name, definition, valid in rows]


@dataclass(frozen=True)
class ForeignKeyLink:
    """A foreign key with a key column among its columns, on either side."""

    name: str
    table: Table  # the referencing table
    columns: tuple[str, ...]
    referenced: Table
    referenced_columns: tuple[str, ...]  # paired with ``columns``, in order
    referenced_types: tuple[str, ...]  # format_type of each referenced column

    def __str__(self) -> str:
        return (f"foreign key {self.name} on {self.table} ({', '.join(self.columns)}) "
                f"references {self.referenced} ({', '.join(self.referenced_columns)})")


def foreign_keys_on(conn: Connection, key: KeyColumn) -> list[ForeignKeyLink]:
    """Every foreign key whose referencing or referenced columns include the column, in
    any table (a partition's clone of its table's FK is not one of its own)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT k.conname, n.nspname, c.relname,
                   ARRAY(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY x(n, i)
                         JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = x.n
                         ORDER BY x.i),
                   rn.nspname, r.relname,
                   ARRAY(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY x(n, i)
                         JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = x.n
                         ORDER BY x.i),
                   ARRAY(SELECT format_type(a.atttypid, a.atttypmod)
                         FROM unnest(k.confkey) WITH ORDINALITY x(n, i)
                         JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = x.n
                         ORDER BY x.i)
            FROM pg_attribute col
            JOIN pg_constraint k ON k.contype = 'f' AND k.conparentid = 0
                 AND ((k.conrelid = col.attrelid AND col.attnum = ANY (k.conkey))
                      OR (k.confrelid = col.attrelid AND col.attnum = ANY (k.confkey)))
            JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_class r ON r.oid = k.confrelid
            JOIN pg_namespace rn ON rn.oid = r.relnamespace
            WHERE col.attrelid = to_regclass(%s) AND col.attname = %s
            ORDER BY 2, 3, 1
            """, (regclass(key.table), key.column))
        return [ForeignKeyLink(name, Table(schema, table), tuple(columns),
                               Table(ref_schema, ref_table), tuple(ref_columns), tuple(types))
                for name, schema, table, columns, ref_schema, ref_table, ref_columns, types
                in cur.fetchall()]


@dataclass(frozen=True)
class Blocker:
    """An object that depends on a key column and that the swap cannot carry over."""

    what: str  # "policy own_rows", "view public.v", ...
    reason: str = ""  # why, when it is not just its kind: "would not compile ..."
    hint: str = ("drop it before the migration and recreate it for the uuid column after")


@dataclass(frozen=True)
class PublishedTable:
    """A table in a publication whose column list or row filter (PostgreSQL 15+) uses
    a key column: dropping the column would take it out of the publication."""

    publication: str
    table: Table
    columns: tuple[str, ...] | None  # None: all columns
    row_filter: str | None
    owner: str
    may_alter: bool  # this role is a member of the publication's owner


def publications_on(conn: Connection, key: KeyColumn) -> list[PublishedTable]:
    """The publications whose column list or row filter of the key's table uses the column."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT p.pubname::text,
                   CASE WHEN r.prattrs IS NULL THEN NULL ELSE ARRAY(
                       SELECT c.attname::text FROM unnest(r.prattrs) k(attnum)
                       JOIN pg_attribute c ON c.attrelid = r.prrelid AND c.attnum = k.attnum
                       ORDER BY c.attnum) END,
                   pg_get_expr(r.prqual, r.prrelid), pg_get_userbyid(p.pubowner),
                   pg_has_role(p.pubowner, 'MEMBER')
            FROM pg_attribute a
            JOIN pg_depend d ON d.classid = 'pg_publication_rel'::regclass
                 AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
            JOIN pg_publication_rel r ON r.oid = d.objid
            JOIN pg_publication p ON p.oid = r.prpubid
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
            ORDER BY 1
            """, (regclass(key.table), key.column))
        return [PublishedTable(name, key.table, None if columns is None else tuple(columns),
                               *rest) for name, columns, *rest in cur.fetchall()]


@dataclass(frozen=True)
class StatisticsDef:
    """An extended statistics object (``CREATE STATISTICS``) over a key column."""

    table: Table
    schema: str
    name: str
    definition: str  # pg_get_statisticsobjdef: CREATE STATISTICS ... ON ... FROM ...
    expressions: str | None  # its expressions (PostgreSQL 14+), comma-separated
    target: int | None  # ALTER STATISTICS ... SET STATISTICS; None: the default
    owner: str
    comment: str | None


def statistics_on(conn: Connection, key: KeyColumn) -> list[StatisticsDef]:
    """The statistics objects of the key's table that cover the column or use it in an
    expression (``DROP COLUMN`` would drop them, or narrow them to the other columns)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT n.nspname, s.stxname, pg_get_statisticsobjdef(s.oid),
                   array_to_string(pg_get_statisticsobjdef_expressions(s.oid), ', '),
                   nullif(s.stxstattarget, -1), pg_get_userbyid(s.stxowner),
                   obj_description(s.oid, 'pg_statistic_ext')
            FROM pg_attribute a
            JOIN pg_depend d ON d.classid = 'pg_statistic_ext'::regclass
                 AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
            JOIN pg_statistic_ext s ON s.oid = d.objid
            JOIN pg_namespace n ON n.oid = s.stxnamespace
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
            ORDER BY 1, 2
            """, (regclass(key.table), key.column))
        return [StatisticsDef(key.table, *row) for row in cur.fetchall()]


NOT_COMPILING = (psycopg2.errors.UndefinedFunction, psycopg2.errors.DatatypeMismatch,
                 psycopg2.errors.CannotCoerce, psycopg2.errors.AmbiguousFunction,
                 psycopg2.errors.IndeterminateDatatype)
"""What the server answers when an expression does not compile for the types it is given:
no such function or operator (``uuid ~ unknown``), types that cannot be matched (CASE,
COALESCE, IN), no cast, an ambiguous call.  Anything else is an error of its own."""


def compiles_as_uuid(conn: Connection, key: KeyColumn, table: Table, *,
                     select: str | None = None, where: str | None = None) -> str:
    """Whether expressions deparsed by the server on ``table`` (a list to select, a
    condition) still compile once ``key`` is uuid: "" when they do, else why not.

    Each reference to the column becomes ``(column)::uuid`` (``sqlexpr.substitute_column``)
    and the server parses and plans ``EXPLAIN SELECT <select> FROM <table> WHERE <where>``
    in a savepoint rolled back: nothing is changed, nothing is read.  A dependency the text
    does not show as a reference (through an alias) cannot be judged and is refused.
    """
    parts, replaced, unsure = [], 0, 0
    for text in (select or "1", where or "true"):
        substituted, count = sqlexpr.substitute_column(
            text, key.column, "({})::uuid", key.table.name, unqualified=table == key.table)
        parts.append(sql.SQL(substituted))
        replaced += count
        unsure += sqlexpr.foreign_references(text, key.column, key.table.name)
    if not replaced or unsure:
        return (f"cannot be judged: its definition refers to {key.column} in a way the "
                "pre-flight cannot follow")
    query = sql.SQL("EXPLAIN SELECT {} FROM {} WHERE {}").format(parts[0], table.ident, parts[1])
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT compile_oracle")
        try:
            cur.execute(query)  # no parameters: a % in the text stays a %
        except NOT_COMPILING as error:
            cur.execute("ROLLBACK TO SAVEPOINT compile_oracle")
            return (f"would not compile once {key.column} is uuid: "
                    f"{error.diag.message_primary}")
        cur.execute("ROLLBACK TO SAVEPOINT compile_oracle")
    return ""


@dataclass(frozen=True)
class CheckDef:
    """A CHECK constraint of the key's table that uses the key column."""

    name: str
    expression: str  # pg_get_expr of its condition
    validated: bool
    no_inherit: bool


def check_constraints_on(conn: Connection, key: KeyColumn) -> list[CheckDef]:
    """The table's CHECK constraints that use the column, the engine's own left out."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT k.conname, pg_get_expr(k.conbin, k.conrelid), k.convalidated, k.connoinherit
            FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid
            WHERE k.conrelid = to_regclass(%s) AND a.attname = %s AND k.contype = 'c'
              AND a.attnum = ANY (k.conkey) AND k.conname <> ALL (%s)
            ORDER BY 1
            """,
            (regclass(key.table), key.column,
             [key.helper("filled"), key.helper("not_null")]))
        return [CheckDef(*row) for row in cur.fetchall()]


@dataclass(frozen=True)
class PolicyDef:
    """A row-level security policy whose expressions use a key column."""

    table: Table
    name: str
    permissive: bool
    command: str  # ALL, SELECT, INSERT, UPDATE, DELETE
    roles: tuple[str | None, ...]  # None: PUBLIC
    using: str | None
    with_check: str | None
    comment: str | None


def policies_on(conn: Connection, key: KeyColumn) -> list[PolicyDef]:
    """The policies, on any table, that depend on the column."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT n.nspname, c.relname, p.polname, p.polpermissive,
                   CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                        WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                   ARRAY(SELECT CASE WHEN r = 0 THEN NULL ELSE pg_get_userbyid(r) END
                         FROM unnest(p.polroles) r ORDER BY 1),
                   pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid),
                   obj_description(p.oid, 'pg_policy')
            FROM pg_attribute a
            JOIN pg_depend d ON d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
                 AND d.classid = 'pg_policy'::regclass
            JOIN pg_policy p ON p.oid = d.objid
            JOIN pg_class c ON c.oid = p.polrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
            ORDER BY 1, 2, 3
            """, (regclass(key.table), key.column))
        return [PolicyDef(Table(schema, table), name, permissive, command, tuple(roles),
                          *rest)
                for schema, table, name, permissive, command, roles, *rest in cur.fetchall()]


@dataclass(frozen=True)
class ExpressionIndex:
    name: str
    expressions: str | None  # pg_get_expr of its expressions, comma-separated
    predicate: str | None


def expression_indexes_on(conn: Connection, key: KeyColumn) -> list[ExpressionIndex]:
    """The indexes whose expressions use the column (``indexes_on``, ``uses_expression``)."""
    names = [ix.name for ix in indexes_on(conn, key) if ix.uses_expression]
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT c.relname, pg_get_expr(i.indexprs, i.indrelid),
                   pg_get_expr(i.indpred, i.indrelid)
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = to_regclass(%s) AND c.relname = ANY (%s)
            ORDER BY 1
            """, (regclass(key.table), names))
        return [ExpressionIndex(name, expressions, predicate)
                for name, expressions, predicate in cur.fetchall()]


def generated_columns(conn: Connection, key: KeyColumn) -> list[str]:
    """Generated columns of the key's table whose expression uses the key column.

    Their expression is a ``pg_attrdef`` row that depends on the column
    (PostgreSQL 15 to 18; ``blockers`` leaves ``pg_attrdef`` aside, for the
    key's own default is one too).  Dropping the key would drop them.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT g.attname
            FROM pg_attribute a
            JOIN pg_attrdef ad ON ad.adrelid = a.attrelid
            JOIN pg_attribute g ON g.attrelid = ad.adrelid AND g.attnum = ad.adnum
            JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                 AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
            WHERE a.attrelid = to_regclass(%s) AND a.attname = %s
              AND g.attgenerated <> '' AND g.attnum <> a.attnum
            ORDER BY 1
            """,
            (regclass(key.table), key.column),
        )
        return [name for (name,) in cur.fetchall()]


def relation_bytes(conn: Connection, table: Table) -> tuple[int, int]:
    """(heap bytes, index bytes) of a table; a partitioned table's are its partitions'
    (at every level), for it holds no rows of its own."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(pg_table_size(relid)), pg_table_size(to_regclass(%(t)s))), "
            "coalesce(sum(pg_indexes_size(relid)), pg_indexes_size(to_regclass(%(t)s))) "
            "FROM pg_partition_tree(to_regclass(%(t)s))",  # no rows for a plain table
            {"t": regclass(table)})
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


@dataclass(frozen=True)
class ForeignKeyRules:
    """What an FK does besides pointing: its match type, actions and timing."""

    match: str  # pg_constraint.confmatchtype: f (full), s (simple), p (partial)
    on_update: str  # confupdtype / confdeltype: a, r, c, n, d
    on_delete: str
    deferrable: bool
    deferred: bool
    columns: int  # how many columns it spans


def foreign_key_rules(conn: Connection, fk: ForeignKeyDef) -> ForeignKeyRules | None:
    with conn.cursor() as cur:
        cur.execute("SELECT confmatchtype, confupdtype, confdeltype, condeferrable, condeferred, "
                    "cardinality(conkey) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
                    "AND conname = %s AND contype = 'f'", (regclass(fk.table), fk.name))
        row = cur.fetchone()
    return None if row is None else ForeignKeyRules(*row)


def index_validity(conn: Connection, table: Table, name: str) -> bool | None:
    """Whether the index ``name`` of ``table`` is valid and ready; None if there is none.

    An index that ``CREATE INDEX CONCURRENTLY`` left behind when it was
    interrupted exists but is not valid.
    """
    return _value(conn, bool, "SELECT i.indisvalid AND i.indisready FROM pg_index i "
                              "JOIN pg_class c ON c.oid = i.indexrelid "
                              "WHERE i.indrelid = to_regclass(%s) AND c.relname = %s",
                  (regclass(table), name))


def index_reads_column(conn: Connection, table: Table, name: str, column: str) -> bool:
    """Whether the index ``name`` of ``table`` reads ``column``, in its keys, expressions or
    predicate: the server records a dependency on each column for all three."""
    return bool(_value(conn, bool, "SELECT EXISTS (SELECT FROM pg_index i "
                                   "JOIN pg_class c ON c.oid = i.indexrelid "
                                   "JOIN pg_depend d ON d.classid = 'pg_class'::regclass "
                                   "AND d.objid = i.indexrelid AND d.refobjid = i.indrelid "
                                   "JOIN pg_attribute a ON (a.attrelid, a.attnum) "
                                   "= (d.refobjid, d.refobjsubid) "
                                   "WHERE i.indrelid = to_regclass(%s) AND c.relname = %s "
                                   "AND a.attname = %s)", (regclass(table), name, column)))


def constraint_validity(conn: Connection, table: Table, name: str) -> bool | None:
    """Whether the constraint ``name`` of ``table`` is validated; None if there is none."""
    return _value(conn, bool, "SELECT convalidated FROM pg_constraint "
                              "WHERE conrelid = to_regclass(%s) AND conname = %s",
                  (regclass(table), name))


def constraint_definition(conn: Connection, table: Table, name: str) -> str | None:
    """A constraint of ``table`` as the server prints it (``PRIMARY KEY (a, b) INCLUDE
    (c) DEFERRABLE``); None if there is none."""
    return _value(conn, str, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                             "WHERE conrelid = to_regclass(%s) AND conname = %s",
                  (regclass(table), name))


def attached_index(conn: Connection, index: Table, table: Table) -> str | None:
    """The index of ``table`` (a partition) attached to the partitioned ``index``."""
    return _value(conn, str, "SELECT c.relname FROM pg_inherits h JOIN pg_index i "
                             "ON i.indexrelid = h.inhrelid JOIN pg_class c "
                             "ON c.oid = i.indexrelid WHERE h.inhparent = to_regclass(%s) "
                             "AND i.indrelid = to_regclass(%s)",
                  (regclass(index), regclass(table)))


def replica_identity_index(conn: Connection, table: Table) -> str | None:
    """The index named by ``REPLICA IDENTITY USING INDEX``, if the table has one."""
    return _value(conn, str, "SELECT c.relname FROM pg_index i JOIN pg_class c "
                             "ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) "
                             "AND i.indisreplident", (regclass(table),))


def index_comment_and_identity(conn: Connection, table: Table,
                               name: str) -> tuple[str | None, bool]:
    """An index's comment, and whether it is its table's replica identity."""
    with conn.cursor() as cur:
        cur.execute("SELECT obj_description(i.indexrelid, 'pg_class'), i.indisreplident "
                    "FROM pg_index i WHERE i.indexrelid = to_regclass(%s) "
                    "AND i.indrelid = to_regclass(%s)",
                    (regclass(Table(table.schema, name)), regclass(table)))
        row = cur.fetchone()
    return (None, False) if row is None else (row[0], bool(row[1]))


def comments(conn: Connection, table: Table, column: str) -> dict[tuple[str, str], str]:
    """Comments a swap must carry, by (kind, name): on the column (``("column", name)``),
    and on each ``index`` and ``constraint`` of the table."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT 'column', a.attname, col_description(a.attrelid, a.attnum) FROM pg_attribute a
            WHERE a.attrelid = to_regclass(%(t)s) AND a.attname = %(c)s
            UNION ALL
            SELECT 'index', c.relname, obj_description(c.oid, 'pg_class') FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%(t)s)
            UNION ALL
            SELECT 'constraint', conname, obj_description(oid, 'pg_constraint') FROM pg_constraint
            WHERE conrelid = to_regclass(%(t)s)
            """, {"t": regclass(table), "c": column})
        return {(kind, name): text for kind, name, text in cur.fetchall() if text is not None}


@dataclass(frozen=True)
class TriggerDef:
    """An application trigger on a table, as the fill and the swap see it."""

    table: Table
    name: str
    function: str  # signature, schema-qualified (regprocedure)
    source: str  # the function's body (pg_proc.prosrc)
    timing: str  # BEFORE, AFTER or INSTEAD OF
    row_level: bool
    events: str  # INSERT OR UPDATE ...
    enabled: str  # pg_trigger.tgenabled: O origin, A always, R replica, D disabled
    on_temp_update: bool  # no column list, or its list includes the temporary column

    def fires_for_fill(self, *, replica: bool) -> bool:
        """Whether an UPDATE of the temporary column alone fires it, the session's
        ``session_replication_role`` being ``replica`` or not."""
        modes = "AR" if replica else "AO"
        return "UPDATE" in self.events.split(" OR ") and self.on_temp_update \
            and self.enabled in modes

    def __str__(self) -> str:
        level = "ROW" if self.row_level else "STATEMENT"
        return (f"trigger {self.name} on {self.table} ({self.timing} {self.events} "
                f"FOR EACH {level}, function {self.function})")


@dataclass(frozen=True)
class ColumnTrigger:
    """A trigger of the key's table that names the key column (``UPDATE OF`` it, or in its
    ``WHEN``): it must go before the column and be created again after, on the new one."""

    name: str
    definition: str  # pg_get_triggerdef, fully qualified
    enabled: str  # pg_trigger.tgenabled: O origin, A always, R replica, D disabled
    comment: str | None


def column_triggers(conn: Connection, key: KeyColumn) -> list[ColumnTrigger]:
    """The key's table's own triggers that depend on the column (a partition's clone of its
    table's trigger goes and comes back with it)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text,
                   obj_description(t.oid, 'pg_trigger')
            FROM pg_trigger t
            JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attname = %(column)s
            JOIN pg_depend d ON d.classid = 'pg_trigger'::regclass AND d.objid = t.oid
                 AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
            WHERE t.tgrelid = to_regclass(%(table)s) AND NOT t.tgisinternal
              AND t.tgparentid = 0 AND t.tgname <> %(sync)s
            ORDER BY 1
            """, {"table": regclass(key.table), "column": key.column,
                  "sync": key.helper("sync")})
        return [ColumnTrigger(*row) for row in cur.fetchall()]


def trigger_compiles(conn: Connection, key: KeyColumn, trigger: ColumnTrigger) -> str:
    """Whether the trigger can be created again once ``key`` is uuid: "" when it can, else
    why not (``runs_on_twin``)."""
    return runs_on_twin(conn, key, trigger.definition,
                        f"would not compile once {key.column} is uuid")


def runs_on_twin(conn: Connection, key: KeyColumn, definition: str, failure: str) -> str:
    """Whether ``definition`` (a trigger's or an index's, deparsed by the server, on the key's
    table) can be run once ``key`` is uuid: "" when it can, else why not, the server's
    reason after ``failure``.  It is run, in a savepoint rolled back, on an empty temporary
    twin of the table (same name, in ``pg_temp``) whose key column is uuid."""
    twin = "pg_temp." + sqlexpr.quote_ident(key.table.name)
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT twin_oracle")
        try:
            cur.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(
                sql.Identifier("pg_temp", key.table.name), key.table.ident))
            cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE uuid USING NULL").format(
                sql.Identifier("pg_temp", key.table.name), sql.Identifier(key.column)))
            cur.execute(sql.SQL(sqlexpr.replace_relations(
                definition, {(key.table.schema, key.table.name): twin})))
        except psycopg2.errors.InsufficientPrivilege:
            return ("cannot be judged: this role may not create temporary tables, which the "
                    "check needs (GRANT TEMPORARY ON DATABASE ... TO it)")
        except (*NOT_COMPILING, psycopg2.errors.UndefinedObject) as error:
            # UndefinedObject: no operator class of an index's access method for uuid
            return f"{failure}: {error.diag.message_primary}"
        finally:
            cur.execute("ROLLBACK TO SAVEPOINT twin_oracle")
    return ""


def application_triggers(conn: Connection, key: KeyColumn) -> list[TriggerDef]:
    """The triggers on the key's table that are not PostgreSQL's own (FK triggers
    are internal) nor the engine's: the sync trigger for the column, and any whose
    function lives in the backup schema (the change log's)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT t.tgname, t.tgfoid::regprocedure::text, p.prosrc,
                   CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE'
                        WHEN t.tgtype & 64 <> 0 THEN 'INSTEAD OF' ELSE 'AFTER' END,
                   t.tgtype & 1 <> 0,
                   concat_ws(' OR ', CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                             CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END,
                             CASE WHEN t.tgtype & 8 <> 0 THEN 'DELETE' END,
                             CASE WHEN t.tgtype & 32 <> 0 THEN 'TRUNCATE' END),
                   t.tgenabled::text,
                   cardinality(t.tgattr::int2[]) = 0 OR coalesce((
                       SELECT a.attnum = ANY (t.tgattr::int2[]) FROM pg_attribute a
                       WHERE a.attrelid = t.tgrelid AND a.attname = %(temp)s
                         AND NOT a.attisdropped), false)
            FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
            WHERE t.tgrelid = to_regclass(%(table)s) AND NOT t.tgisinternal
              AND t.tgname <> %(sync)s
              AND p.pronamespace NOT IN (SELECT oid FROM pg_namespace
                                         WHERE nspname = %(backup)s OR nspname LIKE %(like)s)
            ORDER BY t.tgname
            """,
            {"table": regclass(key.table), "temp": key.temp, "sync": key.helper("sync"),
             "backup": BACKUP_SCHEMA, "like": BACKUP_SCHEMA_LIKE},
        )
        rows = cur.fetchall()
    return [TriggerDef(key.table, *row) for row in rows]


def update_rules(conn: Connection, table: Table, *, replica: bool) -> list[str]:
    """Rules ``ON UPDATE`` of the table that an UPDATE would fire; the fill's batch
    (an UPDATE in a WITH) fails with any of them."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT rulename FROM pg_rewrite
            WHERE ev_class = to_regclass(%s) AND ev_type = '2' AND rulename <> '_RETURN'
              AND ev_enabled::text = ANY (%s)
            ORDER BY 1
            """,
            (regclass(table), ["A", "R"] if replica else ["A", "O"]),
        )
        return [name for (name,) in cur.fetchall()]


SWAP_COMMANDS = ("ALTER TABLE", "ALTER INDEX", "DROP TRIGGER", "COMMENT", "GRANT", "REVOKE",
                 "CREATE VIEW", "DROP VIEW", "ALTER VIEW", "CREATE MATERIALIZED VIEW",
                 "DROP MATERIALIZED VIEW", "ALTER MATERIALIZED VIEW", "CREATE INDEX",
                 "CREATE TRIGGER", "CREATE RULE", "CREATE POLICY", "DROP POLICY",
                 "ALTER PUBLICATION", "CREATE STATISTICS", "DROP STATISTICS",
                 "ALTER STATISTICS")
"""The command tags of the statements a swap runs (``swap``, ``views``)."""


def event_triggers(conn: Connection) -> list[str]:
    """The enabled event triggers that fire for statements the swap runs, as
    ``name (event, function)``."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT evtname || ' (' || evtevent || ', function ' || evtfoid::regproc::text || ')'
            FROM pg_event_trigger
            WHERE evtenabled <> 'D' AND evtevent <> 'login'
              AND (evttags IS NULL OR evttags && %s::text[])
            ORDER BY evtname
            """, (list(SWAP_COMMANDS),))
        return [text for (text,) in cur.fetchall()]


def may_skip_triggers(conn: Connection) -> bool:
    """Whether the role may ``SET session_replication_role``: superuser, or
    (PostgreSQL 15 and later) granted ``SET`` on the parameter."""
    query = ("SELECT rolsuper OR has_parameter_privilege(current_user, "
             "'session_replication_role', 'SET') FROM pg_roles WHERE rolname = current_user"
             if server_version(conn) >= 150000
             else "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    with conn.cursor() as cur:
        cur.execute(query)
        row = cur.fetchone()
    return bool(row and row[0])


def is_partitioned(conn: Connection, table: Table) -> bool:
    """Whether the table is partitioned (``PARTITION BY``): it holds no rows of its own."""
    with conn.cursor() as cur:
        cur.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)",
                    (regclass(table),))
        row = cur.fetchone()
    return bool(row and row[0])


def partitions(conn: Connection, table: Table) -> list[Table]:
    """The partitions of a partitioned table, at every level below it; none for a plain
    table."""
    with conn.cursor() as cur:
        cur.execute("SELECT n.nspname, c.relname FROM pg_partition_tree(to_regclass(%s)) t "
                    "JOIN pg_class c ON c.oid = t.relid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE t.level > 0 ORDER BY t.level, 1, 2", (regclass(table),))
        return [Table(schema, name) for schema, name in cur.fetchall()]


def index_partitions(conn: Connection, index: IndexDef) -> list[IndexDef]:
    """The indexes attached to a partitioned table's index, one per partition, each as
    the server prints it (on the partition, a plain table or partitioned in turn)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT n.nspname, t.relname, ic.relname, pg_get_indexdef(i.indexrelid), k.contype,
                   coalesce(k.condeferrable, false), coalesce(k.condeferred, false),
                   (SELECT spcname FROM pg_tablespace WHERE oid = ic.reltablespace)
            FROM pg_inherits h
            JOIN pg_index i ON i.indexrelid = h.inhrelid
            JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_class t ON t.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid
                 AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u')
            WHERE h.inhparent = to_regclass(%s)
            ORDER BY 1, 2, 3
            """,
            (regclass(Table(index.table.schema, index.name)),),
        )
        rows = cur.fetchall()
    return [IndexDef(Table(schema, table), name, definition, contype, deferrable, deferred,
                     index.uses_expression, space)
            for schema, table, name, definition, contype, deferrable, deferred, space in rows]


@dataclass(frozen=True)
class UncheckedForeignKey:
    """A ``NOT VALID`` foreign key of a table: old rows may break it, new ones may not."""

    name: str
    definition: str  # pg_get_constraintdef: ... NOT VALID
    comment: str | None


def unchecked_foreign_keys(conn: Connection, table: Table) -> list[UncheckedForeignKey]:
    """The table's own foreign keys that are not validated (a partition's clone of its
    table's FK left out: it comes and goes with it)."""
    with conn.cursor() as cur:
        cur.execute("SELECT conname, pg_get_constraintdef(oid), "
                    "obj_description(oid, 'pg_constraint') FROM pg_constraint "
                    "WHERE conrelid = to_regclass(%s) AND contype = 'f' AND NOT convalidated "
                    "AND conparentid = 0 ORDER BY 1", (regclass(table),))
        return [UncheckedForeignKey(*row) for row in cur.fetchall()]


def foreign_key_partitions(conn: Connection, fk: ForeignKeyDef) -> list[ForeignKeyDef]:
    """The clones of a partitioned table's FK on its partitions (``conparentid``)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT n.nspname, c.relname, a.attname, k.conname, pg_get_constraintdef(k.oid),
                   k.convalidated
            FROM pg_constraint p
            JOIN pg_constraint k ON k.conparentid = p.oid AND k.conrelid <> p.conrelid
            JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
            WHERE p.conrelid = to_regclass(%s) AND p.conname = %s AND p.contype = 'f'
            ORDER BY 1, 2, 4
            """,
            (regclass(fk.table), fk.name),
        )
        rows = cur.fetchall()
    return [ForeignKeyDef(Table(s, t), col, name, definition, valid)
            for s, t, col, name, definition, valid in rows]


@dataclass(frozen=True)
class Family:
    """Where a table stands among partitions and inheritance (``INHERITS``)."""

    partitioned: bool
    partition_of: str | None  # the partitioned table it is a partition of
    inherits: list[str]  # INHERITS parents
    inherited_by: list[str]  # INHERITS children


def family(conn: Connection, table: Table) -> Family:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT c.relkind = 'p',
                   (SELECT h.inhparent::regclass::text FROM pg_inherits h
                    WHERE h.inhrelid = c.oid AND c.relispartition),
                   ARRAY(SELECT h.inhparent::regclass::text FROM pg_inherits h
                         WHERE h.inhrelid = c.oid AND NOT c.relispartition ORDER BY 1),
                   ARRAY(SELECT h.inhrelid::regclass::text FROM pg_inherits h
                         JOIN pg_class k ON k.oid = h.inhrelid
                         WHERE h.inhparent = c.oid AND NOT k.relispartition ORDER BY 1)
            FROM pg_class c WHERE c.oid = to_regclass(%s)
            """,
            (regclass(table),),
        )
        row = cur.fetchone()
    if row is None:
        return Family(partitioned=False, partition_of=None, inherits=[], inherited_by=[])
    return Family(bool(row[0]), row[1], list(row[2]), list(row[3]))
