"""The ``migration_backup`` schema: copies of the tables and what an exact restore needs.

Besides a full copy of each table in the plan, the backup records, by name,
every definition the swap drops and later recreates (indexes, primary and
unique constraints, foreign keys, column defaults), the quarantine of orphan
rows, and the backfill checkpoints.  The swap and the rollback both replay
from here, so one record serves both directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import Json

from migration import catalog, recorded
from migration.catalog import ColumnState, ForeignKeyDef, IndexDef
from migration.errors import MigrationError
from migration.model import KeyColumn, Table
from migration.plan import Plan
from migration.sqlexpr import column_list

SCHEMA = "migration_backup"

_META = """
CREATE TABLE {schema}.backup_tables (
    table_schema text NOT NULL, table_name text NOT NULL, backup_table text NOT NULL,
    row_count bigint NOT NULL, checksum numeric NOT NULL,
    backed_up_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name));
CREATE TABLE {schema}.key_columns (
    table_schema text NOT NULL, table_name text NOT NULL, column_name text NOT NULL,
    type text NOT NULL, not_null boolean NOT NULL, default_expr text,
    column_grants jsonb NOT NULL,
    PRIMARY KEY (table_schema, table_name, column_name));
CREATE TABLE {schema}.saved_indexes (
    table_schema text NOT NULL, table_name text NOT NULL, column_name text NOT NULL,
    name text NOT NULL, definition text NOT NULL, constraint_type "char",
    is_deferrable boolean NOT NULL, is_deferred boolean NOT NULL,
    PRIMARY KEY (table_schema, table_name, name));
CREATE TABLE {schema}.saved_foreign_keys (
    table_schema text NOT NULL, table_name text NOT NULL, column_name text NOT NULL,
    name text NOT NULL, definition text NOT NULL, validated boolean NOT NULL,
    PRIMARY KEY (table_schema, table_name, name));
-- One row per slice of a column's backfill, walked by walk_key (chosen once per
-- column, so a resumed run walks the same way): the key range (last_key, upper_key]
-- still to fill, upper_key NULL for the last slice; or, for the walk key ctid, the
-- pages [last_key, upper_key).
CREATE TABLE {schema}.backfill_progress (
    table_schema text NOT NULL, table_name text NOT NULL, column_name text NOT NULL,
    slice int NOT NULL, walk_key text[] NOT NULL,
    last_key jsonb, upper_key jsonb, rows_done bigint NOT NULL DEFAULT 0,
    finished boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (table_schema, table_name, column_name, slice));
CREATE TABLE {schema}.quarantine (
    table_schema text NOT NULL, table_name text NOT NULL, quarantine_table text NOT NULL,
    row_count bigint NOT NULL, PRIMARY KEY (table_schema, table_name));
-- Keeps a temporary uuid column equal to its source while the backfill runs,
-- for rows written by anyone else: TG_ARGV = (source column, uuid column).
CREATE FUNCTION {schema}.sync_uuid_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    NEW := jsonb_populate_record(NEW, jsonb_build_object(
        TG_ARGV[1], (to_jsonb(NEW) ->> TG_ARGV[0])::uuid));
    RETURN NEW;
END $$;
"""


def backup_name(table: Table) -> sql.Identifier:
    """The copy of ``schema.table``: ``migration_backup."schema.table"``."""
    return sql.Identifier(SCHEMA, str(table))


def quarantine_name(table: Table) -> sql.Identifier:
    return sql.Identifier(SCHEMA, f"quarantine.{table}")


def meta(name: str) -> sql.Identifier:
    return sql.Identifier(SCHEMA, name)


def exists(cur: Cursor) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{SCHEMA}".backup_tables',))
    row = cur.fetchone()
    return bool(row and row[0])


def columns_of(cur: Cursor, relation: sql.Identifier) -> list[str]:
    """Column names of a relation in their order (dropped and temporary ones excluded)."""
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (relation.as_string(cur.connection),))
    return [name for (name,) in cur.fetchall()]


def table_checksum(cur: Cursor, relation: sql.Identifier, columns: list[str]) -> tuple[int, int]:
    """(row count, order-independent sum of row hashes) over ``columns`` in that order.

    Naming the columns makes the sum independent of their physical order,
    which the temporary-column swap changes.
    """
    cur.execute(sql.SQL(
        "SELECT count(*), coalesce(sum(hashtextextended(ROW({cols})::text, 0)::numeric), 0) "
        "FROM {rel} r").format(cols=column_list(columns, "r"), rel=relation))
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@dataclass(frozen=True)
class BackupResult:
    rows: int  # rows copied; 0 when an existing backup was kept
    message: str
    expectations: dict[str, Any] = field(default_factory=dict)
    """What the migrated database must have again (FKs, indexed columns), for the log."""


def create(cur: Cursor, plan: Plan) -> BackupResult:
    """Copy every table of the plan and record what the swap will drop.

    Runs in the caller's transaction with the tables locked against writes,
    so the copy is one consistent snapshot.  Before commit, the rows copied
    and the rows in the copy are counted against the table (the runbook's
    criterion); the copy's checksum is recorded for the rollback to prove its
    restore against.  Checksumming the table too would compare a snapshot
    with itself: it doubled the backup's time for nothing.
    """
    if exists(cur):
        return reuse(cur, plan)
    for table in plan.tables:
        cur.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(table.ident))
    cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(SCHEMA)))
    cur.execute(sql.SQL(_META).format(schema=sql.Identifier(SCHEMA)))
    total = 0
    for table in plan.tables:
        copy = backup_name(table)
        cur.execute(sql.SQL("CREATE TABLE {} AS TABLE {}").format(copy, table.ident))
        copied = cur.rowcount
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
        source_rows = int((cur.fetchone() or [-1])[0])
        copy_sum = table_checksum(cur, copy, columns_of(cur, copy))
        if not source_rows == copied == copy_sum[0]:
            raise MigrationError(f"backup of {table} does not match the table ({source_rows} "
                                 f"rows, {copied} copied, {copy_sum[0]} in the copy)",
                                 hint="nothing was kept; check the server log and run again")
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(
            meta("backup_tables")), (table.schema, table.name, copy.strings[1], *copy_sum))
        total += copied
    for key in plan.columns:
        save_definitions(cur, key)
    for fk in catalog.foreign_keys_to(cur.connection, plan.parent):
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(
            meta("saved_foreign_keys")),
            (fk.table.schema, fk.table.name, fk.column, fk.name, fk.definition, fk.validated))
    make_private(cur)
    return BackupResult(total, f"backed up {len(plan.tables)} tables, {total:,} rows",
                        expectations(cur, plan))


def expectations(cur: Cursor, plan: Plan) -> dict[str, Any]:
    """What the migrated database must have again, by name (``recorded.record``), kept in
    migration_log so that verify knows it after cleanup_backup dropped the backup."""
    return recorded.record(cur, plan)


_SHARED = """
    SELECT 'schema ' || quote_ident(n.nspname) AS target, n.nspowner AS owner, g.grantee,
           g.privilege_type
    FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) g
    WHERE n.nspname = %(schema)s
    UNION ALL
    SELECT 'table ' || c.oid::regclass::text, c.relowner, g.grantee, g.privilege_type
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL aclexplode(c.relacl) g
    WHERE n.nspname = %(schema)s
"""


@dataclass(frozen=True)
class SharedPrivilege:
    """A privilege on the backup schema or one of its tables held by another than its owner."""

    target: str  # "schema migration_backup" or "table migration_backup.\"public.users\""
    grantee: str | None  # None: PUBLIC
    privilege: str


def shared_privileges(cur: Cursor) -> list[SharedPrivilege]:
    """Who else may use the backup (it holds every original id): read from the catalog only."""
    cur.execute(sql.SQL(
        "SELECT target, CASE WHEN grantee = 0 THEN NULL ELSE pg_get_userbyid(grantee) END, "
        "string_agg(privilege_type, ', ' ORDER BY privilege_type) FROM ({}) p "
        "WHERE grantee <> owner GROUP BY 1, 2 ORDER BY 1, 2 NULLS FIRST").format(
        sql.SQL(_SHARED)), {"schema": SCHEMA})
    return [SharedPrivilege(*row) for row in cur.fetchall()]


def make_private(cur: Cursor) -> None:
    """Revoke what default privileges (ALTER DEFAULT PRIVILEGES) gave others on the backup
    schema and its tables as they were created: the backup is the migrating role's alone."""
    schema = sql.Identifier(SCHEMA)
    for grantee in sorted({p.grantee or "" for p in shared_privileges(cur)}):
        role = sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC")
        cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {s} FROM {r}; "
                            "REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {r}").format(
            s=schema, r=role))


def reuse(cur: Cursor, plan: Plan) -> BackupResult:
    """A backup exists: keep it if it is this data's backup, refuse otherwise."""
    states = {catalog.column_state(cur.connection, key) for key in plan.columns}
    if states != {ColumnState.STRING}:
        return BackupResult(0, "backup kept: the migration is under way")
    for table, count, checksum in recorded_checksums(cur):
        columns = columns_of(cur, backup_name(table))
        if table_checksum(cur, table.ident, columns) != (count, checksum):
            raise MigrationError(
                f"a backup already exists in {SCHEMA} and {table} no longer matches it",
                hint="inspect the backup; drop it with cleanup_backup --force to take a new one")
    return BackupResult(0, "backup already present and identical to the data; kept")


def recorded_checksums(cur: Cursor) -> list[tuple[Table, int, int]]:
    cur.execute(sql.SQL("SELECT table_schema, table_name, row_count, checksum FROM {} "
                        "ORDER BY 1, 2").format(meta("backup_tables")))
    return [(Table(s, t), int(n), int(c)) for s, t, n, c in cur.fetchall()]


def save_definitions(cur: Cursor, key: KeyColumn) -> None:
    conn = cur.connection
    info = catalog.column_info(conn, key.table, key.column)
    assert info is not None
    grants = [asdict(g) for g in catalog.column_grants(conn, key.table, key.column)]
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
        meta("key_columns")),
        (key.table.schema, key.table.name, key.column, info.type, info.not_null, info.default,
         Json(grants)))
    for ix in catalog.indexes_on(conn, key):
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT DO NOTHING").format(meta("saved_indexes")),
                    (key.table.schema, key.table.name, key.column, ix.name, ix.definition,
                     ix.constraint_type, ix.deferrable, ix.deferred))


def saved_indexes(cur: Cursor, key: KeyColumn) -> list[IndexDef]:
    cur.execute(sql.SQL("SELECT name, definition, constraint_type, is_deferrable, is_deferred "
                        "FROM {} WHERE table_schema = %s AND table_name = %s "
                        "AND column_name = %s ORDER BY constraint_type NULLS LAST, name").format(
        meta("saved_indexes")), (key.table.schema, key.table.name, key.column))
    return [IndexDef(key.table, name, definition, contype, deferrable, deferred,
                     uses_expression=False)
            for name, definition, contype, deferrable, deferred in cur.fetchall()]


def saved_foreign_keys(cur: Cursor, key: KeyColumn | None = None) -> list[ForeignKeyDef]:
    """FKs to the parent recorded at backup time: all of them, or those from ``key``."""
    cur.execute(sql.SQL("SELECT table_schema, table_name, column_name, name, definition, "
                        "validated FROM {} ORDER BY 1, 2, 4").format(meta("saved_foreign_keys")))
    found = [ForeignKeyDef(Table(s, t), c, n, d, v) for s, t, c, n, d, v in cur.fetchall()]
    return [fk for fk in found
            if key is None or (fk.table, fk.column) == (key.table, key.column)]


def saved_grants(cur: Cursor, key: KeyColumn) -> list[catalog.ColumnGrant]:
    cur.execute(sql.SQL("SELECT column_grants FROM {} WHERE "
                        "(table_schema, table_name, column_name) = (%s, %s, %s)").format(
        meta("key_columns")), (key.table.schema, key.table.name, key.column))
    row = cur.fetchone()
    return [catalog.ColumnGrant(**grant) for grant in (row[0] if row else [])]


def saved_column(cur: Cursor, key: KeyColumn) -> catalog.ColumnInfo:
    cur.execute(sql.SQL("SELECT type, true, not_null, default_expr FROM {} "
                        "WHERE (table_schema, table_name, column_name) = (%s, %s, %s)").format(
        meta("key_columns")), (key.table.schema, key.table.name, key.column))
    row = cur.fetchone()
    if row is None:
        raise MigrationError(f"the backup has no record of {key}",
                             hint="the backup predates this plan; run rollback, then "
                                  "cleanup_backup --force and start again")
    return catalog.ColumnInfo(*row)


def quarantined_rows(cur: Cursor) -> dict[str, int]:
    """Rows held in each quarantine table now (they exist nowhere else)."""
    if not exists(cur):
        return {}
    cur.execute(sql.SQL("SELECT quarantine_table FROM {} ORDER BY 1").format(meta("quarantine")))
    held = {}
    for (name,) in cur.fetchall():
        relation = sql.Identifier(SCHEMA, name)
        if catalog.relation_exists(cur.connection, relation):
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(relation))
            rows = int((cur.fetchone() or [0])[0])
            if rows:
                held[f"{SCHEMA}.{name}"] = rows
    return held


def require(cur: Cursor, operation: str) -> None:
    if not exists(cur):
        raise MigrationError(f"{operation} needs the backup in {SCHEMA}, and there is none",
                             hint="run --operation=backup_data first")


def restore_index(cur: Cursor, index: IndexDef) -> None:
    """Replay a recorded index (and the constraint it backs) if it is missing.

    The rollback after a swap uses it; the definition is the server's own
    ``pg_get_indexdef`` text as recorded at backup time.
    """
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
