"""Undoing the migration from any stage, and the orphan quarantine it restores.

A rollback is one transaction: it either leaves the tables exactly as the
backup recorded them (types, defaults, constraints and indexes by name, every
row with the original spelling of every id, quarantined rows back in place)
or changes nothing.  Being atomic makes it resumable for free: an
interrupted rollback has not happened, and running it again does all of it.
Before it commits it compares each table with the backup's checksum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog
from migration.catalog import ColumnState
from migration.convert import recreate_index
from migration.errors import MigrationError
from migration.model import KeyColumn, Table
from migration.preflight import orphan_condition
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.session import Session
from migration.sqlexpr import column_list


def quarantine(session: Session, cur: Cursor, *, key: KeyColumn) -> int:
    """Move the orphan rows of ``key`` into the backup schema; rows moved."""
    cur.execute("SELECT conname, conrelid::regclass::text FROM pg_constraint "
                "WHERE contype = 'f' AND confrelid = to_regclass(%s)",
                (catalog.regclass(key.table),))
    referencing = cur.fetchall()
    if referencing:
        raise MigrationError(
            f"cannot quarantine rows of {key.table}: other tables reference it "
            f"({', '.join(f'{t} ({c})' for c, t in referencing)}), and moving rows would "
            "cascade to them", hint="resolve the orphans by hand, then run again")
    columns = [c for c in backup.columns_of(cur, key.table.ident) if c != key.temp]
    target = backup.quarantine_name(key.table)
    cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
        target, column_list(columns), key.table.ident))
    cur.execute(sql.SQL(
        "WITH moved AS (DELETE FROM {table} t WHERE {orphan} RETURNING {cols}) "
        "INSERT INTO {target} ({plain}) SELECT {plain} FROM moved").format(
        table=key.table.ident, orphan=orphan_condition(cur, key, session.plan.parent),
        cols=column_list(columns, "t"), target=target, plain=column_list(columns)))
    moved = cur.rowcount
    cur.execute(sql.SQL(
        "INSERT INTO {} VALUES (%s, %s, %s, %s) ON CONFLICT (table_schema, table_name) "
        "DO UPDATE SET row_count = quarantine.row_count + excluded.row_count").format(
        backup.meta("quarantine")), (key.table.schema, key.table.name, target.strings[1], moved))
    return int(moved)


@dataclass
class RollbackResult:
    message: str
    rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _keys_by_table(session: Session) -> dict[Table, list[KeyColumn]]:
    grouped: dict[Table, list[KeyColumn]] = {}
    for key in session.plan.columns:
        grouped.setdefault(key.table, []).append(key)
    return grouped


def _pk_join(pk: list[str], converted: set[str]) -> sql.Composable:
    """Live row l to backup row b by primary key, whatever type the key has now."""
    return sql.SQL(" AND ").join(
        sql.SQL("l.{p} = (b.{p})::uuid" if p in converted else "l.{p} = b.{p}").format(
            p=sql.Identifier(p)) for p in pk)


def changed_rows(cur: Cursor, session: Session) -> list[Finding]:
    """Rows inserted, changed or deleted since the backup, table by table.

    The application's writes are counted from the change log; any other
    difference from the backup (a write the log did not see) is reported
    apart, and either makes the rollback refuse without --keep-changes.
    """
    findings = []
    for table, keys in _keys_by_table(session).items():
        log = backup.change_log(cur, table, keys)
        ignored = [k.column for k in keys] + [k.temp for k in keys]
        findings += _logged_changes(cur, table, log, ignored)
        findings += _unlogged_changes(cur, table, keys, log, ignored)
    return findings


def _logged_changes(cur: Cursor, table: Table, log: backup.ChangeLog,
                    ignored: list[str]) -> list[Finding]:
    """The rows in the change log, each with its last logged write and its row now
    (or in the backup, once deleted)."""
    if not log.columns:
        return []
    cur.execute(sql.SQL(
        """
        WITH {logged}, last AS (
            SELECT g.row_key, (SELECT c.operation FROM {change_log} c
                               WHERE (c.table_schema, c.table_name, c.row_key)
                                     = (%(log_schema)s, %(log_table)s, g.row_key)
                               ORDER BY c.id DESC LIMIT 1) AS operation
            FROM logged g)
        SELECT g.kind, g.total, coalesce(to_jsonb(l) - %(ignored)s::text[],
                                         to_jsonb(b) - %(ignored)s::text[], g.row_key)
        FROM (SELECT CASE operation WHEN 'INSERT' THEN 'inserted' WHEN 'DELETE' THEN 'deleted'
                                    ELSE 'changed' END AS kind, count(*) OVER () AS total, row_key
              FROM last ORDER BY 1, row_key LIMIT %(n)s) g
        LEFT JOIN {live} l ON {in_live}
        LEFT JOIN {copy} b ON {in_copy}
        ORDER BY g.kind, g.row_key
        """).format(logged=log.cte(), change_log=backup.meta("change_log"), live=table.ident,
                    copy=backup.backup_name(table), in_live=log.matches("l", "g"),
                    in_copy=log.matches("b", "g")),
        {"ignored": ignored, "n": SAMPLE_LIMIT, **log.params})
    rows = cur.fetchall()
    if not rows:
        return []
    return [Finding(
        "changed_after_backup", Status.FAIL,
        f"{rows[0][1]} row(s) were inserted, changed or deleted by the application after "
        "the backup (change log)", subject=str(table), count=int(rows[0][1]),
        samples=[{"change": kind, "row": data} for kind, _, data in rows],
        hint="rollback --keep-changes keeps them (new ids as text); without it the "
             "rollback would lose them")]


def _unlogged_changes(cur: Cursor, table: Table, keys: list[KeyColumn],
                      log: backup.ChangeLog, ignored: list[str]) -> list[Finding]:
    """Rows that differ from the backup without being in the change log."""
    conn = cur.connection
    pk = _primary_key(cur, table, keys)
    converted = {k.column for k in keys if catalog.column_state(conn, k) is ColumnState.UUID}
    same_keys = sql.SQL(" AND ").join(
        sql.SQL("l.{c} IS NOT DISTINCT FROM (b.{c})::uuid" if k.column in converted
                else "l.{c} IS NOT DISTINCT FROM b.{c}").format(c=sql.Identifier(k.column))
        for k in keys)
    quarantined = backup.quarantine_name(table)
    in_quarantine: sql.Composable = sql.SQL("false")
    if catalog.relation_exists(conn, quarantined):
        in_quarantine = sql.SQL("EXISTS (SELECT 1 FROM {} q WHERE {})").format(
            quarantined, sql.SQL(" AND ").join(
                sql.SQL("q.{p} = b.{p}").format(p=sql.Identifier(p)) for p in pk))
    cur.execute(sql.SQL(
        """
        WITH {logged}
        SELECT kind, count(*) OVER (), row_data FROM (
            SELECT CASE WHEN b IS NULL THEN 'inserted'
                        WHEN l IS NULL THEN 'deleted' ELSE 'changed' END AS kind,
                   coalesce(to_jsonb(l), to_jsonb(b)) - %(ignored)s::text[] AS row_data,
                   coalesce(to_jsonb(l), to_jsonb(b)) AS ordering
            FROM {backup} b FULL JOIN {live} l ON {join}
            WHERE ((b IS NULL) OR (l IS NULL AND NOT {in_quarantine})
               OR (NOT (l IS NULL) AND NOT (b IS NULL) AND (
                    NOT ({same_keys})
                    OR to_jsonb(l) - %(ignored)s::text[] <> to_jsonb(b) - %(ignored)s::text[])))
              AND NOT {logged_b} AND NOT {logged_l}
        ) d ORDER BY kind, ordering LIMIT %(n)s
        """).format(logged=log.cte(), backup=backup.backup_name(table), live=table.ident,
                    join=_pk_join(pk, converted), in_quarantine=in_quarantine,
                    same_keys=same_keys, logged_b=log.holds("b"), logged_l=log.holds("l")),
        {"ignored": ignored, "n": SAMPLE_LIMIT, **log.params})
    rows = cur.fetchall()
    if not rows:
        return []
    return [Finding(
        "changed_after_backup", Status.FAIL,
        f"{rows[0][1]} row(s) differ from the backup without a write in the change log",
        subject=str(table), count=int(rows[0][1]),
        samples=[{"change": kind, "row": data} for kind, _, data in rows],
        hint="find out who changed them; rollback --keep-changes keeps them as they are, "
             "without it the rollback would not match the backup")]


def _drop_helpers(cur: Cursor, key: KeyColumn) -> None:
    cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
        sql.Identifier(key.helper("sync")), key.table.ident))
    for check in ("filled", "not_null"):
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            key.table.ident, sql.Identifier(key.helper(check))))
    cur.execute(sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
        key.table.ident, sql.Identifier(key.temp)))


def _restore_type(cur: Cursor, key: KeyColumn) -> None:
    """uuid back to the recorded string type and default (indexes follow the type)."""
    saved = backup.saved_column(cur, key)
    column = sql.Identifier(key.column)
    cur.execute(sql.SQL("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT, "
                        "ALTER COLUMN {c} TYPE {type} USING ({c})::text").format(
        t=key.table.ident, c=column, type=sql.SQL(saved.type)))  # type as format_type printed
    if saved.default is not None:
        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
            key.table.ident, column, sql.SQL(saved.default)))


def _respell(cur: Cursor, table: Table, keys: list[KeyColumn], pk: list[str]) -> int:
    """Give each key its original spelling from the backup, where it denotes the same UUID."""
    names = [k.column for k in keys]
    assignments = sql.SQL(", ").join(
        sql.SQL("{c} = CASE WHEN l.{c} = ((b.{c})::uuid)::text THEN b.{c} ELSE l.{c} END").format(
            c=sql.Identifier(c)) for c in names)
    join = sql.SQL(" AND ").join(
        sql.SQL("l.{p} = ((b.{p})::uuid)::text" if p in names else "l.{p} = b.{p}").format(
            p=sql.Identifier(p)) for p in pk)
    differs = sql.SQL(" OR ").join(
        sql.SQL("l.{c} IS DISTINCT FROM b.{c}").format(c=sql.Identifier(c)) for c in names)
    cur.execute(sql.SQL("UPDATE {t} l SET {set} FROM {b} b WHERE {join} AND ({differs})").format(
        t=table.ident, set=assignments, b=backup.backup_name(table), join=join, differs=differs))
    return int(cur.rowcount)


def _restore_quarantine(cur: Cursor, table: Table) -> int:
    target = backup.quarantine_name(table)
    if not catalog.relation_exists(cur.connection, target):
        return 0
    columns = backup.columns_of(cur, target)
    cur.execute(sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM {}").format(
        table.ident, target, cols=column_list(columns)))
    restored = int(cur.rowcount)
    cur.execute(sql.SQL("DROP TABLE {}").format(target))
    cur.execute(sql.SQL("DELETE FROM {} WHERE (table_schema, table_name) = (%s, %s)").format(
        backup.meta("quarantine")), (table.schema, table.name))
    return restored


def _nothing_to_undo(cur: Cursor, session: Session) -> bool:
    conn = cur.connection
    if any(catalog.column_state(conn, k) is not ColumnState.STRING for k in session.plan.columns):
        return False
    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(backup.meta("quarantine")))
    if (cur.fetchone() or [0])[0]:
        return False
    present_fks = {(fk.table, fk.name) for k in session.plan.columns
                   for fk in catalog.foreign_keys_from(conn, k)}
    if any((fk.table, fk.name) not in present_fks for fk in backup.saved_foreign_keys(cur)):
        return False
    return _checksums_match(cur) == []


def _checksums_match(cur: Cursor) -> list[str]:
    """Tables whose content differs from the backup's recorded checksum."""
    return [str(table) for table, count, checksum in backup.recorded_checksums(cur)
            if backup.table_checksum(cur, table.ident,
                                     backup.columns_of(cur, backup.backup_name(table)))
            != (count, checksum)]


def rollback(session: Session) -> RollbackResult:
    with session.transaction() as cur:
        untouched = all(catalog.column_state(cur.connection, key) is ColumnState.STRING
                        for key in session.plan.columns)
        if not backup.exists(cur) and untouched:
            return RollbackResult("nothing to undo: no backup was taken and no key column "
                                  "was changed")
        if not backup.exists(cur):
            raise MigrationError(
                f"nothing to roll back to: there is no backup in {backup.SCHEMA} "
                "(cleanup_backup dropped it, or backup_data never ran)",
                hint="restore from the database backup taken before the migration "
                     "(pg_dump / PITR), as the runbook's prerequisites require")
        if _nothing_to_undo(cur, session):
            return RollbackResult("nothing to undo: the tables already match the backup")
        changes = changed_rows(cur, session)
    session.conn.rollback()
    if changes and not session.settings.keep_changes:
        raise MigrationError(
            "rollback refused, nothing was changed: rows changed after the backup would be lost",
            hint="stop the application; rerun with --keep-changes to keep those rows",
            findings=changes)
    return session.ddl("rollback", partial(_rollback, session=session,
                                           keeping_changes=bool(changes)))


def _rollback(cur: Cursor, *, session: Session, keeping_changes: bool) -> RollbackResult:
    conn = cur.connection
    cur.execute("SET LOCAL statement_timeout = 0")  # type changes rewrite whole tables
    grouped = _keys_by_table(session)
    for table in sorted(grouped):
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table.ident))
    for key in session.plan.columns:  # every FK among the plan's columns, as it is now
        for fk in catalog.foreign_keys_from(conn, key):
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                fk.table.ident, sql.Identifier(fk.name)))
    session.point("rollback")
    respelled = restored = 0
    for table, keys in grouped.items():
        pk = _primary_key(cur, table, keys)
        converted = [k for k in keys if catalog.column_state(conn, k) is ColumnState.UUID]
        for key in keys:
            _drop_helpers(cur, key)
        for key in converted:
            _restore_type(cur, key)
        if converted:
            respelled += _respell(cur, table, converted, pk)
        restored += _restore_quarantine(cur, table)
        session.point("rollback")
    for key in session.plan.columns:
        for index in backup.saved_indexes(cur, key):
            recreate_index(cur, index)
    for fk in backup.saved_foreign_keys(cur):
        cur.execute("SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) "
                    "AND conname = %s", (catalog.regclass(fk.table), fk.name))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                fk.table.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))
    cur.execute(sql.SQL("DELETE FROM {}").format(backup.meta("backfill_progress")))
    session.point("rollback")
    differing = _checksums_match(cur)
    if differing and not keeping_changes:
        raise MigrationError(f"rollback undone: {', '.join(differing)} would not match the backup",
                             hint="nothing was changed; report this with the log file")
    message = (f"rolled back to the backup: {respelled:,} ids respelled, "
               f"{restored:,} quarantined rows restored")
    if keeping_changes:
        message += "; rows changed after the backup were kept"
    return RollbackResult(message, rows=respelled + restored,
                          details={"respelled": respelled, "restored": restored,
                                   "kept_changes": keeping_changes})


def _primary_key(cur: Cursor, table: Table, keys: list[KeyColumn]) -> list[str]:
    """The table's primary key columns, also when a swap dropped it and it is not back yet."""
    found = catalog.primary_key(cur.connection, table)
    if found:
        return found
    for key in keys:  # the key column itself backed the primary key the backup recorded
        if any(ix.constraint_type == "p" for ix in backup.saved_indexes(cur, key)):
            return [key.column]
    raise MigrationError(f"{table} has no primary key to match rows with the backup",
                         hint="recreate the primary key, then run rollback again")
