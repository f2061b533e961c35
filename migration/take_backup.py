"""Taking the backup (``backup_data``): each table of the plan copied into the key's backup
schema from one snapshot, counted and checksummed, the key columns' definitions saved, and
the record of what the tables look like (``recorded.record``), all in one transaction; or an
existing backup kept when it is this data's.

The backup's storage, which the rest of the engine reads and writes (its tables, the change
log, the saved definitions), is ``backup.py``: this module is the one that needs the record,
and so the views, which need the storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import Json

from migration import backup, catalog, recorded
from migration.catalog import ColumnState
from migration.connection import lift_statement_timeout
from migration.errors import MigrationError
from migration.log import recorded_in_log
from migration.model import KeyColumn, Table
from migration.plan import Plan


@dataclass(frozen=True)
class BackupResult:
    rows: int  # rows copied; 0 when an existing backup was kept
    message: str
    expectations: dict[str, Any] = field(default_factory=dict)
    """What the migrated database must have again (FKs, indexed columns), for the log."""


AfterBatch = Callable[[Table, int, float], None]
"""Called after each batch of a batched copy with its table, its rows, and when it began."""


def create(cur: Cursor, plan: Plan, *, batch_size: int = 0,
           after_batch: AfterBatch | None = None) -> BackupResult:
    """Copy every table of the plan and record what the swap will drop.

    Runs as the first statements of the caller's transaction, after the
    change log has started: the transaction becomes REPEATABLE READ, so every
    copy, count and checksum comes from one snapshot, and takes no lock
    stronger than ACCESS SHARE on the tables: the application keeps writing,
    and what it writes from now on is in the change log.  Log entries the
    snapshot already sees are deleted: their rows are in the copy as they are.
    Before commit, the rows copied and the rows in the copy are counted
    against the table (the runbook's criterion); the copy's checksum is
    recorded for the rollback to prove its restore against.  With ``batch_size``
    (``--max-rows-per-second``) each table is copied in batches (``copy_table``).
    """
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    lift_statement_timeout(cur)  # the copy reads whole tables
    if batch_size:  # paced: the transaction waits between its statements
        cur.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
    schema = plan.backup_schema
    if backup.exists(cur, schema):
        return reuse(cur, plan)
    cur.execute(sql.SQL(backup._META).format(schema=sql.Identifier(schema)))
    cur.execute(sql.SQL(backup.ENGINE_NAMES).format(backup.meta(schema, "engine_names")))
    cur.execute(sql.SQL(backup.PENDING_REFRESH).format(backup.meta(schema, "pending_refresh")))
    cur.execute(sql.SQL(backup.PUBLISHED_COLUMNS).format(backup.meta(schema, "published_columns")))
    cur.execute(sql.SQL("DELETE FROM {}").format(backup.meta(schema, "change_log")))
    total = 0
    for table in plan.tables:
        copy = backup.backup_name(schema, table)
        copied = copy_table(cur, copy, table, batch_size, after_batch)
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
        source_rows = int((cur.fetchone() or [-1])[0])
        copy_sum = backup.table_checksum(cur, copy, backup.columns_of(cur, copy))
        if not source_rows == copied == copy_sum[0]:
            raise MigrationError(f"backup of {table} does not match the table ({source_rows} "
                                 f"rows, {copied} copied, {copy_sum[0]} in the copy)",
                                 hint="nothing was kept; check the server log and run again")
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(
            backup.meta(schema, "backup_tables")),
            (table.schema, table.name, copy.strings[1], *copy_sum))
        total += copied
    for key in plan.columns:
        save_definitions(cur, schema, key)
    for fk in catalog.foreign_keys_to(cur.connection, plan.parent):
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(
            backup.meta(schema, "saved_foreign_keys")),
            (fk.table.schema, fk.table.name, fk.column, fk.name, fk.definition, fk.validated))
    record = expectations(cur, plan)
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(
        backup.meta(schema, backup.RECORD_TABLE)), (Json(record),))
    backup.make_private(cur, schema)
    return BackupResult(total, f"backed up {len(plan.tables)} tables, {total:,} rows", record)


def copy_table(cur: Cursor, copy: sql.Identifier, table: Table, batch_size: int,
               after_batch: AfterBatch | None) -> int:
    """Create ``copy`` holding the rows of ``table``; rows copied.

    In one statement; with ``batch_size``, in batches of about that many rows,
    each a range of the table's pages (a TID range scan), ``after_batch`` called
    after each (the pace's wait).  Every batch reads the transaction's one
    snapshot, so the copy is the same as one statement's: a row version the
    snapshot sees does not move while the snapshot lives, and the last batch has
    no end page, so a row the snapshot sees on a page added since the pages were
    counted is copied too.  The transaction stays open for the whole copy, as
    one statement's does, only longer: it holds back VACUUM's horizon as long.
    """
    if not batch_size:
        cur.execute(sql.SQL("CREATE TABLE {} AS TABLE {}").format(copy, table.ident))
        return int(cur.rowcount)
    cur.execute(sql.SQL("CREATE TABLE {} AS TABLE {} WITH NO DATA").format(copy, table.ident))
    pages = catalog.heap_pages(cur.connection, table)
    rows = catalog.estimated_rows(cur.connection, table)
    step = max(1, batch_size * pages // rows) if rows > 0 else max(pages, 1)
    copied, start = 0, 0
    while True:
        started = time.monotonic()
        last = start + step >= pages
        cur.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE ctid >= %s::tid{}").format(
            copy, table.ident, sql.SQL("" if last else " AND ctid < %s::tid")),
            (f"({start},0)", *(() if last else (f"({start + step},0)",))))
        copied += cur.rowcount
        if after_batch is not None:
            after_batch(table, cur.rowcount, started)
        if last:
            return copied
        start += step


def expectations(cur: Cursor, plan: Plan) -> dict[str, Any]:
    """What the migrated database must have again, by name (``recorded.record``): kept in
    the backup with the copy, and in migration_log so that verify knows it after
    cleanup_backup dropped the backup."""
    return recorded.record(cur, plan)


def reuse(cur: Cursor, plan: Plan) -> BackupResult:
    """A backup exists: keep it if it is this data's backup, refuse otherwise.

    This data's backup: the table equals it, or every row outside the change
    log does (the application writes while the migration is under way).
    """
    states = {catalog.column_state(cur.connection, key) for key in plan.columns}
    if states != {ColumnState.STRING}:
        return BackupResult(0, "backup kept: the migration is under way",
                            kept_record(cur, plan, under_way=True))
    written = []
    schema = plan.backup_schema
    for table, count, checksum in backup.recorded_checksums(cur, schema):
        columns = backup.columns_of(cur, backup.backup_name(schema, table))
        if backup.table_checksum(cur, table.ident, columns) == (count, checksum):
            continue
        written.append(str(table))
        log = backup.change_log(cur, schema, table,
                                [key for key in plan.columns if key.table == table])
        if not log.columns or (backup.table_checksum(cur, table.ident, columns, log)
                               != backup.table_checksum(cur, backup.backup_name(schema, table),
                                                        columns, log)):
            raise MigrationError(
                f"a backup already exists in {schema} and {table} no longer matches it",
                hint="inspect the backup; drop it with cleanup_backup (--force unless a "
                     "rollback was the last change) to take a new one")
    record = kept_record(cur, plan, under_way=False)
    if written:
        return BackupResult(0, "backup already present and identical to the data, rows the "
                               f"application changed since excepted ({', '.join(written)}); "
                               "kept", record)
    return BackupResult(0, "backup already present and identical to the data; kept", record)


def kept_record(cur: Cursor, plan: Plan, *, under_way: bool) -> dict[str, Any]:
    """The record of the tables a kept backup holds, completed when it holds none.

    A backup of an older version holds none: that version wrote it to
    migration_log only, after the copy had committed, and a crash in between
    lost it.  It is taken from migration_log when it is there; else, while
    the tables are as the backup holds them (not ``under_way``), it is read
    now, as the backup would have recorded it.  Under way, nothing can tell
    what the tables looked like: refused, with what to do.
    """
    schema = plan.backup_schema
    record = backup.saved_record(cur, schema)
    if record is not None:
        return record
    record = recorded_in_log(cur, plan.schema, plan.key)
    if record is None and under_way:
        raise MigrationError(
            f"the backup in {schema} holds no record of the tables' indexes, constraints and "
            "columns (it was taken by an older version, which wrote it to migration_log only, "
            "and it is not there): verify could not compare the migration with it",
            hint="run --operation=rollback, then --operation=backup_data again: with the "
                 "tables back as the backup holds them, it records them")
    if record is None:
        record = expectations(cur, plan)
    table = backup.meta(schema, backup.RECORD_TABLE)
    backup.create_private(cur, table,
                          sql.SQL("CREATE TABLE {} (record jsonb NOT NULL)").format(table))
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), (Json(record),))
    return record


def save_definitions(cur: Cursor, schema: str, key: KeyColumn) -> None:
    conn = cur.connection
    info = catalog.column_info(conn, key.table, key.column)
    assert info is not None
    grants = [asdict(g) for g in catalog.column_grants(conn, key.table, key.column)]
    cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
        backup.meta(schema, "key_columns")),
        (key.table.schema, key.table.name, key.column, info.type, info.not_null, info.default,
         Json(grants)))
    for ix in catalog.indexes_on(conn, key):
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT DO NOTHING").format(backup.meta(schema, "saved_indexes")),
                    (key.table.schema, key.table.name, key.column, ix.name, ix.definition,
                     ix.constraint_type, ix.deferrable, ix.deferred))
