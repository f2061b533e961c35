"""The backup schema: copies of the tables and what an exact restore needs.

Each key has its own (``Plan.backup_schema``): the runbook's ``migration_backup``
for ``users.id``, a schema named after the key for any other key.

Besides a full copy of each table in the plan, the backup records, by name,
every definition the swap drops and later recreates (indexes, primary and
unique constraints, foreign keys, column defaults), the quarantine of orphan
rows, and the backfill checkpoints.  The swap and the rollback both replay
from here, so one record serves both directions.

The copy is taken while the application keeps writing: a change log started
first (a row trigger on each of the plan's tables) records the primary key of
every row the application writes from then on, and the copy is read from one
REPEATABLE READ snapshot taken after the log started, under ACCESS SHARE
locks only.  A row is either in the copy as it is now, or in the change log.

This module is the backup's storage, which the whole engine reads and writes; taking
the backup, which also writes the record of the tables, is ``take_backup``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog
from migration.catalog import ForeignKeyDef, IndexDef
from migration.connection import lock_tables
from migration.errors import MigrationError
from migration.model import (
    BACKUP_SCHEMA,
    BACKUP_SCHEMA_LIKE,
    RUNBOOK_KEY,
    UUID_INPUT,
    KeyColumn,
    Table,
    fit_name,
)
from migration.plan import Plan
from migration.report import SAMPLE_LIMIT
from migration.sqlexpr import column_list

CHANGE_LOG_FUNCTION = "log_change"
KEY_TABLE = "backup_key"
"""The one row naming the key whose backup the schema holds (``--key`` spelling)."""

# Started before the copy, so that every write the copy's snapshot misses is
# in the log.  The trigger passes the table's key columns (its primary key);
# the key of every row written, before and after an update, is logged.  It is
# a row trigger whose WHEN leaves out the engine's own writes: they are never
# queued, so the fill's batches cost nothing here (statement triggers with
# transition tables made full_migration about 30% slower, the server filling
# the transition tables for every batch).  FKs' cascaded writes fire it too.
_CHANGE_LOG = """
CREATE TABLE IF NOT EXISTS {schema}.change_log (
    id bigserial PRIMARY KEY, table_schema text NOT NULL, table_name text NOT NULL,
    operation text NOT NULL, row_key jsonb NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS change_log_row
    ON {schema}.change_log (table_schema, table_name, row_key);
-- The columns each table's rows are logged by (the trigger arguments).
CREATE TABLE IF NOT EXISTS {schema}.logged_tables (
    table_schema text NOT NULL, table_name text NOT NULL, key_columns text[] NOT NULL,
    PRIMARY KEY (table_schema, table_name));
-- SECURITY DEFINER: the application's role writes the log without any right
-- on this schema; the search path is pinned and every name qualified.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    old_key jsonb;
    new_key jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN  -- the statement trigger: every row of the table went
        INSERT INTO {schema}.change_log (table_schema, table_name, operation, row_key)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, '{{}}');
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT jsonb_object_agg(k, to_jsonb(OLD) -> k) INTO old_key FROM unnest(TG_ARGV) AS k;
        INSERT INTO {schema}.change_log (table_schema, table_name, operation, row_key)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, old_key);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT jsonb_object_agg(k, to_jsonb(NEW) -> k) INTO new_key FROM unnest(TG_ARGV) AS k;
        IF new_key IS DISTINCT FROM old_key THEN
            INSERT INTO {schema}.change_log (table_schema, table_name, operation, row_key)
            VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, new_key);
        END IF;
    END IF;
    RETURN NULL;
END $$;
"""

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
-- What the tables looked like (recorded.record), written in the copy's own transaction:
-- a backup never exists without it.  migration_log gets it too (it outlives the backup).
CREATE TABLE {schema}.recorded_objects (record jsonb NOT NULL);
"""

# Keep a key column's copy equal to it for the rows others write while the copy exists (the
# engine fills copies itself: the triggers' WHEN leaves its writes out).  Fired by every
# INSERT and UPDATE, whatever columns it writes, so that a row whose copy the fill has not
# reached yet (or missed) is filled by the application's next write to it instead of
# rejected by the fill proof.  A copy that holds the key's value already is kept as it is: a
# write that leaves the key's value alone (an ORM writes every column back) keeps the
# spelling the rollback gave a string copy.
# A foreign key and its copy both act on a write to the parent, in their triggers' name
# order (their OIDs as text), so the copy's may act first, on the copy alone: an UPDATE
# written by a trigger (pg_trigger_depth() > 1) leaving the key as it was and moving the
# copy off it.  One rule: when the copy got the key's default (as uuid; NULL where it has
# none), that is a SET NULL or SET DEFAULT (the copy carries the key's default, see
# ``fill.copy_default``), and the original's will give the key its default: the key takes
# it now, as the server checks right after a SET DEFAULT that no row still refers to the
# old key.  Any other move (a CASCADE; a SET NULL of a key that has a default) waits for
# the original's action: the copy stays the key's until it changes the key.
# The copy of a string key is ``model.uuid_copy`` of it, computed here once per write from
# the text its output function prints (a stand-in for a string that is no UUID).
SYNC_FUNCTIONS = """
-- TG_ARGV = (key column, copy column).
CREATE OR REPLACE FUNCTION {schema}.sync_uuid_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    written jsonb := to_jsonb(NEW);
    string text := written ->> TG_ARGV[0];
    value uuid := CASE WHEN string ~ {uuid_input} THEN string::uuid ELSE md5(string)::uuid END;
    fallback text;
BEGIN
    IF (written ->> TG_ARGV[1])::uuid IS NOT DISTINCT FROM value THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1
       AND to_jsonb(OLD) -> TG_ARGV[0] = written -> TG_ARGV[0]
       AND (to_jsonb(OLD) ->> TG_ARGV[1])::uuid = value THEN
        SELECT pg_get_expr(d.adbin, d.adrelid) INTO fallback
        FROM pg_attrdef d JOIN pg_attribute a ON (a.attrelid, a.attnum) = (d.adrelid, d.adnum)
        WHERE a.attrelid = TG_RELID AND a.attname = TG_ARGV[0];
        IF fallback IS NOT NULL THEN
            EXECUTE format('SELECT (%s)::text', fallback) INTO fallback;
        END IF;
        IF (written ->> TG_ARGV[1])::uuid IS NOT DISTINCT FROM (CASE
               WHEN fallback ~ {uuid_input} THEN fallback::uuid ELSE md5(fallback)::uuid END) THEN
            RETURN jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], fallback));
        END IF;
    END IF;
    RETURN jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[1], value));
END $$;
-- On the way back, a referencing column's string copy takes the spelling of the
-- row it refers to (a foreign key between strings compares them byte for byte):
-- TG_ARGV = (key column, copy column, parent schema, parent table, parent key,
-- parent's copy column).
CREATE OR REPLACE FUNCTION {schema}.sync_reference_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    written jsonb := to_jsonb(NEW);
    value uuid := (written ->> TG_ARGV[0])::uuid;
    spelled text;
    fallback text;
BEGIN
    IF (written ->> TG_ARGV[1])::uuid IS NOT DISTINCT FROM value THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1
       AND to_jsonb(OLD) -> TG_ARGV[0] = written -> TG_ARGV[0]
       AND (to_jsonb(OLD) ->> TG_ARGV[1])::uuid = value THEN
        SELECT pg_get_expr(d.adbin, d.adrelid) INTO fallback
        FROM pg_attrdef d JOIN pg_attribute a ON (a.attrelid, a.attnum) = (d.adrelid, d.adnum)
        WHERE a.attrelid = TG_RELID AND a.attname = TG_ARGV[0];
        IF fallback IS NOT NULL THEN
            EXECUTE format('SELECT (%s)::text', fallback) INTO fallback;
        END IF;
        IF (written ->> TG_ARGV[1])::uuid IS NOT DISTINCT FROM fallback::uuid THEN
            RETURN jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], fallback));
        END IF;
    END IF;
    EXECUTE format('SELECT %I::text FROM %I.%I WHERE %I = $1',
                   TG_ARGV[5], TG_ARGV[2], TG_ARGV[3], TG_ARGV[4])
        INTO spelled USING value;
    RETURN jsonb_populate_record(NEW, jsonb_build_object(
        TG_ARGV[1], coalesce(spelled, written ->> TG_ARGV[0])));
END $$;
"""

def sync_functions(schema: str) -> sql.Composed:
    """``SYNC_FUNCTIONS`` for backup ``schema``, created or replaced (no table lock)."""
    return sql.SQL(SYNC_FUNCTIONS).format(schema=sql.Identifier(schema),
                                          uuid_input=sql.Literal(UUID_INPUT))


NOT_THE_ENGINE = sql.SQL("current_setting('uuid_migration.engine', true) IS DISTINCT FROM 'on'")
"""The WHEN of the engine's triggers: the engine's own sessions set the marker."""


# Every function here takes the backup schema it works in, the plan's
# (``Plan.backup_schema``): each key has its own.


def backup_name(schema: str, table: Table) -> sql.Identifier:
    """The copy of ``schema.table``: ``migration_backup."schema.table"``."""
    return sql.Identifier(schema, str(table))


def quarantine_name(schema: str, table: Table) -> sql.Identifier:
    return sql.Identifier(schema, f"quarantine.{table}")


def meta(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def exists(cur: Cursor, schema: str) -> bool:
    """Whether the backup ``schema`` holds a backup.  Read from the catalog alone: a role
    without USAGE on the schema (verify as a monitoring role) learns it too."""
    cur.execute("SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s)",
                (schema, "backup_tables"))
    row = cur.fetchone()
    return bool(row and row[0])


def unreadable(cur: Cursor, schema: str) -> str | None:
    """Why the current role cannot read the backup ``schema`` (no USAGE on it, or no SELECT
    on one of its tables: it is private to its owner), naming the role and the owner; None
    when it can.  From the catalog alone."""
    cur.execute("SELECT current_user, pg_get_userbyid(n.nspowner), "
                "has_schema_privilege(n.oid, 'USAGE'), "
                "(SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_class c "
                " WHERE c.relnamespace = n.oid AND c.relkind = 'r' "
                " AND NOT has_table_privilege(c.oid, 'SELECT')) "
                "FROM pg_namespace n WHERE n.nspname = %s", (schema,))
    row = cur.fetchone()
    if row is None:
        return None
    role, owner, usage, denied = row
    if usage and not denied:
        return None
    what = f"USAGE on schema {schema}" if not usage else f"SELECT on {schema}.{denied[0]}"
    return (f"the backup in {schema} is private to {owner}: role {role} has no {what}; "
            f"run verify as {owner} for this check")


def recorded_keys(cur: Cursor) -> dict[str, str]:
    """The key each backup schema of the database belongs to: {key spelled as --key takes
    it: backup schema}.  A ``migration_backup`` of an older version records no key: it is
    the runbook key's, in the schema its record of ``users.id`` names."""
    cur.execute("SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s "
                "ORDER BY nspname", (BACKUP_SCHEMA, BACKUP_SCHEMA_LIKE))
    keys: dict[str, str] = {}
    for (schema,) in cur.fetchall():
        if unreadable(cur, schema):
            continue  # private to the migrating role: a reader passes --key, or gets users.id
        found: list[str] = []
        if catalog.relation_exists(cur.connection, meta(schema, KEY_TABLE)):
            cur.execute(sql.SQL("SELECT key FROM {}").format(meta(schema, KEY_TABLE)))
            found = [key for (key,) in cur.fetchall()]
        elif catalog.relation_exists(cur.connection, meta(schema, "key_columns")):
            cur.execute(sql.SQL("SELECT table_schema, table_name, column_name FROM {} "
                                "WHERE (table_name, column_name) = %s").format(
                meta(schema, "key_columns")), (RUNBOOK_KEY,))
            found = [KeyColumn(Table(s, t), c).spec for s, t, c in cur.fetchall()]
        keys.update((key, schema) for key in found)
    return keys


def columns_of(cur: Cursor, relation: sql.Identifier) -> list[str]:
    """Column names of a relation in their order (dropped and temporary ones excluded)."""
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (relation.as_string(cur.connection),))
    return [name for (name,) in cur.fetchall()]


def table_checksum(cur: Cursor, relation: sql.Identifier, columns: list[str],
                   unlogged: ChangeLog | None = None) -> tuple[int, int]:
    """(row count, order-independent sum of row hashes) over ``columns`` in that order,
    of every row, or of the rows not in the change log ``unlogged``.

    Naming the columns makes the sum independent of their physical order,
    which the temporary-column swap changes.
    """
    return row_digest(cur, relation, column_list(columns, "r"),
                      unlogged or ChangeLog("", Table("", ""), (), frozenset()))


def row_digest(cur: Cursor, relation: sql.Identifier, values: sql.Composable,
               log: ChangeLog) -> tuple[int, int]:
    """The rows of ``relation`` (aliased ``r``) not in the change log ``log``, reduced to
    their count and the sum of a 64-bit hash of each row's ``values``: one scan.  The sum
    of bigints is a numeric, exact whatever the rows, and faster than summing each hash
    cast to numeric (the same value, so checksums recorded before still compare)."""
    cur.execute(sql.SQL(
        "WITH {logged} SELECT count(*), coalesce(sum(hashtextextended(ROW({values})::text, 0)), "
        "0) FROM {rel} r WHERE NOT {holds}").format(
        logged=log.cte(), values=values, rel=relation, holds=log.holds("r")), log.params)
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


CHANGE_LOG_TRIGGER = "migration_change_log"
"""The change log's trigger of the runbook key's backup (``change_log_trigger``)."""


def change_log_trigger(schema: str) -> str:
    """The name of the change log's trigger of backup ``schema`` on each table: each key's
    own, so that two keys whose plans share a table each log its writes, and the cleanup of
    one (its schema dropped, with its triggers) leaves the other's logging."""
    return fit_name(CHANGE_LOG_TRIGGER + schema.removeprefix(BACKUP_SCHEMA))


def change_log_truncate_trigger(schema: str) -> str:
    """The name of the change log's statement trigger ``AFTER TRUNCATE`` (row triggers do
    not see a TRUNCATE) of backup ``schema`` on each table."""
    return fit_name(CHANGE_LOG_TRIGGER + "_truncate" + schema.removeprefix(BACKUP_SCHEMA))


def start_change_log(cur: Cursor, plan: Plan) -> None:
    """Create the change log and its triggers on the plan's tables (idempotent).

    CREATE TRIGGER takes SHARE ROW EXCLUSIVE on each table: it waits for the
    writers under way and blocks new ones until commit, so the caller runs
    this with a short lock_timeout, and the tables are locked first, in a fixed
    order, all ``NOWAIT`` until ``Session.ddl`` lets the first wait (``lock_tables``):
    the application is never queued behind one table's lock while this waits for another's.
    What the triggers need from the catalog (each table's logged columns and partitions)
    is read first, under SHARE UPDATE EXCLUSIVE, which stops DDL but not the application,
    and every table's statements go in one round trip: the write-blocking lock is held for
    two round trips (the locks, the statements) and the commit, not 28 (issue 22).
    """
    schema = plan.backup_schema
    function = sql.Identifier(schema, CHANGE_LOG_FUNCTION)
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(schema)))
    record_key(cur, plan)
    cur.execute(sql.SQL(_CHANGE_LOG).format(schema=sql.Identifier(schema), function=function))
    tables = [table.ident for table in sorted(plan.tables)]
    lock_tables(cur, tables, "SHARE UPDATE EXCLUSIVE")
    statements: list[sql.Composable] = []
    for table in sorted(plan.tables):
        columns = logged_columns(cur, plan, table)
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT "
                            "(table_schema, table_name) DO UPDATE SET key_columns = "
                            "excluded.key_columns").format(meta(schema, "logged_tables")),
                    (table.schema, table.name, columns))
        statements.append(sql.SQL("; ").join(log_table_statements(cur, schema, table, columns)))
    lock_tables(cur, tables, "SHARE ROW EXCLUSIVE")
    cur.execute(sql.SQL("; ").join(statements))


def log_table(cur: Cursor, schema: str, table: Table, columns: list[str]) -> None:
    """The change log's triggers on ``table`` (``log_table_statements``), in one round trip."""
    cur.execute(sql.SQL("; ").join(log_table_statements(cur, schema, table, columns)))


def log_table_statements(cur: Cursor, schema: str, table: Table,
                         columns: list[str]) -> list[sql.Composable]:
    """The change log's triggers on ``table``, ENABLE ALWAYS in this same transaction: a
    row trigger logging the key of every row written, and a statement trigger logging a
    TRUNCATE.  Writes with ``session_replication_role = replica`` (logical replication's
    apply, ``pg_restore --disable-triggers``, bulk loaders) fire them too.

    On a partitioned table the row trigger is cloned onto every partition (the
    log names the partition a row was written in, which ``ChangeLog`` reads as
    the table's), but a statement trigger is not, and a TRUNCATE of one
    partition fires only that partition's: each partition gets its own.
    """
    function = meta(schema, CHANGE_LOG_FUNCTION)
    row, truncate = change_log_trigger(schema), change_log_truncate_trigger(schema)
    statements: list[sql.Composable] = [sql.SQL(
        "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {table} "
        "FOR EACH ROW WHEN ({mine}) EXECUTE FUNCTION {function}({args})"
    ).format(name=sql.Identifier(row), table=table.ident, mine=NOT_THE_ENGINE,
             function=function, args=sql.SQL(", ").join(map(sql.Literal, columns)))]
    always = [(table, row)]
    for relation in (table, *catalog.partitions(cur.connection, table)):
        statements.append(sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER TRUNCATE ON {table} "
            "FOR EACH STATEMENT WHEN ({mine}) EXECUTE FUNCTION {function}()"
        ).format(name=sql.Identifier(truncate), table=relation.ident, mine=NOT_THE_ENGINE,
                 function=function))
        always.append((relation, truncate))
    for relation, name in always:  # CREATE OR REPLACE makes a trigger ENABLE ORIGIN again
        statements.append(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(
            relation.ident, sql.Identifier(name)))
    return statements


def change_log_is_current(cur: Cursor, schema: str, table: Table) -> bool:
    """Whether ``table`` has both of this version's change log triggers, ENABLE ALWAYS (a
    backup an older version took has one, ENABLE ORIGIN), or no change log at all."""
    cur.execute("SELECT count(*) FILTER (WHERE tgname = %(row)s), "
                "count(*) FILTER (WHERE tgenabled = 'A') FROM pg_trigger "
                "WHERE tgrelid = to_regclass(%(table)s) AND tgname IN (%(row)s, %(truncate)s)",
                {"table": catalog.regclass(table), "row": change_log_trigger(schema),
                 "truncate": change_log_truncate_trigger(schema)})
    logged, always = cur.fetchone() or (0, 0)
    return not logged or always == 2


def upgrade_change_log(cur: Cursor, schema: str, table: Table) -> None:
    """Bring the change log on ``table`` that an older version started up to this one's:
    its function (which logs TRUNCATE now) and its triggers, by the columns it logged."""
    cur.execute(sql.SQL(_CHANGE_LOG).format(schema=sql.Identifier(schema),
                                            function=meta(schema, CHANGE_LOG_FUNCTION)))
    cur.execute(sql.SQL("SELECT key_columns FROM {} WHERE (table_schema, table_name) = "
                        "(%s, %s)").format(meta(schema, "logged_tables")),
                (table.schema, table.name))
    row = cur.fetchone()
    if row is not None:
        log_table(cur, schema, table, list(row[0]))


def record_key(cur: Cursor, plan: Plan) -> None:
    """Write down which key the backup schema belongs to; refuse a schema of another key's
    (two keys whose names make the same schema name)."""
    table = meta(plan.backup_schema, KEY_TABLE)
    cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY)").format(table))
    cur.execute(sql.SQL("SELECT key FROM {}").format(table))
    other = [key for (key,) in cur.fetchall() if key != plan.key]
    if other:
        raise MigrationError(f"the backup schema {plan.backup_schema} belongs to the key "
                             f"{other[0]}, not to {plan.key}",
                             hint=f"finish that key's migration and its cleanup_backup first "
                                  f"(--key {other[0]})")
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s) ON CONFLICT DO NOTHING").format(table),
                (plan.key,))


def logged_columns(cur: Cursor, plan: Plan, table: Table) -> list[str]:
    """What identifies a row of ``table`` in the change log: its primary key, or else
    its key columns (the columns a table without a primary key is compared by)."""
    return catalog.primary_key(cur.connection, table) or [
        key.column for key in plan.columns if key.table == table]




@dataclass(frozen=True)
class ChangeLog:
    """The rows of one table the application wrote since the backup, as SQL to match rows with.

    A row is in the log when each of its logged columns equals the logged
    key, NULL matching NULL: key columns of the plan as uuid (the backup holds
    strings, the live table uuid after the swap, and the application may have
    written any spelling; a logged value that is not a UUID matches no row),
    other columns by value.  The key is compared as one jsonb array, which
    the server hashes.  A TRUNCATE in the log holds every row: the backup's
    rows all went by the application's hand, and the rows since are logged.
    Queries using it start with ``WITH {cte}`` and pass ``params``.
    """

    schema: str  # the backup schema
    table: Table
    columns: tuple[str, ...]  # empty: the table is not logged (a backup older than the log)
    converted: frozenset[str]

    def cte(self) -> sql.Composable:
        """``logged``: the distinct keys logged for the table, read once per query, each
        with its ``ident`` (what ``matches`` compares; NULL for a TRUNCATE) and whether it
        is a TRUNCATE's (``truncated``)."""
        if not self.columns:
            return sql.SQL("logged AS MATERIALIZED (SELECT NULL::jsonb AS row_key, "
                           "NULL::jsonb AS ident, false AS truncated WHERE false)")
        values = sql.SQL(", ").join(
            sql.SQL("CASE WHEN c.row_key ->> {k} ~ {syntax} THEN to_jsonb((c.row_key ->> {k})"
                    "::uuid) ELSE c.row_key -> {k} END" if column in self.converted
                    else "c.row_key -> {k}").format(k=sql.Literal(column),
                                                    syntax=sql.Literal(UUID_INPUT))
            for column in self.columns)
        return sql.SQL(
            "logged AS MATERIALIZED (SELECT DISTINCT c.row_key, CASE WHEN c.operation <> "
            "'TRUNCATE' THEN jsonb_build_array({values}) END AS ident, c.operation = "
            "'TRUNCATE' AS truncated FROM {log} c WHERE (c.table_schema, c.table_name) IN "
            "(SELECT %(log_schema)s, %(log_table)s UNION ALL {partitions}))").format(
            values=values, log=meta(self.schema, "change_log"), partitions=sql.SQL(
                "SELECT n.nspname::text, r.relname::text "
                "FROM pg_partition_tree(to_regclass(%(log_relation)s)) t "
                "JOIN pg_class r ON r.oid = t.relid "
                "JOIN pg_namespace n ON n.oid = r.relnamespace"))

    @property
    def params(self) -> dict[str, str]:
        """The table's own entries and its partitions' (where its rows were written, and
        a TRUNCATE of one partition, read as the table's: the rows it held are not told
        apart from the other partitions' backup rows)."""
        return {"log_schema": self.table.schema, "log_table": self.table.name,
                "log_relation": catalog.regclass(self.table)}

    def holds(self, row: str) -> sql.Composable:
        """Whether the row aliased ``row`` is one the log names (any row, once the table
        was truncated)."""
        if not self.columns:
            return sql.SQL("false")
        return sql.SQL("(EXISTS (SELECT 1 FROM logged g WHERE g.truncated) "
                       "OR EXISTS (SELECT 1 FROM logged g WHERE {}))").format(
            self.matches(row, "g"))

    def matches(self, row: str, logged: str) -> sql.Composable:
        """Whether the row aliased ``row`` has the key ``logged.ident`` (jsonb_build_array
        makes a NULL JSON's null, so NULL matches NULL)."""
        return sql.SQL("{}.ident = jsonb_build_array({})").format(
            sql.Identifier(logged), sql.SQL(", ").join(
                sql.SQL("to_jsonb(({})::uuid)" if column in self.converted
                        else "to_jsonb({})").format(sql.Identifier(row, column))
                for column in self.columns))

    def not_uuids(self, cur: Cursor) -> tuple[int, list[dict[str, Any]]]:
        """The logged keys whose value in a key column of the plan is not a UUID (the
        application wrote it, and they match no row): how many, and the first of them."""
        converted = [column for column in self.columns if column in self.converted]
        if not converted:
            return 0, []
        cur.execute(sql.SQL(
            "WITH {logged} SELECT count(*) OVER (), row_key FROM logged g "
            "WHERE NOT g.truncated AND ({odd}) ORDER BY row_key LIMIT %(n)s").format(
            logged=self.cte(), odd=sql.SQL(" OR ").join(
                sql.SQL("g.row_key ->> {} !~ %(syntax)s").format(sql.Literal(column))
                for column in converted)),
            {**self.params, "syntax": UUID_INPUT, "n": SAMPLE_LIMIT})
        rows = cur.fetchall()
        return (int(rows[0][0]) if rows else 0), [dict(key) for _, key in rows]

    def truncated(self, cur: Cursor) -> bool:
        """Whether the application truncated the table since the backup."""
        cur.execute(sql.SQL("WITH {} SELECT EXISTS (SELECT 1 FROM logged WHERE truncated)")
                    .format(self.cte()), self.params)
        return bool((cur.fetchone() or [False])[0])


def change_log(cur: Cursor, schema: str, table: Table, keys: list[KeyColumn]) -> ChangeLog:
    """The change log of ``table``, whose key columns are ``keys``, in backup ``schema``."""
    columns: tuple[str, ...] = ()
    logged = meta(schema, "logged_tables")
    if catalog.relation_exists(cur.connection, logged):
        cur.execute(sql.SQL("SELECT key_columns FROM {} WHERE (table_schema, table_name) = "
                            "(%s, %s)").format(logged), (table.schema, table.name))
        row = cur.fetchone()
        columns = tuple(row[0]) if row else ()
    return ChangeLog(schema, table, columns, frozenset(key.column for key in keys))


RECORD_TABLE = "recorded_objects"
"""The backup's record of the tables (``recorded.record``), committed with the copy."""


def saved_record(cur: Cursor, schema: str) -> dict[str, Any] | None:
    """The record the backup holds; None when it holds none (a backup of a version that
    wrote it to migration_log only)."""
    table = meta(schema, RECORD_TABLE)
    if not catalog.relation_exists(cur.connection, table):
        return None
    cur.execute(sql.SQL("SELECT record FROM {}").format(table))
    row = cur.fetchone()
    return None if row is None else dict(row[0])


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


def shared_privileges(cur: Cursor, schema: str) -> list[SharedPrivilege]:
    """Who else may use the backup (it holds every original id): read from the catalog only."""
    cur.execute(sql.SQL(
        "SELECT target, CASE WHEN grantee = 0 THEN NULL ELSE pg_get_userbyid(grantee) END, "
        "string_agg(privilege_type, ', ' ORDER BY privilege_type) FROM ({}) p "
        "WHERE grantee <> owner GROUP BY 1, 2 ORDER BY 1, 2 NULLS FIRST").format(
        sql.SQL(_SHARED)), {"schema": schema})
    return [SharedPrivilege(*row) for row in cur.fetchall()]


def make_private(cur: Cursor, name: str) -> None:
    """Revoke what default privileges (ALTER DEFAULT PRIVILEGES) gave others on the backup
    schema, its tables and sequences (the change log's) as they were created: the backup
    is the migrating role's alone."""
    schema = sql.Identifier(name)
    for grantee in sorted({p.grantee or "" for p in shared_privileges(cur, name)}):
        role = sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC")
        cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {s} FROM {r}; "
                            "REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {r}; "
                            "REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {r}").format(
            s=schema, r=role))


def create_private(cur: Cursor, table: sql.Identifier, create: sql.Composable) -> None:
    """A table of the backup schema created after the backup (quarantined rows, the names
    chosen, the views to refresh), unless it exists: made private as the backup's own
    tables were (default privileges may give it to others as it is created)."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(cur),))
    if (cur.fetchone() or [False])[0]:
        return
    cur.execute(create)
    make_private(cur, table.strings[0])


def recorded_checksums(cur: Cursor, schema: str) -> list[tuple[Table, int, int]]:
    cur.execute(sql.SQL("SELECT table_schema, table_name, row_count, checksum FROM {} "
                        "ORDER BY 1, 2").format(meta(schema, "backup_tables")))
    return [(Table(s, t), int(n), int(c)) for s, t, n, c in cur.fetchall()]


def saved_indexes(cur: Cursor, schema: str, key: KeyColumn) -> list[IndexDef]:
    cur.execute(sql.SQL("SELECT name, definition, constraint_type, is_deferrable, is_deferred "
                        "FROM {} WHERE table_schema = %s AND table_name = %s "
                        "AND column_name = %s ORDER BY constraint_type NULLS LAST, name").format(
        meta(schema, "saved_indexes")), (key.table.schema, key.table.name, key.column))
    return [IndexDef(key.table, name, definition, contype, deferrable, deferred,
                     uses_expression=False)
            for name, definition, contype, deferrable, deferred in cur.fetchall()]


def saved_foreign_keys(cur: Cursor, schema: str,
                       key: KeyColumn | None = None) -> list[ForeignKeyDef]:
    """FKs to the parent recorded at backup time: all of them, or those from ``key``."""
    cur.execute(sql.SQL("SELECT table_schema, table_name, column_name, name, definition, "
                        "validated FROM {} ORDER BY 1, 2, 4").format(
                            meta(schema, "saved_foreign_keys")))
    found = [ForeignKeyDef(Table(s, t), c, n, d, v) for s, t, c, n, d, v in cur.fetchall()]
    return [fk for fk in found
            if key is None or (fk.table, fk.column) == (key.table, key.column)]


def saved_grants(cur: Cursor, schema: str, key: KeyColumn) -> list[catalog.ColumnGrant]:
    cur.execute(sql.SQL("SELECT column_grants FROM {} WHERE "
                        "(table_schema, table_name, column_name) = (%s, %s, %s)").format(
        meta(schema, "key_columns")), (key.table.schema, key.table.name, key.column))
    row = cur.fetchone()
    return [catalog.ColumnGrant(**grant) for grant in (row[0] if row else [])]


_TYPE_NAME = re.compile(r'(?:[a-z_][a-z0-9_$ ]*|"(?:[^"]|"")+")'
                        r'(?:\.(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+"))?'
                        r'(?:\(\d+(?:,\d+)?\))?(?:\[\])*')
"""format_type's output: a name, maybe schema-qualified and quoted, a type modifier."""


def recorded_type(cur: Cursor, schema: str, key: KeyColumn) -> sql.Composable:
    """The string type the backup recorded for ``key``, as SQL for the copy column on the
    way back.  The record is not trusted as text: it must read as format_type writes a
    type name, and name a type the server knows."""
    text = saved_column(cur, schema, key).type
    known = False
    if _TYPE_NAME.fullmatch(text):
        cur.execute("SAVEPOINT recorded_type")
        try:  # to_regtype raises on a syntax error before PostgreSQL 16
            cur.execute("SELECT to_regtype(%s) IS NOT NULL", (text,))
            known = bool((cur.fetchone() or [False])[0])
        except psycopg2.Error:
            cur.execute("ROLLBACK TO SAVEPOINT recorded_type")
        cur.execute("RELEASE SAVEPOINT recorded_type")
    if not known:
        raise MigrationError(f"the backup's record of the type of {key} ({text!r}) is not "
                             "the name of a type", hint=f"check {schema}.key_columns: it is "
                             "the type the rollback gives the column")
    return sql.SQL(text)


ENGINE_NAMES = """
CREATE TABLE IF NOT EXISTS {} (
    table_schema text NOT NULL, table_name text NOT NULL, column_name text NOT NULL,
    back boolean NOT NULL, copy_column text NOT NULL, sync_trigger text NOT NULL,
    fill_proof text NOT NULL, not_null_proof text NOT NULL,
    chosen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name, column_name, back))
"""
PENDING_REFRESH = """
CREATE TABLE IF NOT EXISTS {} (view_schema text NOT NULL, view_name text NOT NULL,
    depth int NOT NULL, PRIMARY KEY (view_schema, view_name))
"""
PUBLISHED_COLUMNS = """
CREATE TABLE IF NOT EXISTS {} (publication text NOT NULL, table_schema text NOT NULL,
    table_name text NOT NULL, PRIMARY KEY (publication, table_schema, table_name))
"""
"""Tables of the backup schema the steps after the backup write (``record_names``,
``views.mark_pending``, ``publications.narrow``): created with the backup, and by those
steps in a backup an older version made (``create_private``)."""


def record_names(cur: Cursor, schema: str, key: KeyColumn) -> None:
    """Record the names the engine gives ``key``'s temporary objects, as it creates them
    (``plan.with_free_names`` chose them): for the operator, who sees them in ``status``.
    The engine itself finds its objects by its copy column's mark."""
    names = meta(schema, "engine_names")
    create_private(cur, names, sql.SQL(ENGINE_NAMES).format(names))
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (table_schema, table_name, column_name, back) DO UPDATE "
                        "SET (copy_column, sync_trigger, fill_proof, not_null_proof, chosen_at)"
                        " = (EXCLUDED.copy_column, EXCLUDED.sync_trigger, EXCLUDED.fill_proof,"
                        " EXCLUDED.not_null_proof, now())").format(names),
                (key.table.schema, key.table.name, key.column, key.back, key.temp,
                 key.helper("sync"), key.helper("filled"), key.helper("not_null")))


def chosen_names(cur: Cursor, schema: str) -> list[str]:
    """The keys whose temporary objects got names other than the first (the application
    had taken those), as ``status`` shows them."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                (meta(schema, "engine_names").as_string(cur),))
    if not (cur.fetchone() or [False])[0]:
        return []
    cur.execute(sql.SQL("SELECT table_schema, table_name, column_name, back, copy_column, "
                        "sync_trigger FROM {} ORDER BY 1, 2, 3, 4").format(
        meta(schema, "engine_names")))
    return [f"{schema_}.{table}.{column}{' (back)' if back else ''}: copy {copy}, "
            f"trigger {trigger} (the first names are the application's)"
            for schema_, table, column, back, copy, trigger in cur.fetchall()
            if copy != KeyColumn(Table(schema_, table), column, back=back).temp]


def saved_column(cur: Cursor, schema: str, key: KeyColumn) -> catalog.ColumnInfo:
    cur.execute(sql.SQL("SELECT type, true, not_null, default_expr FROM {} "
                        "WHERE (table_schema, table_name, column_name) = (%s, %s, %s)").format(
        meta(schema, "key_columns")), (key.table.schema, key.table.name, key.column))
    row = cur.fetchone()
    if row is None:
        raise MigrationError(f"the backup has no record of {key}",
                             hint="the backup predates this plan; run rollback, then "
                                  "cleanup_backup --force and start again")
    return catalog.ColumnInfo(*row)


def quarantined_rows(cur: Cursor, schema: str) -> dict[str, int]:
    """Rows held in each quarantine table now (they exist nowhere else)."""
    if not exists(cur, schema):
        return {}
    cur.execute(sql.SQL("SELECT quarantine_table FROM {} ORDER BY 1").format(
        meta(schema, "quarantine")))
    held = {}
    for (name,) in cur.fetchall():
        relation = sql.Identifier(schema, name)
        if catalog.relation_exists(cur.connection, relation):
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(relation))
            rows = int((cur.fetchone() or [0])[0])
            if rows:
                held[f"{schema}.{name}"] = rows
    return held


def require(cur: Cursor, plan: Plan, operation: str) -> None:
    """Refuse ``operation`` without the backup, or with its change log stopped (a rollback
    stops it): the application's writes from then on would not be told from losses."""
    schema = plan.backup_schema
    if not exists(cur, schema):
        raise MigrationError(f"{operation} needs the backup in {schema}, and there is none",
                             hint="run --operation=backup_data first")
    stopped = change_log_stopped(cur, plan)
    if stopped:
        raise MigrationError(f"{operation} needs the change log of the backup in {schema}, "
                             f"and it is stopped on {', '.join(map(str, stopped))} (a rollback "
                             "stopped it)", hint="run --operation=backup_data first: it starts "
                                                 "the log again")


def change_log_stopped(cur: Cursor, plan: Plan) -> list[Table]:
    """The plan's tables the backup's change log was started on whose trigger is gone."""
    logged = meta(plan.backup_schema, "logged_tables")
    if not catalog.relation_exists(cur.connection, logged):
        return []  # a backup older than the change log: nothing was ever logged
    cur.execute(sql.SQL("SELECT table_schema, table_name FROM {} l WHERE NOT EXISTS ("
                        "SELECT FROM pg_trigger t WHERE t.tgname = %s AND t.tgrelid = "
                        "to_regclass(format('%%I.%%I', l.table_schema, l.table_name))) "
                        "ORDER BY 1, 2").format(logged),
                (change_log_trigger(plan.backup_schema),))
    return [Table(*row) for row in cur.fetchall() if Table(*row) in plan.tables]


def change_log_size(cur: Cursor, schema: str) -> tuple[int, int]:
    """(rows, bytes on disk, indexes included) of the backup's change log."""
    table = meta(schema, "change_log")
    if not catalog.relation_exists(cur.connection, table):
        return 0, 0
    cur.execute(sql.SQL("SELECT count(*), pg_total_relation_size(%s::regclass) FROM {}").format(
        table), (table.as_string(cur.connection),))
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
